"""End-to-end captioning throughput: a folder of photos -> captions with the shipped model; one JSON line.

Each image goes the whole way ``caption predict`` takes it (JPEG decode, resize, normalise,
EfficientNet-Lite0 encoder, batched beam search at beam 3), through ``CaptionModel.iter_captions``,
so image loading overlaps the model's compute as it does there. Timed at fp32 and at ``auto``
(bf16 where the CPU has bf16 units) by default, after one warm-up batch each; the JSON names the
precision, device and CPU model of each.

    python benchmarks/predict.py [--threads 2] [--images N] [--folder DIR | --photos] [--precision fp32 auto]

The default folder is the first 512 photos of ../shared/data/flickr8k/images (already 224x224);
``--photos`` uses ../shared/data/photos (full-size files, where decoding and resizing cost more),
cycled until there are ``--images`` of them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import torch

from caption.config import PRECISIONS
from caption.data.images import find_images
from caption.inference import load
from caption.runtime import cpu_name, keep_freed_memory

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FLICKR8K = SHARED / "flickr8k" / "images"
PHOTOS = SHARED / "photos"


def _images(folder: Path, n: int, cycle: bool) -> list[Path]:
    paths, errors = find_images([folder])
    if errors:
        raise SystemExit(f"benchmarks/predict.py: {errors[0]}")
    return list(itertools.islice(itertools.cycle(paths), n)) if cycle else paths[:n]


def _run(paths: list[Path], precision: str, args: argparse.Namespace) -> dict:
    model = load(args.checkpoint, device=args.device, precision=precision, threads=args.threads)
    list(model.iter_captions(paths[: args.batch_size], beam=args.beam, batch_size=args.batch_size))  # warm-up
    t0 = time.perf_counter()
    results = list(model.iter_captions(paths, beam=args.beam, batch_size=args.batch_size))
    seconds = time.perf_counter() - t0
    failed = sum(1 for _, r in results if isinstance(r, Exception))
    return {"precision": model.precision.name, "requested": precision, "device": str(model.device),
            "device_name": model.precision.device_name, "images_per_s": round(len(paths) / seconds, 1),
            "seconds": round(seconds, 2), "unreadable": failed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=512, help="how many images (default 512)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--folder", type=Path, default=None, help=f"image folder (default {FLICKR8K})")
    where.add_argument("--photos", action="store_true", help=f"the full-size photos of {PHOTOS}, cycled")
    p.add_argument("--precision", nargs="+", default=["fp32", "auto"], choices=PRECISIONS)
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (caption predict's default)")
    p.add_argument("--checkpoint", default=None, help="default: the shipped model")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    keep_freed_memory()  # as the caption command does
    folder = PHOTOS if args.photos else (args.folder or FLICKR8K)
    paths = _images(folder, args.images, cycle=args.photos)
    runs = [_run(paths, precision, args) for precision in args.precision]
    print(json.dumps({
        "benchmark": "predict",
        "folder": str(folder),
        "images": len(paths),
        "distinct_images": len(set(paths)),
        "beam": args.beam,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "runs": runs,
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }))


if __name__ == "__main__":
    main()
