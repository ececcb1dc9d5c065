"""Self-critical sequence training (``train.objective=scst``): CIDEr-D of sampled captions as the reward.

Rennie et al. 2017, with the baseline of Luo 2020 ("a better variant of SCST"). Each step takes a
batch of B training images and samples K = ``train.scst_samples`` captions per image through the
decoder's ``step`` (:func:`caption.decoding.sample`: the image keys are shared by its K samples;
eval mode, so no dropout; at most ``train.scst_max_len`` tokens). A sample's reward is its CIDEr-D
against the image's training references, on vocabulary ids with ``<end>`` kept in both (a caption
cut short on "with a" then earns no ``a <end>`` n-grams; dropping ``<end>`` teaches such endings),
with document frequencies counted once over all training references (:class:`CiderReward`). Its
baseline is the mean reward of the image's other K-1 samples, or with ``scst_baseline=greedy``
the reward of the image's greedy caption (decoded in eval mode under no_grad). The loss is
-sum (r - b) log p(w_t) over every sampled token, ``<end>`` included, divided by the tokens of the
global batch.

The run starts from the weights and vocabulary of ``train.init_from`` (a cross-entropy run or a
``.pt``), never from its optimizer, so the SCST learning rate (``train.lr``, ~10x below
cross-entropy's) is what the first step uses; resuming an SCST run restores its own optimizer,
scheduler, RNG and progress exactly, as cross-entropy does. Sampling goes through the model's
forward (``Captioner.forward(run=...)``), so DistributedDataParallel averages the gradients.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.data import Dataset

from caption.config import Config, ConfigError
from caption.data.datasets import ImageDataset, collate_images
from caption.data.records import ImageRecord
from caption.decoding import DecodeConfig, Samples, decode, sample
from caption.evaluation.cider import CiderD
from caption.training.distributed import Dist, all_sum
from caption.training.objectives import StepResult
from caption.training.splits import SplitData
from caption.vocab import END_ID, Vocabulary, tokenize

BASELINES = ("mean", "greedy")

# a caption that stops on one of these was cut short ("a dog runs on the"): logged as a rate
FUNCTION_WORDS = frozenset(
    "a an the and or but of with in on at to for from by into onto over under near through while as is are "
    "his her their its some up down".split()
)


def check(cfg: Config) -> None:
    """ConfigError for SCST settings that cannot work (``train.objective=scst``)."""
    train = cfg.train
    if train.scst_baseline not in BASELINES:
        raise ConfigError(f"train.scst_baseline must be one of {', '.join(BASELINES)}, got '{train.scst_baseline}'")
    if train.scst_samples < (2 if train.scst_baseline == "mean" else 1):
        raise ConfigError(f"train.scst_samples must be at least 2 with the mean baseline, got {train.scst_samples}")
    if train.scst_max_len < 1 or not train.scst_temperature > 0:
        raise ConfigError("train.scst_max_len must be >= 1 and train.scst_temperature > 0")
    if not train.init_from:
        raise ConfigError("train.objective=scst fine-tunes a trained captioner: set train.init_from to a "
                          "cross-entropy run directory or .pt file")


class CiderReward:
    """CIDEr-D of vocabulary-id captions against the references of training image ``i``.

    The references are tokenised once (``caption.vocab.tokenize``), mapped to ids (a word outside
    the vocabulary gets an id of its own, so it matches nothing a caption can say) and ``<end>``
    appended; document frequencies are counted once. The references stay id tuples: an image's
    tf-idf vectors are built when it is scored, because keeping them for COCO's 566k references
    takes gigabytes (docs/coco.md).
    """

    def __init__(self, records: Sequence[ImageRecord], vocab: Vocabulary):
        oov: dict[str, int] = {}

        def ids(text: str) -> tuple[int, ...]:
            words = tokenize(text)
            return tuple(vocab.stoi[w] if w in vocab.stoi else oov.setdefault(w, len(vocab) + len(oov))
                         for w in words) + (END_ID,)

        self.refs: list[tuple[tuple[int, ...], ...]] = [tuple(ids(c) for c in r.captions) for r in records]
        self.cider = CiderD(self.refs)

    def __call__(self, captions: Sequence[Sequence[int]], images: Sequence[int]) -> list[float]:
        """CIDEr-D of ``captions[j]`` (ids, ``<end>`` included when emitted) against image ``images[j]``."""
        vectors = {i: self.cider.references(self.refs[i]) for i in set(images)}  # once per image, for its K samples
        return [self.cider.score(tuple(c), vectors[i]) for c, i in zip(captions, images, strict=True)]


def mean_of_others(rewards: torch.Tensor, samples: int) -> torch.Tensor:
    """(B*K,) rewards, K consecutive per image -> each one's baseline: the mean of its image's other K-1."""
    r = rewards.view(-1, samples)  # (B, K)
    return ((r.sum(1, keepdim=True) - r) / (samples - 1)).view(-1)  # (B*K,)


def ends_on_function_word(tokens: Sequence[int], vocab: Vocabulary) -> bool:
    """Whether a caption's last word (before ``<end>``) is a function word such as "a" or "with"."""
    words = [t for t in tokens if t != END_ID]
    return bool(words) and vocab.itos[words[-1]] in FUNCTION_WORDS


class _TrainingImages(Dataset):
    """One item per training image: ``(features (L, D) or image (3, S, S), index)``, None if unreadable."""

    def __init__(self, split: SplitData):
        self.features = split.features
        self.images = ImageDataset(split.records, split.transform) if split.features is None else None
        bad = split.features.bad if split.features is not None else set()
        self.bad = {i for i, r in enumerate(split.records) if r.image_id in bad}
        self.n = len(split.records)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if self.images is not None:
            return self.images[i]
        return None if i in self.bad else (self.features[i], i)


@dataclass(frozen=True)
class _Rollout:
    samples: Samples
    greedy: list[list[int]] | None  # each image's greedy caption (the greedy baseline), else None


class SelfCritical:
    """The SCST objective of a run (:class:`caption.training.objectives.Objective`): one item per
    training image; its reward, sampling and loss."""

    unit = "image"
    check = staticmethod(check)

    def __init__(self, cfg: Config, vocab: Vocabulary, split: SplitData):
        t = cfg.train
        self.vocab, self.baseline, self.samples = vocab, t.scst_baseline, t.scst_samples
        base = DecodeConfig(beam_size=1, max_len=t.scst_max_len, suppress_unk=cfg.decode.suppress_unk)
        self.options = dataclasses.replace(base, temperature=t.scst_temperature, samples=t.scst_samples)
        self.greedy_options = base
        self.dataset = _TrainingImages(split)
        self.collate, self.groups = collate_images, None
        self.cached = split.features is not None
        self.reward = CiderReward(split.records, vocab)

    def _rollout(self, decoder: torch.nn.Module, features: torch.Tensor) -> _Rollout:
        samples = sample(decoder, features, self.options, grad=True)
        greedy = None
        if self.baseline == "greedy":  # eval mode, no_grad (decode's own)
            greedy = [r.tokens for r in decode(decoder, features.detach(), self.greedy_options)]
        return _Rollout(samples, greedy)

    def step(self, ddp_model: torch.nn.Module, batch, dist: Dist) -> StepResult:
        """Sample, score and form the loss for a batch of B training images: ``batch`` is (inputs,
        their positions among the training images (B,)). Metrics: the mean reward (CIDEr-D) of
        the samples, their words (``<end>`` not counted) and the share that stop on a function word."""
        inputs, index = batch[0].to(dist.device, non_blocking=True), batch[1]
        out = ddp_model(inputs, features=self.cached, run=self._rollout)
        samples, K = out.samples, self.samples
        captions = samples.token_lists()
        images = index.repeat_interleave(K).tolist()  # (N,)
        device = samples.log_probs.device
        rewards = torch.tensor(self.reward(captions, images), device=device)  # (N,)
        if out.greedy is None:
            baseline = mean_of_others(rewards, K)  # (N,)
        else:
            baseline = torch.tensor(self.reward(out.greedy, index.tolist()), device=device).repeat_interleave(K)
        tokens = all_sum(samples.mask.sum().float(), dist) / dist.world  # normalised by the global batch
        loss = -((rewards - baseline).unsqueeze(1) * samples.log_probs).sum() / tokens
        words = (samples.lengths - (samples.tokens == END_ID).sum(1)).float()  # (N,)
        ends = sum(ends_on_function_word(c, self.vocab) for c in captions)
        n = float(len(captions))
        metrics = {"reward": (float(rewards.sum()), n), "sample_words": (float(words.sum()), n),
                   "function_word_end": (float(ends), n)}
        return StepResult(loss, metrics, len(index))
