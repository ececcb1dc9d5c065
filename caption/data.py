"""Caption records (COCO captions files or Karpathy split files) and the datasets built on them.

A record is one image with all its reference captions. :class:`CaptionDataset` yields one item per
(image, caption) pair, from the image file through the model transform or from a cached feature
grid; :class:`ImageDataset` yields one item per image (for caching features and decoding). An
unreadable image never stops an epoch: its items are ``None``, a warning names the file once, and
``dataset.skipped`` counts it; the collate functions drop ``None`` items.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from caption.config import ConfigError, DataConfig
from caption.errors import DataError, MissingFileError
from caption.images import ImageError, preprocess
from caption.vocab import PAD_ID, Vocabulary

log = logging.getLogger("caption.data")

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ImageRecord:
    """One image and its reference captions (raw text, annotation order)."""

    image_id: int
    path: Path
    captions: tuple[str, ...]


def load_coco(captions_json: str | Path, images_dir: str | Path) -> list[ImageRecord]:
    """Records of a COCO-format captions file (``captions_train2014.json``), sorted by image id.

    Every image listed gets a record, even one without captions (an ``image_info`` file).
    """
    from pycocotools.coco import COCO

    captions_json, images_dir = Path(captions_json), Path(images_dir)
    if not captions_json.is_file():
        raise MissingFileError(f"captions file not found: {captions_json}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress lines
            coco = COCO(str(captions_json))
    except (ValueError, KeyError, TypeError, AssertionError) as err:
        raise DataError(f"{captions_json}: not a COCO captions file ({type(err).__name__}: {err})") from err
    records = []
    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        anns = coco.imgToAnns.get(image_id, [])  # in the file's annotation order
        captions = tuple(str(a["caption"]).strip() for a in anns if "caption" in a)
        records.append(ImageRecord(int(image_id), images_dir / info["file_name"], captions))
    return records


def load_karpathy(json_path: str | Path, images_root: str | Path, split: str) -> list[ImageRecord]:
    """Records of one split of a Karpathy file (``dataset_coco.json``, ``dataset_flickr8k.json``).

    "train" includes "restval", as the published COCO results do. image_id is ``cocoid`` when
    present (so COCO-format references match), else ``imgid``; path is root/filepath/filename.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got '{split}'")
    json_path, images_root = Path(json_path), Path(images_root)
    if not json_path.is_file():
        raise MissingFileError(f"Karpathy split file not found: {json_path}")
    try:
        images = json.loads(json_path.read_text())["images"]
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{json_path}: not a Karpathy split file ({type(err).__name__}: {err})") from err
    wanted = {"train", "restval"} if split == "train" else {split}
    records = []
    for img in images:
        if img.get("split") not in wanted:
            continue
        image_id = int(img["cocoid"] if img.get("cocoid") is not None else img["imgid"])
        folder = images_root / img["filepath"] if img.get("filepath") else images_root
        captions = tuple(str(s.get("raw", " ".join(s.get("tokens", [])))).strip() for s in img.get("sentences", []))
        records.append(ImageRecord(image_id, folder / img["filename"], captions))
    return sorted(records, key=lambda r: r.image_id)


def _required_file(cfg: DataConfig, name: str) -> Path:
    """The file a config key points to, or a ConfigError naming the key."""
    value = getattr(cfg, name)
    if not value:
        raise ConfigError(f"config key 'data.{name}' is not set (needed with data.format={cfg.format})")
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"config key 'data.{name}': file not found: {path}")
    return path


def load_split(cfg: DataConfig, split: str) -> list[ImageRecord]:
    """Records of the train/val/test split, read as ``cfg.format`` says."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got '{split}'")
    if cfg.format == "coco":
        captions = _required_file(cfg, f"{split}_captions")
    elif cfg.format == "karpathy":
        captions = _required_file(cfg, "karpathy_json")
    else:
        raise ConfigError(f"config key 'data.format' must be 'coco' or 'karpathy', got '{cfg.format}'")
    if not cfg.images:
        raise ConfigError("config key 'data.images' is not set (the image folder)")
    images = Path(cfg.images)
    if not images.is_dir():
        raise ConfigError(f"config key 'data.images': folder not found: {images}")
    if cfg.format == "coco":
        return load_coco(captions, images)
    return load_karpathy(captions, images, split)


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
        self._ids: list[torch.Tensor | None] = [None] * len(self.pairs)  # encoded captions, filled on first use
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
        if self._ids[i] is None:  # tokenised once per caption, not once per epoch
            ids = self.vocab.encode(self.records[index].captions[j], max_len=self.max_len)
            self._ids[i] = torch.tensor(ids, dtype=torch.long)
        return CaptionItem(inputs, self._ids[i], index)


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
