"""From images to grid features, the one path every caller takes: :func:`inference_encoder` builds the
encoder as inference runs it (BatchNorm folded, channels-last, no gradients) and :func:`encode_images`
is the batched loop (images decoded and resized in worker threads while the model computes,
normalised, encoded under the runtime's precision).

``caption.load`` (:class:`caption.inference.CaptionModel`), ``caption evaluate``
(:mod:`caption.evaluation.scoring`) and the feature cache (:mod:`caption.training.cache`) all use
them. Every image goes through exactly the training preprocessing
(:func:`caption.data.images.preprocess`): a mismatch here is what makes a captioner say the same
thing for every image.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, NamedTuple, Sequence, TypeVar

import torch
from torch import nn

from caption.data.images import ImageError, ImageTransform, prefetch
from caption.model.fuse import fused_for_inference
from caption.runtime import Runtime

Item = TypeVar("Item")


def inference_encoder(encoder: nn.Module, image_size: int) -> nn.Module:
    """``encoder`` as inference runs it: an eval-mode, no-grad copy with every BatchNorm folded into
    its convolution (:func:`caption.model.fuse.fused_for_inference`), channels-last like the original.
    Training and checkpoints keep the original."""
    return fused_for_inference(encoder, torch.zeros(1, 3, image_size, image_size))


class EncodedBatch(NamedTuple):
    """One batch of :func:`encode_images`: the inputs in order, the features of the readable ones."""

    items: list  # this batch's inputs, in input order
    results: list  # per item: its row of ``features`` (int) or its ImageError
    features: torch.Tensor | None  # (B', L, D) for the B' readable items, None when none was

    def rows(self) -> list[int]:
        """Positions in ``items`` of the feature rows, in row order."""
        return [i for i, r in enumerate(self.results) if not isinstance(r, ImageError)]


def encode_images(encoder: nn.Module, items: Iterable[Item], pixels: Callable[[Item], torch.Tensor],
                  transform: ImageTransform, runtime: Runtime, *, batch_size: int = 16) -> Iterator[EncodedBatch]:
    """The batched loop from images to features: ``pixels(item)`` (uint8 (3, S, S), or an ImageError)
    runs in worker threads ahead of the model; each batch of ``batch_size`` items is normalised, moved
    to the runtime's device and encoded in its precision, without gradients. Unreadable items keep
    their place in the batch as their ImageError."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunk: list = []
    for loaded in prefetch(items, pixels, ahead=2 * batch_size):
        chunk.append(loaded)
        if len(chunk) == batch_size:
            yield _encode_chunk(encoder, chunk, transform, runtime)
            chunk = []
    if chunk:
        yield _encode_chunk(encoder, chunk, transform, runtime)


def _encode_chunk(encoder: nn.Module, chunk: Sequence[tuple], transform: ImageTransform,
                  runtime: Runtime) -> EncodedBatch:
    """(item, uint8 pixels or ImageError) pairs -> their EncodedBatch."""
    results: list = []
    good: list[torch.Tensor] = []
    for _, p in chunk:
        results.append(p if isinstance(p, ImageError) else len(good))
        if not isinstance(p, ImageError):
            good.append(p)
    features = None
    if good:
        images = transform.normalize(torch.stack(good)).to(runtime.device, non_blocking=True)  # (B', 3, S, S)
        with torch.no_grad(), runtime.autocast():
            features = encoder(images)  # (B', L, D)
    return EncodedBatch([item for item, _ in chunk], results, features)
