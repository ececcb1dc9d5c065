"""What the one training loop optimises: an objective computes a step's loss and named metrics.

:func:`caption.training.loop.fit` owns everything around a step (batches, optimizer, checkpoints,
resume, DDP, validation, early stopping) and calls ``objective.step`` once per batch. An objective
says what an epoch iterates over (``dataset``, ``collate``, ``groups``) and, for each batch,
returns a :class:`StepResult`: the loss to back-propagate and metric sums that the loop adds up
over the epoch (their means become ``train_<name>`` in ``metrics.csv``). ``train.objective``
names one in :data:`OBJECTIVES`: ``xent`` (:class:`CrossEntropy`, here) or ``scst``
(:class:`caption.training.scst.SelfCritical`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from caption.config import Config, ConfigError
from caption.data.datasets import collate_captions
from caption.training.distributed import Dist, all_sum
from caption.training.losses import caption_loss
from caption.training.splits import SplitData
from caption.vocab import Vocabulary

# train.objective -> "module:class", imported when a run uses it
OBJECTIVES = {"xent": "caption.training.objectives:CrossEntropy", "scst": "caption.training.scst:SelfCritical"}


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
    """The objective ``train.objective`` names, for this run's vocabulary and training split."""
    check_objective(cfg)
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

    def step(self, ddp_model: torch.nn.Module, batch, dist: Dist) -> StepResult:
        device = dist.device
        inputs, captions = batch.inputs.to(device, non_blocking=True), batch.captions.to(device, non_blocking=True)
        rows = batch.rows.to(device, non_blocking=True)
        tokens = (captions[:, 1:] != 0).sum().float()
        counts = all_sum(torch.stack([tokens, torch.tensor(float(len(captions)), device=device)]), dist)
        out = ddp_model(inputs, captions, features=self.cached, rows=rows)
        # normalised by the global batch, so averaging over ranks gives the single-process gradient
        loss = caption_loss(out, self.alpha_c, token_count=counts[0] / dist.world, image_count=counts[1] / dist.world)
        return StepResult(loss.total, {"xent": (loss.xent.item() * float(tokens), float(tokens))}, len(captions))
