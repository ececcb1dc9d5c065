"""Cost of the COCO detector (caption.guidance.detector) on the pixels the captioner already has; one JSON line.

The photos are loaded as ``caption predict`` loads them (resized to 224x224 uint8 RGB) before any
timing, so the figures are the detector alone: OpenCV's resize to the blob and the forward pass.
Sets: the first --images Flickr8k photos (already 224x224) and the 14 full-size shared photos
(0.17-1.2 MP) resized to 224, cycled to --images. For every thread count x batch size x blob side:
images/s and wall ms per image, plus CPU ms per image (process CPU time: the machine may be shared).
``detections`` lists, per shared photo and blob side, what is found at 0.3 or above (label, score).

    python benchmarks/detector.py [--threads 1 2] [--batch 1 16] [--sizes 300 224] [--images 32]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from caption.data.images import find_images, image_transform, preprocess
from caption.guidance.detector import BLOB_SIZE, load_detector
from caption.runtime import cpu_name

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FLICKR8K = SHARED / "flickr8k" / "images"
PHOTOS = SHARED / "photos"
SIZE = 224  # the shipped model's image size


def _pixels(paths: list[Path]) -> torch.Tensor:
    """uint8 RGB (N, 3, 224, 224), the way the captioner resizes photos."""
    transform = image_transform(SIZE, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    return torch.stack([preprocess(p, transform, pixels=True) for p in paths])


def _run(detector, pixels: torch.Tensor, batch: int) -> dict:
    """Detect over ``pixels`` in batches of ``batch`` after one warm-up batch; rates per image."""
    detector(pixels[:batch])
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(0, len(pixels), batch):
        detector(pixels[start:start + batch])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    n = len(pixels)
    return {"images_per_s": round(n / wall, 2), "ms_per_image": round(1000 * wall / n, 1),
            "cpu_ms_per_image": round(1000 * cpu / n, 1)}


def _detections(sizes: list[int], photos: list[Path], pixels: torch.Tensor) -> dict:
    """Per shared photo and blob side: [[label, score], ...] at the default minimum score."""
    out: dict[str, dict[str, list]] = {p.name: {} for p in photos}
    for size in sizes:
        detector, reason = load_detector(threads=2, size=size)
        if detector is None:
            raise SystemExit(reason)
        for path, found in zip(photos, detector(pixels)):
            out[path.name][str(size)] = [[d.label, round(d.score, 2)] for d in found]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--sizes", type=int, nargs="+", default=[BLOB_SIZE, 224], help="blob sides to try")
    p.add_argument("--images", type=int, default=32, help="photos per set (the shared photos are cycled)")
    p.add_argument("--flickr", type=Path, default=FLICKR8K)
    p.add_argument("--photos", type=Path, default=PHOTOS)
    args = p.parse_args()
    flickr = sorted(find_images([args.flickr])[0])[:args.images]
    photos = sorted(find_images([args.photos])[0])
    sets = {"flickr8k_224": _pixels(flickr), "photos_full_size_to_224": _pixels(photos)}
    sets["photos_full_size_to_224"] = sets["photos_full_size_to_224"][
        [i % len(photos) for i in range(args.images)]]
    runs = []
    for size, threads, batch, (name, pixels) in itertools.product(args.sizes, args.threads, args.batch, sets.items()):
        detector, reason = load_detector(threads=threads, size=size)
        if detector is None:
            raise SystemExit(reason)
        runs.append({"set": name, "blob": size, "threads": threads, "batch": batch, "images": len(pixels),
                     **_run(detector, pixels, batch)})
    import cv2

    print(json.dumps({"cpu": cpu_name(), "opencv": cv2.__version__, "input": f"uint8 RGB {SIZE}x{SIZE}",
                      "runs": runs, "detections": _detections(args.sizes, photos, _pixels(photos))}))


if __name__ == "__main__":
    main()
