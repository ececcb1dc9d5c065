"""The learning-rate schedule (``train.lr_schedule``), stepped by training and saved with every checkpoint.

* ``plateau`` multiplies the LR by ``lr_decay_factor`` when the validation score has not improved
  for ``lr_patience`` epochs (stepped once per epoch).
* ``cosine`` is budget-aware: a linear warm-up over ``warmup_steps`` optimizer steps, then a
  cosine decay to ``min_lr_ratio`` x the initial LR at the end of ``epochs`` (stepped once per
  optimizer step), so the LR is low exactly when the budget runs out.
"""

from __future__ import annotations

import math

import torch

from caption.config import ConfigError, TrainConfig

SCHEDULES = ("plateau", "cosine")


class Schedule:
    """One interface over both schedules: ``after_step()`` per optimizer step, ``after_epoch(score)`` per epoch."""

    def __init__(self, optim: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
        check_schedule(cfg)
        self.kind = cfg.lr_schedule
        if self.kind == "plateau":
            self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optim, mode="max", factor=cfg.lr_decay_factor, patience=cfg.lr_patience)
        else:
            total, warmup, floor = max(1, cfg.epochs * steps_per_epoch), cfg.warmup_steps, cfg.min_lr_ratio
            self.sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: _cosine(step, total, warmup, floor))

    def after_step(self) -> None:
        if self.kind == "cosine":
            self.sched.step()

    def after_epoch(self, score: float) -> None:
        if self.kind == "plateau":
            self.sched.step(score)

    def state_dict(self) -> dict:
        return self.sched.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sched.load_state_dict(state)


def check_schedule(cfg: TrainConfig) -> None:
    """ConfigError for an unknown ``train.lr_schedule`` or a negative ``train.max_steps``."""
    if cfg.lr_schedule not in SCHEDULES:
        raise ConfigError(f"train.lr_schedule must be one of {', '.join(SCHEDULES)}, got '{cfg.lr_schedule}'")
    if cfg.max_steps < 0:
        raise ConfigError(f"train.max_steps must be >= 0 (0: no limit), got {cfg.max_steps}")


def _cosine(step: int, total: int, warmup: int, floor: float) -> float:
    """LR multiplier at ``step``: linear warm-up to 1, then cosine down to ``floor`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
