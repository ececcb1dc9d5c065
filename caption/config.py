"""Typed, frozen configuration: dataclasses per concern, YAML in, dotted overrides, exact round-trip.

A config file (``configs/*.yaml``) lists only what differs from the defaults below; command-line
overrides such as ``model.attention=dot train.lr=2e-4`` are applied on top. An unknown key or a
value of the wrong type raises :class:`ConfigError` naming the key. The resolved config is saved
beside every checkpoint and reloads to an equal object.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from caption.errors import CaptionError
from caption.fileio import atomic_write_text


class ConfigError(CaptionError, ValueError):
    """A bad config key or value; the message names the dotted key."""


PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # Config.precision and every --precision


@dataclass(frozen=True)
class DataConfig:
    """Where captions and images come from, and how images are turned into tensors."""

    format: str = "coco"  # "coco" (pycocotools captions files) or "karpathy" (dataset_*.json)
    train_captions: str = ""  # coco: captions file of the training split
    val_captions: str = ""  # coco: captions file used for model selection
    test_captions: str = ""  # coco: held-out captions file
    karpathy_json: str = ""  # karpathy: dataset_coco.json / dataset_flickr8k.json / ...
    images: str = ""  # image folder (karpathy: root that `filepath/filename` is relative to)
    image_size: int = 224  # images are resized to a square of this side
    min_freq: int = 5  # words seen fewer times on the training split become <unk>
    max_caption_len: int = 50  # longer training captions are truncated (in words)
    cache_dir: str = ""  # feature cache folder; "" means <run dir>/cache
    cache: str = "f16"  # frozen encoder's features on disk: "f16", "int8" (half the disk: a scale per cell) or "none" (encode every batch)
    num_workers: int = 0
    metric: str = ""  # the data set's own scores beside the COCO metrics, read from its captions files: "" or "shapes"
    keep_images: bool = False  # decode each training image once and keep it (uint8) in RAM (each DataLoader worker keeps its own, for one epoch)


@dataclass(frozen=True)
class ModelConfig:
    """Encoder backbone, attention scorer and decoder sizes."""

    encoder: str = "resnet101"  # resnet50|resnet101|resnet152|vgg16|mobilenet_v3_large|efficientnet_lite0|efficientnet_lite1|efficientnet_lite2|small
    weights: str = "none"  # "DEFAULT" loads pretrained weights (hub for torchvision); "none" = random init
    grid: int = 14  # features are adaptive-pooled to grid x grid cells (L = grid**2)
    stage: int = 32  # efficientnet_lite* only: take the grid from the stride-16 or stride-32 stage
    fine_tune: bool = False  # unfreeze the top encoder blocks
    fine_tune_blocks: int = 2  # how many top blocks fine_tune unfreezes
    small_channels: int = 64  # width of the last layer of the "small" CNN
    coord_features: bool = False  # append each cell's (x, y) in [-1, 1] to its feature (CoordConv-style)
    attention: str = "additive"  # additive|dot|general|concat
    blend: str = "soft"  # soft: each word reads the attention-weighted mean of the cells; hard: one cell drawn from the weights
    embed_dim: int = 512
    hidden_dim: int = 512
    attention_dim: int = 512
    dropout: float = 0.5
    gate: str = "scalar"  # β gate on the context: "scalar" (paper), "vector" (tutorial), "none"
    deep_output: bool = False  # the paper's deep output layer L_o(E y + L_h h + L_z z)
    init_state: str = "mean"  # h0/c0 from the mean feature (paper), "attend" (a query-free attention pool) or "zeros"


@dataclass(frozen=True)
class EncoderConfig:
    """The part of ``ModelConfig`` that determines the encoder's features.

    The encoder is built from this object alone (``EncoderConfig.of(model_cfg)``), so a setting
    that is not here cannot change the features, and the feature cache is keyed by its hash.
    """

    encoder: str
    weights: str
    grid: int
    stage: int
    small_channels: int
    coord_features: bool

    @classmethod
    def of(cls, model: ModelConfig) -> "EncoderConfig":
        return cls(**{f.name: getattr(model, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and model-selection settings."""

    epochs: int = 20
    batch_size: int = 32  # captions per optimizer step
    group_by_image: bool = False  # a batch holds all captions of ~batch_size/5 images; each image is encoded once
    lr: float = 4e-4
    weight_decay: float = 0.0
    encoder_lr: float = 1e-4  # used once the encoder is fine-tuned
    fine_tune_from_epoch: int = -1  # -1: never; else start fine-tuning the encoder at this epoch
    grad_clip: float = 5.0
    alpha_c: float = 1.0  # λ of the doubly-stochastic attention penalty
    ground_weight: float = 0.0  # weight of −log(attention mass in the detected box) per word naming it (docs/attention.md)
    lr_schedule: str = "plateau"  # "plateau" (per epoch, on the val score) or "cosine" (warm-up + cosine over all epochs)
    lr_decay_factor: float = 0.8  # plateau: multiply the LR by this when the val score (select_metric) plateaus
    lr_patience: int = 2  # plateau: epochs without a better val score before the LR drops
    warmup_steps: int = 0  # cosine: optimizer steps of linear warm-up
    min_lr_ratio: float = 0.0  # cosine: the LR at the end of the last epoch, as a fraction of the initial one
    early_stop_patience: int = 6  # stop after this many epochs without a better val score
    select_metric: str = "CIDEr"  # val score (greedy) that picks best.pt, e.g. content_accuracy on shapes
    val_beam: int = 1  # decoding used for model selection (1 = greedy)
    val_every_steps: int = 0  # also validate (and keep best.pt) every N optimizer steps within an epoch; 0: at epoch ends only
    seed: int = 0
    checkpoint_every: int = 0  # also write last.pt every N optimizer steps (0: at epoch ends only)
    max_steps: int = 0  # stop after this many optimizer steps in all, last.pt written (a larger value and --resume go on); 0: no limit
    objective: str = "xent"  # "xent" (cross-entropy, teacher forcing), "scst" (self-critical: CIDEr-D of samples)
    # or "distill" (cross-entropy and the teachers' next-word distributions)
    init_from: str = ""  # a run directory or .pt whose weights and vocabulary the run starts from (not its optimizer)
    scst_samples: int = 5  # scst: captions sampled per image (K); a step takes batch_size images
    scst_baseline: str = "mean"  # scst: a sample's baseline, "mean" reward of the image's other K-1 samples or "greedy"
    scst_max_len: int = 16  # scst: most tokens per sampled caption, <end> included
    scst_temperature: float = 1.0  # scst: sample from softmax(logits / temperature)
    # distill (knowledge distillation into this run's one decoder, docs/distillation.md)
    teachers: str = ""  # distill: the teacher ensemble, checkpoint files or run directories separated by commas
    distill_weight: float = 0.5  # distill: loss = (1 - w) * cross-entropy + w * KL(teachers || student), per word
    teacher_captions: str = ""  # distill: the teachers' captions of the training photos (COCO results JSON), extra targets
    # model.blend=hard (Xu et al. 2015, sec. 4.1; arctic-captions' capgen.py defaults): the caption loss with
    # sampled cells, plus REINFORCE on the cell choices with the per-word log-likelihood as the reward
    hard_reinforce: float = 0.1  # λ_r (capgen.py's /10)
    hard_entropy: float = 0.0  # λ_e, bonus on the entropy of the attention weights (capgen.py's default 0)
    hard_baseline_decay: float = 0.9  # reward baseline b <- decay * b + (1 - decay) * mean reward
    hard_expect_prob: float = 0.5  # per batch, the chance of reading the expectation (soft) instead of a sample


@dataclass(frozen=True)
class DecodeConfig:
    """How captions are generated: the options type of every search in :mod:`caption.decoding`
    (exported there under this name). ``temperature`` 0 searches (greedy for ``beam_size`` 1, else batched
    beam search); above 0 it samples ``samples`` captions per image from softmax(logits / temperature)."""

    beam_size: int = 3
    max_len: int = 20  # most words emitted per caption, <end> included
    min_len: int = 0  # <end> is suppressed before this many words
    length_penalty: float = 0.0  # final score = log_prob / len**length_penalty; >= 0 (beam search's early stop
    # relies on a longer caption never scoring higher)
    suppress_unk: bool = True  # never emit <unk> (it would show as a gap in the caption)
    no_repeat_ngram: int = 0  # never emit an n-gram of this many words twice in one caption (0: off)
    alternatives: bool = False  # beam search also returns its K-1 runners-up (`caption attend` and predict --json ask)
    temperature: float = 0.0  # 0: search; > 0: sample from softmax(logits / temperature)
    samples: int = 1  # sampling: captions per image
    hard_test: str = "argmax"  # model.blend=hard: read the most likely cell ("argmax") or the expectation ("expect")

    def __post_init__(self) -> None:
        checks = {"beam_size": self.beam_size >= 1, "max_len": self.max_len >= 1, "min_len": self.min_len >= 0,
                  "length_penalty": self.length_penalty >= 0,
                  "no_repeat_ngram": self.no_repeat_ngram >= 0, "temperature": self.temperature >= 0,
                  "samples": self.samples >= 1, "hard_test": self.hard_test in ("argmax", "expect")}
        bad = [key for key, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"config key 'decode.{bad[0]}' has an invalid value {getattr(self, bad[0])!r}")

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def with_overrides(self, **overrides: Any) -> "DecodeConfig":
        """These options with ``overrides`` (a None value keeps the option as it is)."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown decoding option(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **{key: value for key, value in overrides.items() if value is not None})


@dataclass(frozen=True)
class GuideConfig:
    """Captions guided by the encoder's own ImageNet classifier (EfficientNet-Lite encoders at stage
    32; :mod:`caption.guidance.guide`): a caption that names nothing the classifier is confident of
    is searched again so that it does (constrained beam search). Values chosen on the dev photos
    (imagenet-sample-dev, Flickr8k dev): MODEL_CARD.md."""

    enabled: bool = True  # off: plain search (also --no-guide, guide=False); off anyway for encoders without a head
    threshold: float = 0.3  # an animal's, plant's or food's name is required when the classes it names (every dog for "dog") have this probability
    thing_threshold: float = 0.5  # the same for things and structures (often beside people in everyday photos: a ball, a bike)
    plausible: float = 0.2  # a plain caption naming something this probable anywhere stays ("a man rides a bike", a unicycle)
    kinds: str = "animal,plant,food,thing,structure"  # kinds of class whose names are required (not people, clothing, scenery)
    subject_kinds: str = "animal,plant,food"  # kinds whose name, where it must be said, is the subject, with no people around
    within: int = 5  # subject kinds: the name starts within the caption's first N words
    person_penalty: float = 4.0  # subject kinds: taken off the ranking log-probability per person or clothing word
    slot_mass: float = 0.3  # a name may start only where the model gives nouns (names, people) this probability
    no_people: float = 0.6  # people are penalised in a photo this surely of an animal, plant or food, named or not
    people: float = 0.8  # the people probe (caption.guidance.people) at or above this: a photo of people, left unguided
    new_names: bool = True  # a class whose everyday name the vocabulary lacks ("lizard") is said through a stand-in word
    top_labels: int = 3  # classifier labels reported with each caption (predict --json, the viewer)

    def __post_init__(self) -> None:
        unit = ("threshold", "thing_threshold", "plausible", "slot_mass", "no_people", "people")
        checks = {**{key: 0.0 <= getattr(self, key) <= 1.0 for key in unit}, "within": self.within >= 0,
                  "person_penalty": self.person_penalty >= 0, "top_labels": self.top_labels >= 1}
        bad = [key for key, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"config key 'guide.{bad[0]}' has an invalid value {getattr(self, bad[0])!r}")


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration of a run."""

    name: str = "default"
    # auto: bf16 where the device computes it in hardware (CUDA with bf16, a CPU with AMX or
    # AVX512-BF16), else fp32; or fp32 | bf16 | fp16 (not on a CPU).
    precision: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    guide: GuideConfig = field(default_factory=GuideConfig)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"config key 'precision' must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config (safe for YAML/JSON and checkpoints)."""
    return dataclasses.asdict(cfg)


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check/convert one leaf value to the field's declared type."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"config key '{key}' expects {getattr(typ, '__name__', typ)}, got {value!r}")


def from_dict(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build a (nested) frozen config from a dict, rejecting unknown keys and wrong types."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = from_dict(typ, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, value, typ)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``model.attention=dot`` into key and YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """Return a new config with dotted ``key=value`` overrides applied (types checked)."""
    data = to_dict(cfg)
    for text in overrides:
        key, value = parse_override(text)
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown config key '{'.'.join(parts[: i + 1])}' in override '{text}'")
            node = node[part]
        if parts[-1] not in node or isinstance(node[parts[-1]], dict):
            raise ConfigError(f"unknown config key '{key}' in override '{text}'")
        node[parts[-1]] = value
    return from_dict(Config, data)


def read_config_file(path: str | Path) -> dict:
    """The mapping a YAML config file holds, ``name`` defaulting to the file stem (keys not checked)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping")
    data.setdefault("name", path.stem)
    return data


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Defaults, then the YAML file (if any), then overrides. ``name`` defaults to the file stem."""
    data = read_config_file(path) if path is not None else {}
    return apply_overrides(from_dict(Config, data), overrides)


def migrate_config(data: Any) -> Any:
    """A config dict an earlier release wrote (a checkpoint's, a run directory's ``config.yaml``) with
    today's keys; today's come back unchanged, and a non-mapping is left for ``from_dict`` to refuse.

    The one key removed so far is ``train.amp`` (36472dc; 68b405d replaced it with the top-level
    ``precision``): true becomes ``auto``, false ``fp32``, and a ``precision`` beside it wins. Keys
    added since are absent and take their defaults, which do what the releases before them did
    (:mod:`caption.checkpoint` lists them). Configs people write get no such help: ``load_config``
    refuses ``train.amp`` by name."""
    train = data.get("train") if isinstance(data, dict) else None
    if not isinstance(train, dict) or "amp" not in train:
        return data
    train = dict(train)
    amp = train.pop("amp")
    if not isinstance(amp, bool):
        raise ConfigError(f"config key 'train.amp' (an earlier release's) expects bool, got {amp!r}")
    return {**data, "train": train, "precision": data.get("precision", "auto" if amp else "fp32")}


def load_run_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """A run directory's ``config.yaml`` as any release wrote it (:func:`migrate_config`), then
    ``overrides``: what ``caption train --resume`` continues."""
    return apply_overrides(from_dict(Config, migrate_config(read_config_file(path))), overrides)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically); ``load_config`` reads it back equal."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
