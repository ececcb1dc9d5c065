"""Self-critical training throughput on cached features, with the shipped Flickr8k model; prints one JSON line.

A step as ``caption train --config configs/flickr8k_scst.yaml`` runs it: B=32 training images, K=5
captions sampled per image through the decoder's step (eval mode, at most ``scst_max_len`` tokens),
CIDEr-D of every sample against the image's references (document frequencies over the references of
the images used), the mean-of-others baseline, backward and an AdamW step. The features are the
shipped model's (EfficientNet-Lite0, 7x7 grid, D=1280) of the first ``--images`` Flickr8k training
photos, encoded once before timing; the samples are the shipped decoder's, so their lengths are a
trained model's. ``images_per_cpu_s`` divides by the process's CPU time (all threads), which other
jobs on the machine change far less than the wall time.

    python benchmarks/scst.py [--threads 2] [--precision auto] [--steps 5] [--images 256]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import caption
from caption.config import PRECISIONS, load_config
from caption.data.images import preprocess
from caption.data.records import load_coco
from caption.pipeline import encode_images
from caption.runtime import cpu_name, keep_freed_memory
from caption.training.distributed import Dist
from caption.training.loop import adamw
from caption.training.scst import SelfCritical

ROOT = Path(__file__).resolve().parents[1]
FLICKR8K = ROOT.parent / "shared" / "data" / "flickr8k"


class _Store:
    """Cached features as SCST reads them (FeatureStore's ``[i]`` and ``bad``)."""

    def __init__(self, data: torch.Tensor):
        self.data, self.bad = data, set()

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


def _split(model, n: int) -> SimpleNamespace:
    """The first ``n`` training photos' records and features (B, L, D), encoded once."""
    records = load_coco(FLICKR8K / "captions_flickr8k_train.json", FLICKR8K / "images")[:n]
    pixels = functools.partial(preprocess, transform=model.transform, pixels=True)
    batches = encode_images(model.encoder, [r.path for r in records], pixels, model.transform, model.runtime,
                            batch_size=32)
    features = torch.cat([batch.features.float() for batch in batches])  # (n, L, D)
    return SimpleNamespace(records=records, features=_Store(features))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    p.add_argument("--images", type=int, default=256, help="training photos the batches are drawn from")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    keep_freed_memory()  # as the caption command does
    model = caption.load(device=args.device, precision=args.precision, threads=args.threads)
    runtime, B = model.runtime, 32
    cfg = load_config(ROOT / "configs" / "flickr8k_scst.yaml")
    split = _split(model, args.images)
    objective = SelfCritical(cfg, model.vocab, split)
    captioner = model.model.train()
    optim = adamw(captioner.decoder.parameters(), lr=cfg.train.lr)
    dist, gen = Dist(0, 1, runtime.device), torch.Generator().manual_seed(0)
    words = []

    def step() -> None:
        index = torch.randint(0, args.images, (B,), generator=gen)
        with runtime.autocast():
            result = objective.step(captioner, (split.features.data[index].to(runtime.device), index), dist)
        optim.zero_grad(set_to_none=True)
        result.loss.backward()
        optim.step()
        words.append(result.metrics["sample_words"][0] / result.metrics["sample_words"][1])

    step()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step()
    seconds, cpu = (time.perf_counter() - t0) / args.steps, (time.process_time() - c0) / args.steps
    print(json.dumps({
        "benchmark": "scst", "threads": runtime.threads, "images_per_s": round(B / seconds, 1),
        "sampled_captions_per_s": round(B * cfg.train.scst_samples / seconds, 1), "seconds_per_step": round(seconds, 3),
        "images_per_cpu_s": round(B / cpu, 1),  # CPU time of all threads: steadier than wall time beside other jobs
        "mean_sample_words": round(sum(words[1:]) / max(len(words) - 1, 1), 2),
        "shapes": {"B": B, "K": cfg.train.scst_samples, "max_len": cfg.train.scst_max_len, "L": 49, "D": 1280,
                   "V": len(model.vocab)},
        "precision": runtime.precision.name, "requested": runtime.precision.requested, "device": str(runtime.device),
        "cpu": cpu_name(), "torch": torch.__version__, "load_average": [round(x, 2) for x in os.getloadavg()],
    }))


if __name__ == "__main__":
    main()
