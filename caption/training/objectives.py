"""What the one training loop optimises: an objective computes a step's loss and named metrics.

:func:`caption.training.loop.fit` owns everything around a step (batches, optimizer, checkpoints,
resume, DDP, validation, early stopping) and calls ``objective.step`` once per batch. An objective
says what an epoch iterates over (``dataset``, ``collate``, ``groups``) and, for each batch,
returns a :class:`StepResult`: the loss to back-propagate and metric sums that the loop adds up
over the epoch (their means become ``train_<name>`` in ``metrics.csv``). ``train.objective``
names one in :data:`OBJECTIVES`: ``xent`` (:class:`CrossEntropy`, here; :class:`HardAttention`
for a ``model.blend=hard`` model), ``scst`` (:class:`caption.training.scst.SelfCritical`) or
``distill`` (:class:`caption.training.distill.Distillation`). An
objective with state of its own (a reward baseline) has ``state_dict``/``load_state_dict``, and
checkpoints carry it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from caption.config import Config, ConfigError
from caption.data.datasets import collate_captions
from caption.model.decoder import DecoderOutput
from caption.training.distributed import Dist, all_sum
from caption.training.grounding import BoxTargets
from caption.training.losses import Loss, caption_loss
from caption.training.splits import SplitData
from caption.vocab import Vocabulary

# train.objective -> "module:class", imported when a run uses it
OBJECTIVES = {"xent": "caption.training.objectives:CrossEntropy", "scst": "caption.training.scst:SelfCritical",
              "distill": "caption.training.distill:Distillation"}


@dataclass(frozen=True)
class StepResult:
    """One training step of this process."""

    loss: torch.Tensor  # what is back-propagated
    metrics: dict[str, tuple[float, float]]  # name -> (sum, count): the epoch's mean is sum / count
    items: int  # captions or images this process stepped over (throughput)


class Objective(Protocol):
    """A training objective of :func:`caption.training.loop.fit`."""

    unit: str  # what ``items`` counts: "caption" or "image"
    dataset: Any  # what an epoch iterates over (map-style, indexable)
    collate: Callable  # batch items -> what ``step`` takes (None for an all-unreadable batch)
    groups: Sequence[Sequence[int]] | None  # dataset indices that must share a batch, or None

    def step(self, ddp_model: torch.nn.Module, batch: Any, dist: Dist) -> StepResult:
        """Forward (through ``ddp_model``, so DDP averages the gradients) and the loss of one batch."""
        ...


def check_objective(cfg: Config) -> None:
    """ConfigError for an unknown ``train.objective``, or settings its objective refuses."""
    if cfg.train.objective not in OBJECTIVES:
        raise ConfigError(f"train.objective must be one of {', '.join(OBJECTIVES)}, got '{cfg.train.objective}'")
    check = getattr(_objective_class(cfg.train.objective), "check", None)
    if check is not None:
        check(cfg)


def _objective_class(name: str) -> type:
    module, attribute = OBJECTIVES[name].split(":")
    return getattr(importlib.import_module(module), attribute)


def build_objective(cfg: Config, vocab: Vocabulary, train: SplitData) -> Objective:
    """The objective ``train.objective`` names, for this run's vocabulary and training split;
    cross-entropy of a hard-attention model (``model.blend=hard``) is :class:`HardAttention`."""
    check_objective(cfg)
    if cfg.train.objective == "xent" and cfg.model.blend == "hard":
        return HardAttention(cfg, vocab, train)
    return _objective_class(cfg.train.objective)(cfg, vocab, train)


class CrossEntropy:
    """Teacher forcing: masked cross-entropy of every caption word plus the doubly-stochastic
    attention penalty (:func:`caption.training.losses.caption_loss`), one item per caption; with
    ``train.group_by_image`` all captions of an image share a batch (the image is encoded once)."""

    unit = "caption"

    def __init__(self, cfg: Config, vocab: Vocabulary, train: SplitData):
        self.alpha_c = cfg.train.alpha_c
        self.cached = train.features is not None
        self.dataset = train.dataset
        self.collate = collate_captions
        self.groups = train.dataset.image_groups() if cfg.train.group_by_image else None
        self.ground_weight = cfg.train.ground_weight
        self.boxes = (BoxTargets.build(train.records, vocab, cfg.model.grid, train.cache_dir)
                      if self.ground_weight > 0 else None)

    def step(self, ddp_model: torch.nn.Module, batch, dist: Dist) -> StepResult:
        forced = self.teacher_forced(ddp_model, batch, dist)
        return StepResult(forced.loss.total, forced.metrics, len(forced.captions))

    def teacher_forced(self, ddp_model: torch.nn.Module, batch, dist: Dist, blend: str | None = None) -> "Forced":
        """The batch on ``dist.device``, its teacher-forced output and caption loss, normalised by
        the global batch (so averaging over ranks gives the single-process gradient); ``blend``: how
        a hard-attention decoder reads the cells (:meth:`caption.model.AttentionDecoder.prepare`)."""
        device = dist.device
        inputs, captions = batch.inputs.to(device, non_blocking=True), batch.captions.to(device, non_blocking=True)
        rows = batch.rows.to(device, non_blocking=True)
        tokens = (captions[:, 1:] != 0).sum().float()
        counts = all_sum(torch.stack([tokens, torch.tensor(float(len(captions)), device=device)]), dist)  # (2,)
        out = ddp_model(inputs, captions, features=self.cached, rows=rows, blend=blend)
        token_count, caption_count = counts[0] / dist.world, counts[1] / dist.world
        loss = caption_loss(out, self.alpha_c, token_count=token_count, image_count=caption_count)
        ground = None
        if self.boxes is not None:  # mean over this process's grounded words
            ground_sum, grounded = self.boxes.loss(out, batch.image_index)
            loss = loss.grounded(self.ground_weight * ground_sum / max(grounded, 1))
            ground = (ground_sum.item(), float(grounded))
        return Forced(inputs, captions, rows, out, loss, float(tokens), counts, token_count, caption_count, ground)


@dataclass(frozen=True)
class Forced:
    """One teacher-forced batch (:meth:`CrossEntropy.teacher_forced`)."""

    inputs: torch.Tensor  # (U, L, D) features or (U, 3, S, S) images, on the device
    captions: torch.Tensor  # (B, T+1)
    rows: torch.Tensor  # (B,) the image of each caption
    out: DecoderOutput
    loss: Loss
    tokens: float  # this process's real words
    counts: torch.Tensor  # (2,) the global batch's real words and captions
    token_count: torch.Tensor  # the global batch's real words per process: the cross-entropy's divisor
    caption_count: torch.Tensor  # the global batch's captions per process: the attention penalty's divisor
    ground: tuple[float, float] | None = None  # (sum of −log mass in box, grounded words), with train.ground_weight

    @property
    def xent(self) -> tuple[float, float]:
        """The cross-entropy metric: (sum, count) over this process's words."""
        return self.loss.xent.item() * self.tokens, self.tokens

    @property
    def metrics(self) -> dict[str, tuple[float, float]]:
        """The step's metrics: ``xent`` per word, and ``ground`` per grounded word when supervised."""
        return {"xent": self.xent} | ({} if self.ground is None else {"ground": self.ground})


def reinforce_loss(log_prob_choice: torch.Tensor, reward: torch.Tensor, baseline: float,
                   count: torch.Tensor | float) -> torch.Tensor:
    """REINFORCE's surrogate: -sum (reward - baseline) * log p(choice) / count, for B choices.

    log_prob_choice (B,) carries the gradient; reward (B,) does not. Its gradient is the
    score-function estimate of -grad E[reward], unbiased for any baseline that does not depend on
    the choice; ``count`` is the number of choices it is averaged over (the global batch).
    """
    return -((reward.detach() - baseline) * log_prob_choice).sum() / count


class HardAttention(CrossEntropy):
    """Hard attention's training (``model.blend=hard``; Xu et al. 2015, sec. 4.1, and arctic-captions).

    Each batch reads, with probability ``train.hard_expect_prob``, the expectation of the cells
    (soft attention, so the caption loss alone), and otherwise one cell per word sampled from the
    attention weights: the caption loss then flows through the sampled cells, and the choices
    themselves are trained by REINFORCE (:func:`reinforce_loss`, weight ``train.hard_reinforce``)
    with each caption's per-word log-likelihood as the reward and a moving average of it as the
    baseline (``train.hard_baseline_decay``). ``train.hard_entropy`` adds a bonus on the entropy of
    the weights. The baseline is saved in checkpoints (``state_dict``), so resuming stays exact.
    """

    def __init__(self, cfg: Config, vocab: Vocabulary, train: SplitData):
        super().__init__(cfg, vocab, train)
        t = cfg.train
        self.reinforce, self.entropy, self.decay, self.p_expect = (t.hard_reinforce, t.hard_entropy,
                                                                   t.hard_baseline_decay, t.hard_expect_prob)
        self.baseline = 0.0

    def _expect(self) -> bool:
        """This batch reads the expectation (a draw from the global RNG unless the chance is 0 or 1)."""
        if self.p_expect >= 1 or self.p_expect <= 0:
            return self.p_expect >= 1
        return bool(torch.rand(()) < self.p_expect)

    def step(self, ddp_model: torch.nn.Module, batch, dist: Dist) -> StepResult:
        expect = self._expect()
        forced = self.teacher_forced(ddp_model, batch, dist, blend="expect" if expect else "sample")
        out, B, mask = forced.out, len(forced.captions), forced.out.mask  # mask: (B, T)
        word_logp = -torch.nn.functional.cross_entropy(out.word_logits.float(), out.targets[mask], reduction="none")
        b, t = mask.nonzero(as_tuple=True)  # (N,) each, in targets[mask] order
        reward = torch.zeros(B, device=dist.device).index_add_(0, b, word_logp.detach()) / mask.sum(1)  # (B,) per word
        total = forced.loss.total
        alphas = out.alphas.float().clamp_min(1e-12)  # (B, T, L)
        if not expect:
            chosen = alphas[b, t, out.cells[b, t]].log()  # (N,) log p(cell) of each word's sampled cell
            log_choice = torch.zeros(B, device=dist.device).index_add(0, b, chosen)  # (B,)
            total = total + self.reinforce * reinforce_loss(log_choice, reward, self.baseline, forced.caption_count)
        if self.entropy:
            entropy = -(alphas * alphas.log()).sum(-1)[mask].sum()  # over real words
            total = total - self.entropy * entropy / forced.token_count
        mean_reward = float(all_sum(reward.sum(), dist) / forced.counts[1])
        self.baseline = self.decay * self.baseline + (1 - self.decay) * mean_reward
        metrics = {"xent": forced.xent, "reward": (float(reward.sum()), float(B)),
                   "sampled": (0.0 if expect else 1.0, 1.0)}
        return StepResult(total, metrics, B)

    def state_dict(self) -> dict:
        return {"baseline": self.baseline}

    def load_state_dict(self, state: dict) -> None:
        self.baseline = float(state["baseline"])
