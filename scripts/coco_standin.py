"""A stand-in for MS-COCO's Karpathy split at COCO's sizes, for sizing the pipeline, not a dataset.

COCO's images cannot be fetched here, but what the pipeline costs (the vocabulary, the feature
cache, training, evaluation, self-critical training) depends on counts and sizes, not on what the
photos show. This writes 123,287 entries (113,287 train / 5,000 val / 5,000 test, as Karpathy's
``dataset_coco.json``) that reuse real photos under new ids, each with that photo's own captions
(5 per entry, cycled where a photo has fewer):

    python scripts/coco_standin.py --images ../shared/data/flickr8k/images \\
        --captions ../shared/data/flickr8k/captions_flickr8k_train.json --out /tmp/coco_standin
    caption prepare --config configs/coco.yaml data.karpathy_json=/tmp/coco_standin/dataset_coco.json \\
        data.images=/tmp/coco_standin

``--out`` gets ``dataset_coco.json`` (Karpathy format, ``filepath`` "images"), the same splits in
COCO captions format (``captions_{train,val,test}.json``, for ``data.format: coco`` or
``caption evaluate --captions``) and ``images/``, one symbolic link per entry to its photo.
``--n`` writes fewer entries, with val and test scaled in proportion (at least 2 each).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

COCO_SIZES = {"train": 113_287, "val": 5_000, "test": 5_000}  # Karpathy's split ("restval" counted as train)
CAPTIONS_PER_IMAGE = 5


def split_sizes(n: int) -> dict[str, int]:
    """Entries per split for ``n`` entries in all: COCO's own at full size, else in proportion."""
    full = sum(COCO_SIZES.values())
    if n >= full:
        return dict(COCO_SIZES)
    held = max(2, round(n * COCO_SIZES["val"] / full))
    if n < 2 * held + 1:
        raise ValueError(f"--n {n} is too small: at least {2 * held + 1} entries are needed")
    return {"train": n - 2 * held, "val": held, "test": held}


def read_sources(captions_json: Path, images: Path) -> list[tuple[Path, list[str]]]:
    """(photo, its captions) for every photo of a COCO captions file that has captions, in id order."""
    data = json.loads(captions_json.read_text())
    texts: dict[int, list[str]] = {}
    for ann in data["annotations"]:
        texts.setdefault(int(ann["image_id"]), []).append(str(ann["caption"]).strip())
    sources = [(images / img["file_name"], texts[int(img["id"])]) for img in sorted(data["images"], key=lambda i: i["id"])
               if texts.get(int(img["id"]))]
    if not sources:
        raise ValueError(f"{captions_json}: no image with captions")
    return sources


def _atomic_json(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def write_standin(sources: list[tuple[Path, list[str]]], out: Path, n: int) -> dict[str, int]:
    """The stand-in of ``n`` entries in ``out`` (see the module docstring); returns the split sizes."""
    sizes = split_sizes(n)
    (out / "images").mkdir(parents=True, exist_ok=True)
    karpathy: list[dict] = []
    coco = {split: {"images": [], "annotations": []} for split in sizes}
    order = [split for split, count in sizes.items() for _ in range(count)]
    sent_id = 0
    for index, split in enumerate(order):
        photo, texts = sources[index % len(sources)]
        coco_id, name = index + 1, f"{index + 1:012d}{photo.suffix.lower()}"
        link = out / "images" / name
        if not link.is_symlink():
            link.symlink_to(photo.resolve())
        captions = [texts[k % len(texts)] for k in range(CAPTIONS_PER_IMAGE)]
        sentences = [{"tokens": c.lower().split(), "raw": c, "imgid": index, "sentid": sent_id + k}
                     for k, c in enumerate(captions)]
        karpathy.append({"filepath": "images", "filename": name, "imgid": index, "split": split, "cocoid": coco_id,
                         "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
        coco[split]["images"].append({"id": coco_id, "file_name": name})
        coco[split]["annotations"] += [{"id": s["sentid"], "image_id": coco_id, "caption": s["raw"]} for s in sentences]
        sent_id += len(sentences)
    _atomic_json({"images": karpathy, "dataset": "coco"}, out / "dataset_coco.json")
    for split, data in coco.items():
        _atomic_json(data, out / f"captions_{split}.json")
    return sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", required=True, type=Path, help="folder of the photos the captions file names")
    p.add_argument("--captions", required=True, type=Path, help="a COCO-format captions file of those photos")
    p.add_argument("--out", required=True, type=Path, help="folder to write the stand-in into")
    p.add_argument("--n", type=int, default=sum(COCO_SIZES.values()), help="entries in all (default: COCO's 123,287)")
    args = p.parse_args(argv)
    try:
        sources = read_sources(args.captions, args.images)
        sizes = write_standin(sources, args.out, args.n)
    except (OSError, ValueError, KeyError) as err:
        print(f"coco_standin: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(args.out), "photos_reused": len(sources), **sizes,
                      "captions": CAPTIONS_PER_IMAGE * sum(sizes.values())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
