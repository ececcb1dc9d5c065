"""Does attention point at what a word names? Measured on any photos, with the COCO detector's boxes.

For every caption word that names a COCO category (the one table of
:func:`caption.guidance.grounding.coco_words`) which the detector finds in that photo at
``min_score`` (run on the photo at full size), the word's attention map is compared with the
category's cells (:func:`caption.guidance.grounding.cell_masks`), as Liu et al. 2017 ("attention
correctness") and the grounding-accuracy papers (Zhou et al. 2020, Ma et al. 2020) do:

- ``mass``: the attention weight on cells inside the boxes;
- ``peak``: whether the most-attended cell is inside;
- ``entropy``: the map's entropy in nats (log L is a flat map: 3.89 on a 7×7 grid).

Each comes with two baselines. ``uniform``: a flat map, whose mass is the share of cells inside
(and its peak, taken as a random cell, the same share). ``fixed``: one photo-blind map for every word,
the model's own mean map over every word of every caption measured, which holds its centre bias; a
map that points beats both. ``small`` repeats the figures for boxes under a quarter of the grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from caption.data.images import ImageError, load_image
from caption.decoding.results import map_entropy
from caption.guidance.grounding import LABEL_IDS, MIN_SCORE, cell_masks, coco_words, detect_full_size

SMALL = 0.25  # a box is small under this share of the grid's cells


@dataclass
class Pointed:
    """One grounded word: its map and its object's cells."""

    label: str
    alphas: torch.Tensor  # (L,) the word's attention map
    inside: torch.Tensor  # (L,) bool, the cells of its category's boxes


@dataclass
class PointingReport:
    """Pointing over all grounded words and per COCO category; every figure is a mean over words."""

    words: int
    images: int
    overall: dict
    categories: dict[str, dict] = field(default_factory=dict)
    small: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"words": self.words, "images": self.images, **self.overall, "small_boxes": self.small,
                "categories": self.categories}


def grounded_words(words: Sequence[str], alphas: torch.Tensor, masks: dict[int, torch.Tensor],
                   table: dict[str, str]) -> list[Pointed]:
    """The words of one caption that name a category with boxes in its photo; ``alphas`` (T, gh, gw)."""
    found = []
    for t, word in enumerate(words):
        label = table.get(word)
        cls = LABEL_IDS[label] if label else 0
        if cls in masks:
            found.append(Pointed(label, alphas[t].flatten().float(), masks[cls]))  # (L,)
    return found


def summarise(pointed: Sequence[Pointed], mean_map: torch.Tensor) -> dict:
    """The figures of a group of grounded words against both baselines."""
    if not pointed:
        return {"words": 0}
    maps = torch.stack([p.alphas for p in pointed])  # (N, L)
    inside = torch.stack([p.inside for p in pointed]).float()  # (N, L)
    share = inside.mean(1)
    fixed = mean_map.unsqueeze(0).expand_as(maps)  # (N, L)

    def peak(m: torch.Tensor) -> float:
        return float(inside.gather(1, m.argmax(1, keepdim=True)).mean())

    return {"words": len(pointed),
            "mass": round(float((maps * inside).sum(1).mean()), 4),
            "mass_fixed": round(float((fixed * inside).sum(1).mean()), 4),
            "mass_uniform": round(float(share.mean()), 4),
            "peak": round(peak(maps), 4), "peak_fixed": round(peak(fixed), 4),
            "peak_uniform": round(float(share.mean()), 4),
            "entropy": round(float(map_entropy(maps).mean()), 4),
            "entropy_uniform": round(math.log(maps.shape[1]), 4)}


def measure_pointing(model, paths: Sequence, detector, *, min_score: float = MIN_SCORE, batch_size: int = 16,
                     progress: Iterable | None = None) -> PointingReport:
    """Caption ``paths`` with ``model`` (a :class:`caption.inference.CaptionModel`), detect at full size,
    and measure where the words that name detected objects attend."""
    table = coco_words()
    pointed: list[Pointed] = []
    map_sum, map_count, images = None, 0, 0
    outcomes = model.captions(list(paths), batch_size=batch_size)
    for start in range(0, len(paths), batch_size):
        chunk = [next(outcomes) for _ in paths[start:start + batch_size]]
        good = [o for o in chunk if not isinstance(o.result, ImageError)]
        photos = [load_image(o.image) for o in good]
        for outcome, found in zip(good, detect_full_size(detector, photos)):
            result = outcome.result
            alphas = result.alphas.float()  # (T, gh, gw)
            masks = cell_masks(found, tuple(alphas.shape[1:]), min_score)
            pointed += grounded_words(result.words, alphas, masks, table)
            flat = alphas.flatten(1)  # (T, L)
            map_sum = flat.sum(0) if map_sum is None else map_sum + flat.sum(0)
            map_count += len(flat)
            images += 1
        if progress is not None:
            progress.update(len(chunk))
    if map_sum is None:
        return PointingReport(0, 0, {"words": 0})
    mean_map = map_sum / map_count  # (L,)
    labels = sorted({p.label for p in pointed})
    small = [p for p in pointed if float(p.inside.float().mean()) < SMALL]
    return PointingReport(len(pointed), images, summarise(pointed, mean_map),
                          {label: summarise([p for p in pointed if p.label == label], mean_map) for label in labels},
                          summarise(small, mean_map))
