"""Fit ``caption/assets/people_<encoder>.pt``, the probe that tells photos of people from photos of
objects (:mod:`caption.guidance.people`). Run by hand, once per encoder, after ``caption prepare``:

    caption prepare --config configs/flickr8k.yaml
    python scripts/fit_people_probe.py --cache runs/cache/train-efficientnet_lite0-... \\
        --captions ../shared/data/flickr8k/captions_flickr8k_train.json \\
        [--dev-cache runs/cache/val-... --dev-captions ../shared/data/flickr8k/captions_flickr8k_dev.json]

A photo is labelled "people" when at least 3 of its human captions name a person (a word of
``people_words.txt``, the commonest person words, or their plurals). Prints one JSON line: the
label counts and, with a dev split, its accuracy and how often a people photo is called an object
photo at the guide's threshold.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from caption.config import GuideConfig  # noqa: E402
from caption.guidance.names import PERSON_WORDS, plural, read_people_words  # noqa: E402
from caption.guidance.people import fit_probe, pooled, probe_file  # noqa: E402
from caption.fileio import atomic_write  # noqa: E402
from caption.training.cache import FeatureStore  # noqa: E402


def person_words() -> set[str]:
    words = set(PERSON_WORDS) | set(read_people_words()["person"])
    return words | {plural(w) for w in words}


def labelled(cache: str, captions: Path, words: set[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (N, 2D) and labels (N,) bool: most of the photo's captions name a person."""
    data = json.loads(captions.read_text())
    said: dict[int, list[bool]] = {}
    for a in data["annotations"]:
        said.setdefault(a["image_id"], []).append(bool(words & set(re.findall(r"[a-z]+", a["caption"].lower()))))
    store = FeatureStore(cache)
    ids = [im["id"] for im in data["images"]]
    feats = torch.cat([pooled(store[store.index_of(i)].unsqueeze(0)) for i in ids])  # (N, 2D)
    return feats, torch.tensor([sum(said[i]) >= 3 for i in ids])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True, help="the training split's feature cache (path without suffix)")
    p.add_argument("--captions", type=Path, required=True, help="the training split's captions (COCO format)")
    p.add_argument("--dev-cache")
    p.add_argument("--dev-captions", type=Path)
    p.add_argument("--encoder", default="efficientnet_lite0")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    words = person_words()
    x, y = labelled(args.cache, args.captions, words)
    probe = fit_probe(x, y)
    out = args.out or ROOT / "caption" / "assets" / probe_file(args.encoder)
    atomic_write(out, lambda f: torch.save(probe.state_dict(), f))
    report = {"out": str(out), "train_photos": len(y), "train_people": int(y.sum())}
    if args.dev_cache and args.dev_captions:
        dx, dy = labelled(args.dev_cache, args.dev_captions, words)
        pd = torch.sigmoid(probe.linear(dx).squeeze(1))
        report.update(dev_photos=len(dy), dev_accuracy=round(float(((pd >= 0.5) == dy).float().mean()), 4),
                      dev_people_called_objects=round(float((pd[dy] < GuideConfig().people).float().mean()), 4))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
