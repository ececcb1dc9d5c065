"""Which training items go into which batch: the same global batches on any number of processes."""

from __future__ import annotations

import torch

from caption.training.distributed import Dist


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Distributed batch sampler: global batches from a per-epoch permutation, split across ranks.

    Global batch b of epoch e is the same set of items whatever the number of processes (rank r
    takes the r-th of ``world`` contiguous slices of it), so a DDP step equals a single-process
    step on the same global batch, and a resumed run can skip the batches it has already done.

    With ``groups`` (the item indices of each image, :meth:`CaptionDataset.image_groups`) whole
    images are shuffled, and a batch holds every caption of ``images_per_batch(...)`` images: a
    trained encoder then runs once per image instead of once per caption.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, dist: Dist, skip: int = 0,
                 groups: list[list[int]] | None = None):
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        if groups is None:
            order = torch.randperm(n, generator=generator).tolist()
            batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
        else:
            per_batch = images_per_batch(n, len(groups), batch_size)
            order = torch.randperm(len(groups), generator=generator).tolist()
            batches = [[item for g in order[i : i + per_batch] for item in groups[g]]
                       for i in range(0, len(order), per_batch)]
        self.batches = [_slice(b, dist.rank, dist.world) for b in batches[skip:]]
        self.total = len(batches)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def images_per_batch(n_items: int, n_images: int, batch_size: int) -> int:
    """Images per batch that hold about ``batch_size`` captions (at least one image)."""
    return max(1, round(batch_size * n_images / max(n_items, 1)))


def batches_per_epoch(n_items: int, batch_size: int, n_images: int | None = None) -> int:
    """Global batches in one epoch; ``n_images`` when batches are grouped by image."""
    if n_images is None:
        return -(-n_items // batch_size)
    return -(-n_images // images_per_batch(n_items, n_images, batch_size))


def _slice(batch: list[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s contiguous share of a global batch (an image's captions mostly stay together)."""
    return batch[rank * len(batch) // world : (rank + 1) * len(batch) // world]
