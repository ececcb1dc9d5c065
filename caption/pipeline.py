"""The one batched inference path, from images to grid features to captions.

:func:`inference_encoder` builds the encoder as inference runs it (BatchNorm folded,
channels-last, no gradients) and :func:`encode_images` is the batched loop from images to features
(images decoded and resized in worker threads while the model computes, normalised, encoded under
the runtime's precision); the feature cache (:mod:`caption.training.cache`) uses both. Every image
goes through exactly the training preprocessing (:func:`caption.data.images.preprocess`): a
mismatch here is what makes a captioner say the same thing for every image.

:func:`caption_batches` turns encoded batches, from :func:`encode_images` or from a feature cache
(:func:`feature_batches`), into captions: each batch is searched once, without gradients, in the
runtime's precision (:func:`caption_features`), and every input gets its result back in input
order, an unreadable image its :class:`ImageError`. ``caption predict``, ``attend``,
``evaluate`` and ``serve`` (through :meth:`caption.inference.CaptionModel.captions`) and
validation during training all take this path.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, NamedTuple, Sequence, TypeVar

import torch
from torch import nn

from caption.config import DecodeConfig
from caption.data.images import ImageError, ImageTransform, prefetch
from caption.decoding import DecodingResult, decode
from caption.guidance.result import GuidedResult
from caption.guidance.search import guided_decode
from caption.model.fuse import fused_for_inference
from caption.runtime import Runtime
from caption.vocab import Vocabulary

Item = TypeVar("Item")


def inference_encoder(encoder: nn.Module, image_size: int) -> nn.Module:
    """``encoder`` as inference runs it: an eval-mode, no-grad copy with every BatchNorm folded into
    its convolution (:func:`caption.model.fuse.fused_for_inference`), channels-last like the original.
    Training and checkpoints keep the original."""
    return fused_for_inference(encoder, torch.zeros(1, 3, image_size, image_size))


class EncodedBatch(NamedTuple):
    """One batch of :func:`encode_images`: the inputs in order, the features of the readable ones
    and the pixels they were computed from (what guidance's detector looks at)."""

    items: list  # this batch's inputs, in input order
    results: list  # per item: its row of ``features`` (int) or its ImageError
    features: torch.Tensor | None  # (B', L, D) for the B' readable items, None when none was
    pixels: torch.Tensor | None = None  # (B', 3, S, S) uint8 on the CPU; None for cached features

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
    features = pixels = None
    if good:
        pixels = torch.stack(good)  # (B', 3, S, S) uint8
        images = transform.normalize(pixels).to(runtime.device, non_blocking=True)  # (B', 3, S, S)
        with torch.no_grad(), runtime.autocast():
            features = encoder(images)  # (B', L, D)
    return EncodedBatch([item for item, _ in chunk], results, features, pixels)


class Outcome(NamedTuple):
    """One input and what became of it: its caption, or the ImageError that kept it from one."""

    image: object  # the input as given (a path, a PIL image, a record's position...)
    result: DecodingResult | ImageError


def caption_features(decoder: nn.Module, features: torch.Tensor, options: DecodeConfig, *, runtime: Runtime,
                     vocab: Vocabulary | None = None, grid: tuple[int, int] | None = None,
                     guide=None, pixels: torch.Tensor | None = None) -> list[GuidedResult]:
    """Captions of encoded images (B, L, D), searched without gradients in the runtime's precision;
    guided by ``guide`` (:class:`caption.guidance.guide.Guide`, :func:`caption.guidance.search.guided_decode`)
    unless it is None (then each result's ``guide`` is None), its detector looking at ``pixels``
    (B, 3, S, S) where given."""
    with torch.no_grad(), runtime.autocast():
        if guide is not None:
            return guided_decode(decoder, features, options, guide, vocab=vocab, grid=grid, pixels=pixels)
        return [GuidedResult.of(r) for r in decode(decoder, features, options, vocab=vocab, grid=grid)]


def caption_batches(batches: Iterable[EncodedBatch], decoder: nn.Module, options: DecodeConfig, *,
                    runtime: Runtime, vocab: Vocabulary | None = None, grid: tuple[int, int] | None = None,
                    guide=None) -> Iterator[Outcome]:
    """Each batch's inputs, in order, with their captions (:func:`caption_features`) or their
    ImageError; a batch of unreadable images costs no search."""
    for batch in batches:
        found = (caption_features(decoder, batch.features, options, runtime=runtime, vocab=vocab, grid=grid,
                                  guide=guide, pixels=batch.pixels) if batch.features is not None else [])
        for item, r in zip(batch.items, batch.results):
            yield Outcome(item, r if isinstance(r, ImageError) else found[r])


def feature_batches(features, image_ids: Sequence[int], batch_size: int, runtime: Runtime) -> Iterator[EncodedBatch]:
    """Batches of cached feature grids (a FeatureStore) for ``image_ids``, as encode_images would
    yield them: items are positions in ``image_ids``, every one readable."""
    rows = [features.index_of(i) for i in image_ids]
    for lo in range(0, len(rows), batch_size):
        idx = list(range(lo, min(lo + batch_size, len(rows))))
        stacked = torch.stack([features[rows[i]] for i in idx]).to(runtime.device)  # (B, L, D)
        yield EncodedBatch(idx, list(range(len(idx))), stacked)
