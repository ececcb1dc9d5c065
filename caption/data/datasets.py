"""The datasets built on caption records.

:class:`CaptionDataset` yields one item per (image, caption) pair, from the image file through
the model transform or from a cached feature grid; :class:`ImageDataset` yields one item per
image (for caching features and decoding). An unreadable image never stops an epoch: its items
are ``None``, a warning names the file once, and ``dataset.skipped`` counts it; the collate
functions drop ``None`` items.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from caption.data.images import ImageError, preprocess
from caption.data.records import ImageRecord
from caption.vocab import PAD_ID, Vocabulary

log = logging.getLogger("caption.data")


class CaptionItem(NamedTuple):
    inputs: torch.Tensor  # (3, S, S) image or (L, D) cached features
    caption: torch.Tensor  # (n + 2,) <start> words <end>
    image_index: int  # position of the image in the records


class CaptionBatch(NamedTuple):
    """B captions of U distinct images: caption b belongs to image ``inputs[rows[b]]``.

    Each image is stacked once however many of its captions the batch holds, so a trained
    encoder runs once per image (see :meth:`CaptionDataset.image_groups`).
    """

    inputs: torch.Tensor  # (U, 3, S, S) or (U, L, D)
    captions: torch.Tensor  # (B, T + 1) padded with PAD_ID
    image_index: torch.Tensor  # (B,) position of each caption's image in the records
    rows: torch.Tensor  # (B,) row of each caption's image in inputs

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) caption lengths including <start> and <end> (PAD_ID never occurs inside a caption)."""
        return (self.captions != PAD_ID).sum(dim=1)


class _SkipsBadImages:
    """Remembers unreadable images: warn once per path, then skip it without retrying."""

    def _init_skips(self) -> None:
        self._bad_paths: set[str] = set()

    @property
    def skipped(self) -> int:
        """Distinct unreadable images met so far (in this process: DataLoader workers count their own)."""
        return len(self._bad_paths)

    def _mark_bad(self, path: Path, reason: str) -> None:
        key = str(path)
        if key not in self._bad_paths:
            self._bad_paths.add(key)
            log.warning("skipping unreadable image %s", reason)

    def _load(self, path: Path, transform, pixels: bool = False) -> torch.Tensor | None:
        if str(path) in self._bad_paths:
            return None
        try:
            return preprocess(path, transform, pixels=pixels)
        except ImageError as err:
            self._mark_bad(path, str(err))
            return None


class CaptionDataset(_SkipsBadImages, Dataset):
    """One item per (image, caption) pair: a :class:`CaptionItem`, or ``None`` if the image is unreadable.

    Give exactly one of ``transform`` (items hold the transformed image, (3, S, S)) or ``features``
    (a FeatureStore built from the same records, items hold its (L, D) float32 grid).
    ``keep_images`` decodes each image once and keeps its uint8 pixels (``transform.pixels``), so
    later epochs only normalise them. Captions are tokenised once, on first use.
    """

    def __init__(self, records: Sequence[ImageRecord], vocab: Vocabulary, *, transform=None, features=None,
                 max_len: int = 50, keep_images: bool = False):
        if (transform is None) == (features is None):
            raise ValueError("CaptionDataset needs exactly one of transform= or features=")
        if features is not None:
            ids = getattr(features, "image_ids", None)
            if ids is not None and list(ids) != [r.image_id for r in records]:
                raise ValueError("the feature store was built from other records (image ids differ)")
        self.records = list(records)
        self.vocab = vocab
        self.transform = transform
        self.features = features
        self.max_len = max_len
        self.pairs = [(i, j) for i, r in enumerate(self.records) for j in range(len(r.captions))]
        # encoded captions, filled on first use; tuples, not tensors: Python's own small-object arenas hold
        # them, where 566k long-lived tensors scattered through malloc's heap kept ~100 KB each of
        # freed feature buffers from being reused (docs/coco.md: +3.3 MB per batch)
        self._ids: list[tuple[int, ...] | None] = [None] * len(self.pairs)
        self._pixels: dict[int, torch.Tensor] | None = {} if keep_images and transform is not None else None
        self._init_skips()

    def __len__(self) -> int:
        return len(self.pairs)

    def image_groups(self) -> list[list[int]]:
        """Item indices grouped by image (every caption of image i), in record order."""
        groups: list[list[int]] = [[] for _ in self.records]
        for item, (index, _) in enumerate(self.pairs):
            groups[index].append(item)
        return groups

    def _inputs(self, index: int) -> torch.Tensor | None:
        record = self.records[index]
        if self.features is None:
            return self._image(index, record.path)
        if record.image_id in getattr(self.features, "bad", ()):
            self._mark_bad(record.path, f"{record.path}: unreadable when the feature cache was built")
            return None
        return self.features[index]

    def _image(self, index: int, path: Path) -> torch.Tensor | None:
        """The transformed image; with ``keep_images`` decoded once and normalised from uint8."""
        if self._pixels is None:
            return self._load(path, self.transform)
        if index not in self._pixels:
            pixels = self._load(path, self.transform, pixels=True)  # (3, S, S) uint8
            if pixels is None:
                return None
            self._pixels[index] = pixels
        return self.transform.normalize(self._pixels[index])

    def __getitem__(self, i: int) -> CaptionItem | None:
        index, j = self.pairs[i]
        inputs = self._inputs(index)
        if inputs is None:
            return None
        ids = self._ids[i]
        if ids is None:  # tokenised once per caption, not once per epoch
            ids = self._ids[i] = tuple(self.vocab.encode(self.records[index].captions[j], max_len=self.max_len))
        return CaptionItem(inputs, torch.tensor(ids, dtype=torch.long), index)


class ImageDataset(_SkipsBadImages, Dataset):
    """One item per image: ``(tensor (3, S, S), index)``, or ``None`` if the image is unreadable."""

    def __init__(self, records: Sequence[ImageRecord], transform):
        self.records = list(records)
        self.transform = transform
        self._init_skips()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        image = self._load(self.records[i].path, self.transform)
        return None if image is None else (image, i)


def collate_captions(items: Sequence[CaptionItem | None]) -> CaptionBatch | None:
    """Stack each distinct image once and pad captions with PAD_ID, dropping ``None`` items;
    ``None`` if all were bad."""
    items = [item for item in items if item is not None]
    if not items:
        return None
    first: dict[int, int] = {}  # image index -> its row in inputs
    rows = [first.setdefault(item.image_index, len(first)) for item in items]
    unique = {item.image_index: item.inputs for item in reversed(items)}  # any copy: all are the same image
    inputs = torch.stack([unique[index] for index in first])  # (U, 3, S, S) or (U, L, D)
    captions = pad_sequence([item.caption for item in items], batch_first=True, padding_value=PAD_ID)  # (B, T+1)
    index = torch.tensor([item.image_index for item in items], dtype=torch.long)  # (B,)
    return CaptionBatch(inputs, captions, index, torch.tensor(rows, dtype=torch.long))


def collate_images(items: Sequence[tuple[torch.Tensor, int] | None]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(images (B, 3, S, S), indices (B,))`` of the readable items; ``None`` if none were."""
    items = [item for item in items if item is not None]
    if not items:
        return None
    images = torch.stack([image for image, _ in items])  # (B, 3, S, S)
    return images, torch.tensor([i for _, i in items], dtype=torch.long)
