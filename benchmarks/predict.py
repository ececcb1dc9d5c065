"""End-to-end captioning throughput: a folder of photos -> captions with the shipped model; one JSON line.

Each image goes the whole way ``caption predict`` takes it (JPEG decode, resize, normalise,
EfficientNet-Lite0 encoder, batched beam search at beam 3), through ``CaptionModel.captions``,
so image loading overlaps the model's compute as it does there. Timed at fp32 and at ``auto``
(bf16 where the CPU has bf16 units) by default, after one warm-up batch each; the JSON names the
precision, device and CPU model of each. Each precision is timed with the ImageNet classifier's
guidance (the default) and without it (``--no-guide``), ``--repeats`` times each, alternated
(guided, unguided, guided, ...) so that both see the same machine; ``guide_cost`` is how much
slower guided captioning is (1 - guided / unguided, medians).

    python benchmarks/predict.py [--threads 2] [--images N] [--folder DIR | --photos] [--precision fp32 auto]
                                 [--guide both|on|off] [--repeats R]

The default folder is the first 512 photos of ../shared/data/flickr8k/images (already 224x224);
``--photos`` uses ../shared/data/photos (full-size files, where decoding and resizing cost more),
cycled until there are ``--images`` of them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
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


def _time(model, paths: list[Path], guide: bool, args: argparse.Namespace) -> tuple[float, int]:
    """Seconds to caption ``paths`` (guided or not) and how many could not be read."""
    t0 = time.perf_counter()
    results = list(model.configured(beam=args.beam, guide=guide).captions(paths, batch_size=args.batch_size))
    return time.perf_counter() - t0, sum(1 for _, r in results if isinstance(r, Exception))


def _run(paths: list[Path], precision: str, args: argparse.Namespace) -> list[dict]:
    """One entry per guide setting: images/s (median over ``--repeats`` alternated runs) and every run's."""
    model = load(args.checkpoint, device=args.device, precision=precision, threads=args.threads)
    guides = {"both": [True, False], "on": [True], "off": [False]}[args.guide]
    if True in guides and model.guide is None:
        print(f"benchmarks/predict.py: guidance off: {model.guide_off}", file=sys.stderr)
        guides = [False]
    for guide in guides:  # warm-up
        list(model.configured(beam=args.beam, guide=guide).captions(paths[: args.batch_size], batch_size=args.batch_size))
    seconds: dict[bool, list[float]] = {g: [] for g in guides}
    failed = 0
    for _ in range(args.repeats):
        for guide in guides:
            s, failed = _time(model, paths, guide, args)
            seconds[guide].append(s)
    return [{"precision": model.precision.name, "requested": precision, "guide": guide, "device": str(model.device),
             "device_name": model.precision.device_name,
             "images_per_s": round(len(paths) / statistics.median(runs), 1),
             "images_per_s_runs": [round(len(paths) / s, 1) for s in runs],
             "seconds": round(statistics.median(runs), 2), "unreadable": failed}
            for guide, runs in seconds.items()]


def _cost(runs: list[dict]) -> dict:
    """Per precision: 1 - guided / unguided images/s (medians), where both were timed."""
    by = {(r["precision"], r["guide"]): r["images_per_s"] for r in runs}
    return {p: round(1 - by[(p, True)] / by[(p, False)], 3) for p, g in by if g and (p, False) in by}


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
    p.add_argument("--checkpoint", nargs="+", default=None, help="default: the shipped model; several: an ensemble")
    p.add_argument("--guide", default="both", choices=("both", "on", "off"),
                   help="time captioning with the classifier's guidance, without it, or both alternated (default)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per precision and guide setting (default 1)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    keep_freed_memory()  # as the caption command does
    folder = PHOTOS if args.photos else (args.folder or FLICKR8K)
    paths = _images(folder, args.images, cycle=args.photos)
    runs = [run for precision in args.precision for run in _run(paths, precision, args)]
    print(json.dumps({
        "benchmark": "predict",
        "folder": str(folder),
        "images": len(paths),
        "distinct_images": len(set(paths)),
        "beam": args.beam,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "runs": runs,
        "guide_cost": _cost(runs),
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }))


if __name__ == "__main__":
    main()
