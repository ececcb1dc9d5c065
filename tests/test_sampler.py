"""Batches grouped by image: the sampler, the collate step that stacks each image once, the model."""

from __future__ import annotations

import torch
from conftest import tiny_model_config

from caption.data.datasets import CaptionItem, collate_captions
from caption.model import build_model
from caption.training.distributed import Dist
from caption.training.sampler import (
    GlobalBatchSampler,
    batches_per_epoch,
    images_per_batch,
)

CPU = torch.device("cpu")


def _groups(n_images: int, per_image: int = 5) -> list[list[int]]:
    return [list(range(i * per_image, (i + 1) * per_image)) for i in range(n_images)]


def _global(n, batch_size, world, groups=None, skip=0, epoch=0):
    """The global batches as the ranks see them, each rank's share concatenated in rank order."""
    ranks = [GlobalBatchSampler(n, batch_size, 3, epoch, Dist(r, world, CPU), skip=skip, groups=groups)
             for r in range(world)]
    return [sum(shares, []) for shares in zip(*(list(s) for s in ranks))], ranks[0].total


def test_every_caption_once_per_epoch_and_the_same_global_batches_on_any_world():
    one, total = _global(103, 16, 1)
    assert sorted(sum(one, [])) == list(range(103)) and total == len(one) == batches_per_epoch(103, 16)
    for world in (2, 3):
        assert _global(103, 16, world)[0] == one
    assert _global(103, 16, 1, epoch=1)[0] != one  # reshuffled every epoch


def test_grouped_batches_hold_whole_images():
    groups = _groups(21)  # 105 captions, 5 per image
    batches, total = _global(105, 16, 1, groups=groups)
    per_batch = images_per_batch(105, 21, 16)
    assert per_batch == 3 and total == len(batches) == batches_per_epoch(105, 16, n_images=21) == 7
    assert sorted(sum(batches, [])) == list(range(105))
    for batch in batches:
        images = {item // 5 for item in batch}
        assert len(images) == per_batch and sorted(batch) == sorted(i * 5 + j for i in images for j in range(5))
    assert _global(105, 16, 2, groups=groups)[0] == batches  # DDP: the same global batches
    assert _global(105, 16, 1, groups=groups, skip=2)[0] == batches[2:]  # resume mid-epoch
    assert images_per_batch(10, 10, 1) == 1 and images_per_batch(5, 1, 64) == 13


def test_collate_stacks_each_image_once_and_maps_captions_to_rows():
    images = {7: torch.full((2, 3), 7.0), 4: torch.full((2, 3), 4.0)}
    items = [CaptionItem(images[i], torch.tensor([1] + [5] * k + [2]), i) for i, k in ((7, 1), (4, 2), (7, 3))]
    batch = collate_captions(items + [None])
    assert batch.inputs.shape == (2, 2, 3) and batch.inputs[:, 0, 0].tolist() == [7.0, 4.0]
    assert batch.rows.tolist() == [0, 1, 0] and batch.image_index.tolist() == [7, 4, 7]
    assert torch.equal(batch.inputs[batch.rows], torch.stack([it.inputs for it in items]))
    assert batch.captions.shape == (3, 5)


def test_a_shared_image_gives_the_same_outputs_as_one_copy_per_caption():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(), 12).eval()
    images = torch.randn(2, 3, 32, 32)  # (U, 3, S, S)
    captions = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0], [1, 8, 9, 2]])  # (B, T + 1)
    rows = torch.tensor([1, 0, 1])
    with torch.no_grad():
        shared = model(images, captions, rows=rows)
        copies = model(images[rows], captions)  # (B, 3, S, S)
    torch.testing.assert_close(shared.logits, copies.logits)
