"""What a checkpoint carries besides weights: where training stands (:class:`Progress`) and the
RNG states, restored by ``--resume``; and the check that a resumed run keeps its model and data."""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from caption.checkpoint import load_state
from caption.config import Config, ConfigError, from_dict
from caption.model import Captioner


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # current epoch (0-based)
    batch: int = 0  # batches done within the current epoch
    step: int = 0  # optimizer steps done in total
    best_score: float = -math.inf
    bad_epochs: int = 0  # epochs since the best validation score
    improved_in_epoch: bool = False  # a validation within this epoch (train.val_every_steps) set a new best
    sums: dict = dataclasses.field(default_factory=dict)  # this epoch so far (this process): metric -> [sum, count]

    def add(self, metrics: dict[str, tuple[float, float]]) -> None:
        """Add one step's metric sums and counts (StepResult.metrics)."""
        for name, (total, count) in metrics.items():
            acc = self.sums.setdefault(name, [0.0, 0.0])
            acc[0], acc[1] = acc[0] + total, acc[1] + count

    def means(self) -> dict[str, float]:
        """The epoch's ``train_<metric>`` columns so far."""
        return {f"train_{name}": round(total / max(count, 1.0), 4) for name, (total, count) in self.sums.items()}

    @classmethod
    def from_dict(cls, state: dict, objective: str) -> "Progress":
        """A saved Progress; one written before ``sums`` (an epoch's ``loss_sum``/``tokens``/``stats``) is read too."""
        state = dict(state)
        if "loss_sum" in state:
            total, count = state.pop("loss_sum"), state.pop("tokens")
            name = "reward" if objective == "scst" else "xent"
            state["sums"] = {name: [total, count], **{k: [v, count] for k, v in state.pop("stats", {}).items()}}
        return cls(**state)


def rng_state() -> dict:
    """torch's, Python's and (where present) CUDA's generator states, for an exact resume."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore(state: dict, model: Captioner, optim, sched, scaler, path: Path, objective: str) -> Progress:
    """Model, optimizer, scheduler, gradient scaler and RNG states from a checkpoint; where training stood."""
    load_state(model, state["model"], path)
    optim.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if state.get("scaler"):  # else fp16 starts here: a fresh scale
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return Progress.from_dict(state["progress"], objective)


def check_resumable(state: dict, cfg: Config, path: Path) -> None:
    """Resuming must keep the model and data of the run; epochs, lr and the like may change."""
    saved = from_dict(Config, state["config"])
    if (saved.model, saved.data) != (cfg.model, cfg.data):
        raise ConfigError(f"cannot resume {path}: its model/data config differs from the one given")
    if saved.train.objective != cfg.train.objective:  # e.g. SCST after cross-entropy: a new run, with init_from
        raise ConfigError(f"cannot resume {path} with train.objective={cfg.train.objective}: it was trained with "
                          f"{saved.train.objective}; start a new run with train.init_from={path}")
