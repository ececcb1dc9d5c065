"""Caption records: one image with all its reference captions, from a COCO captions file or a
Karpathy split file, and ``load_split`` that reads a config's train/val/test split."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from caption.config import ConfigError, DataConfig
from caption.errors import DataError, MissingFileError

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
        with json_path.open("rb") as f:
            images = json.load(f, object_hook=_sentence_text)["images"]
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{json_path}: not a Karpathy split file ({type(err).__name__}: {err})") from err
    wanted = {"train", "restval"} if split == "train" else {split}
    records = []
    for img in images:
        if img.get("split") not in wanted:
            continue
        image_id = int(img["cocoid"] if img.get("cocoid") is not None else img["imgid"])
        folder = images_root / img["filepath"] if img.get("filepath") else images_root
        captions = tuple(s.strip() for s in img.get("sentences", []))
        records.append(ImageRecord(image_id, folder / img["filename"], captions))
    return sorted(records, key=lambda r: r.image_id)


def _sentence_text(obj: dict):
    """json object hook: a Karpathy sentence becomes its text ("raw", else its tokens joined), so its token
    lists are dropped as they are read (COCO's file: 14 s and 0.8 GB retained -> 3 s and 0.2 GB)."""
    if "raw" in obj or "tokens" in obj:
        return str(obj.get("raw", " ".join(obj.get("tokens", []))))
    return obj


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
