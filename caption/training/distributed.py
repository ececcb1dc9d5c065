"""Data-parallel plumbing for ``torchrun``: process group, DDP wrapping, small collectives.

Without ``torchrun`` (no WORLD_SIZE in the environment) everything degrades to one process and
the collectives are no-ops, so the training code reads the same either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as td
from torch import nn



@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def wrap(self, model: nn.Module, wrapped: nn.Module | None = None) -> nn.Module:
        """DistributedDataParallel around ``model`` under torchrun (``model`` itself otherwise).

        DDP averages the gradients of the parameters that required them when it was built, and
        no others: wrap again whenever that changes (unfreezing encoder blocks). ``wrapped``, the
        wrapper built before, comes back as it is while the same parameters train; otherwise the
        caller replaces it with the new one, and dropping it removes its gradient hooks.
        """
        if not self.active:
            return model
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        if wrapped is not None and getattr(wrapped, "trainable", None) == trainable:
            return wrapped
        ids = [self.device.index] if self.device.type == "cuda" else None
        if self.device.type == "cuda" and not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BatchNorm statistics over the global batch
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
        ddp.trainable = trainable
        return ddp

    def broadcast_float(self, value: float) -> float:
        """Rank 0's value on every rank (e.g. the validation score that drives early stopping)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        td.broadcast(t, src=0)
        return float(t.item())

    def close(self) -> None:
        if self.active and td.is_initialized():
            td.barrier()
            td.destroy_process_group()


def is_main_process() -> bool:
    """Rank 0 of a torchrun, or a process on its own: the one that writes and reports."""
    return int(os.environ.get("RANK", "0")) == 0


def setup_distributed(device: torch.device) -> Dist:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA) or run as a single process on
    ``device`` (the runtime's); a CUDA device without an index becomes this process's own GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    if world > 1 and not td.is_initialized():
        td.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, dev)


def all_sum(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Sum of ``t`` over all processes (``t`` itself for one process)."""
    if not dist.active:
        return t
    t = t.clone()
    td.all_reduce(t)
    return t
