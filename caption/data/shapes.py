"""The built-in "shapes" world: a small synthetic data set in which attention can be scored.

Each image shows 1-3 non-overlapping shapes (circle, square, triangle) in 5 colours (red,
green, blue, yellow, purple) on a white background; every colour+shape pair appears at most
once per image. Objects are ``image_size/6`` to ``image_size/3`` pixels wide (16-32 px at 96).
Two or three objects are laid out along one axis with a clear gap between their boxes, and
each consecutive pair's centre offset along that axis is at least 1.5x the offset across it,
so the spatial relation is never in doubt.

Caption grammar (``O`` = "COLOUR SHAPE"; 5 captions per image, all true):

- one object: "a O" | "there is a O" | "a single O" | "a O on a white background" |
  "the picture shows a O"
- two objects, ``R`` in {above, below, under, to the left of, to the right of}: "a O1 R a O2" |
  "there is a O1 R a O2" | "a O1 is R a O2" | "a O2 R' a O1" | "the picture shows a O1 R a O2"
  (``R'`` is the inverse relation; captions 1 and 4 name the objects in opposite orders, the
  others in a random order; "under" replaces "below" at random)
- three objects, listed in spatial order, ``D`` in {left to right, right to left, top to
  bottom, bottom to top}: "a O1, a O2 and a O3 from D" | "from D there is a O1, a O2 and a O3"
  | "a O1 R a O2 R a O3" | "the picture shows a O1, a O2 and a O3 from D" |
  "a O1, then a O2, then a O3 from D"

Scoring reads a caption as a list of mentioned objects (a colour word directly followed by a
shape word) and one relation that holds between each mentioned object and the next: "from
left to right" means "left of", "from top to bottom" means "above", "under" means "below".
Relation P->Q is true when Q's box centre lies on the named side of P's along the dominant
axis of their offset (image y grows downwards). The vocabulary is the 30 words in ``WORDS``.
Pointing needs an attention grid of at least 6x6 (cells no wider than the smallest object), so
that every object holds a cell centre, and the whole image (no crop) under the grid.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from caption.errors import DataError
from caption.fileio import atomic_write_json

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 0),
    "purple": (140, 50, 180),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("above", "below", "left of", "right of")
WORDS = tuple(sorted(set(COLORS) | set(SHAPES) | {
    "a", "there", "is", "single", "on", "white", "background", "the", "picture", "shows",
    "above", "below", "under", "to", "left", "right", "of", "from", "top", "bottom", "and", "then",
}))
BACKGROUND = (255, 255, 255)
DEFAULT_SPLITS = (("train", 0.8), ("val", 0.1), ("test", 0.1))
_INVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
_SAY = {"above": "above", "below": "below", "left of": "to the left of", "right of": "to the right of"}
_DIRECTION = {"left of": "left to right", "right of": "right to left",
              "above": "top to bottom", "below": "bottom to top"}
RELATION_PHRASES = (  # token sequences naming a relation, longest first
    (("to", "the", "left", "of"), "left of"), (("to", "the", "right", "of"), "right of"),
    (("from", "left", "to", "right"), "left of"), (("from", "right", "to", "left"), "right of"),
    (("from", "top", "to", "bottom"), "above"), (("from", "bottom", "to", "top"), "below"),
    (("left", "of"), "left of"), (("right", "of"), "right of"),
    (("above",), "above"), (("below",), "below"), (("under",), "below"),
)
_DOMINANCE = 1.5  # generated layouts: along-axis centre offset >= 1.5x the across-axis offset
_FORMAT_VERSION = 1


# ---------------------------------------------------------------- generation


def _layout(rng: np.random.Generator, k: int, size: int) -> tuple[list[list[int]], str | None]:
    """Boxes ``[x, y, s, s]`` for k objects in spatial order, and the relation each bears to the next."""
    smin, smax = round(size / 6), round(size / 3)
    margin, gap = max(2, size // 48), max(4, size // 16)
    for _ in range(10_000):
        sizes = rng.integers(smin, smax + 1, size=k)
        free = size - 2 * margin - int(sizes.sum()) - (k - 1) * gap
        if free < 0:
            continue
        cuts = np.sort(rng.integers(0, free + 1, size=k))
        along = [margin + int(cuts[0])]
        for i in range(1, k):
            along.append(along[-1] + int(sizes[i - 1]) + gap + int(cuts[i] - cuts[i - 1]))
        across = [int(rng.integers(margin, size - margin - s + 1)) for s in sizes]
        centre_a = [p + s / 2 for p, s in zip(along, sizes)]
        centre_c = [p + s / 2 for p, s in zip(across, sizes)]
        if all(_DOMINANCE * abs(centre_c[i + 1] - centre_c[i]) <= centre_a[i + 1] - centre_a[i]
               for i in range(k - 1)):
            horizontal = bool(rng.integers(2))
            boxes = [[a, c, int(s), int(s)] if horizontal else [c, a, int(s), int(s)]
                     for a, c, s in zip(along, across, sizes)]
            relation = None if k == 1 else ("left of" if horizontal else "above")
            return boxes, relation
    raise RuntimeError(f"could not place {k} objects in a {size}px image")


def _draw(objects: list[dict], size: int) -> Image.Image:
    """Render objects (colour, shape, bbox) on the white background."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        x, y, w, h = obj["bbox"]
        fill = COLORS[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse([x, y, x + w - 1, y + h - 1], fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle([x, y, x + w - 1, y + h - 1], fill=fill)
        else:
            draw.polygon([(x + (w - 1) / 2, y), (x, y + h - 1), (x + w - 1, y + h - 1)], fill=fill)
    return image


def _captions(rng: np.random.Generator, names: list[str], relation: str | None) -> list[str]:
    """Five true captions for objects named in spatial order (each bears ``relation`` to the next)."""
    if relation is None:
        o = names[0]
        return [f"a {o}", f"there is a {o}", f"a single {o}", f"a {o} on a white background",
                f"the picture shows a {o}"]

    def order(forward: bool) -> tuple[list[str], str]:
        return (names, relation) if forward else (names[::-1], _INVERSE[relation])

    def say(rel: str) -> str:
        return "under" if rel == "below" and rng.integers(2) else _SAY[rel]

    first = bool(rng.integers(2))  # captions 1 and 4 describe the scene in opposite orders
    forwards = [first, bool(rng.integers(2)), bool(rng.integers(2)), not first, bool(rng.integers(2))]
    if len(names) == 2:
        templates = ("a {0} {r} a {1}", "there is a {0} {r} a {1}", "a {0} is {r} a {1}",
                     "a {0} {r} a {1}", "the picture shows a {0} {r} a {1}")
    else:
        templates = ("a {0}, a {1} and a {2} from {d}", "from {d} there is a {0}, a {1} and a {2}",
                     "a {0} {r} a {1} {r} a {2}", "the picture shows a {0}, a {1} and a {2} from {d}",
                     "a {0}, then a {1}, then a {2} from {d}")
    out = []
    for template, forward in zip(templates, forwards):
        ordered, rel = order(forward)
        out.append(template.format(*ordered, d=_DIRECTION[rel], r=say(rel)))
    return out


def make_example(seed: int, index: int, image_size: int = 96) -> tuple[Image.Image, list[dict], list[str]]:
    """Image, objects and 5 captions of example ``index``; depends only on (seed, index, size)."""
    rng = np.random.default_rng([seed, index, image_size])
    k = int(rng.integers(1, 4))
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    chosen = [pairs[i] for i in rng.choice(len(pairs), size=k, replace=False)]
    boxes, relation = _layout(rng, k, image_size)
    objects = [{"color": c, "shape": s, "bbox": b} for (c, s), b in zip(chosen, boxes)]
    captions = _captions(rng, [f"{c} {s}" for c, s in chosen], relation)
    return _draw(objects, image_size), objects, captions


def _split_ranges(n: int, splits: Sequence[tuple[str, float]]) -> dict[str, range]:
    """Consecutive id ranges (1-based) per split, sized by cumulative rounding."""
    fractions = [f for _, f in splits]
    names = [name for name, _ in splits]
    if not splits or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6 or len(set(names)) != len(names):
        raise ValueError(f"splits must be unique names with positive fractions summing to 1, got {splits}")
    ranges, start, total = {}, 1, 0.0
    for name, fraction in splits:
        total += fraction
        end = 1 + round(total * n)
        ranges[name] = range(start, end)
        start = end
    return ranges


def _is_complete(out_dir: Path, manifest: dict, paths: dict[str, Path], n: int) -> bool:
    """True when a previous run with the same arguments finished writing everything."""
    try:
        if json.loads((out_dir / "manifest.json").read_text()) != manifest:
            return False
    except (OSError, ValueError):
        return False
    files = [p for k, p in paths.items() if k != "images"]
    files += [paths["images"] / _file_name(i) for i in range(1, n + 1)]
    return all(p.is_file() for p in files)


def _file_name(image_id: int) -> str:
    return f"shapes_{image_id:06d}.png"


def generate_shapes(out_dir: str | Path, n: int = 5000, seed: int = 0, image_size: int = 96,
                    splits: Sequence[tuple[str, float]] = DEFAULT_SPLITS) -> dict[str, Path]:
    """Write the shapes data set: ``images/*.png`` and ``captions_{split}.json`` per split.

    Returns the caption file of each split plus ``"images"`` (the image folder). A folder that
    already holds a complete generation with the same arguments is returned untouched.
    """
    if n < 1 or image_size < 48:
        raise ValueError(f"need n >= 1 and image_size >= 48, got n={n}, image_size={image_size}")
    out_dir = Path(out_dir)
    ranges = _split_ranges(n, splits)
    paths = {name: out_dir / f"captions_{name}.json" for name in ranges}
    paths["images"] = out_dir / "images"
    manifest = {"format": "caption-shapes", "version": _FORMAT_VERSION, "n": n, "seed": seed,
                "image_size": image_size, "splits": [[name, f] for name, f in splits]}
    if _is_complete(out_dir, manifest, paths, n):
        return paths
    paths["images"].mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)
    for stale in paths["images"].glob("shapes_*.png"):
        stale.unlink()
    for name, ids in ranges.items():
        atomic_write_json(paths[name], _split_data(paths["images"], ids, seed, image_size), separators=(",", ":"))
    atomic_write_json(out_dir / "manifest.json", manifest, separators=(",", ":"))
    return paths


def _split_data(image_dir: Path, ids: range, seed: int, image_size: int) -> dict:
    """Draw and save the images of one split; return its COCO-format dict."""
    images, annotations, shapes = [], [], []
    for image_id in ids:
        image, objects, captions = make_example(seed, image_id, image_size)
        image.save(image_dir / _file_name(image_id))
        images.append({"id": image_id, "file_name": _file_name(image_id),
                       "width": image_size, "height": image_size})
        for k, text in enumerate(captions):
            annotations.append({"id": (image_id - 1) * 5 + k + 1, "image_id": image_id, "caption": text})
        shapes.append({"image_id": image_id, "objects": objects})
    info = {"description": "caption built-in shapes world", "seed": seed}
    return {"info": info, "images": images, "annotations": annotations, "shapes": shapes}


def load_shapes(captions_json: str | Path) -> tuple[dict[int, list[dict]], int] | None:
    """(objects per image id, image size in pixels) from a captions file; None without ``shapes``."""
    data = json.loads(Path(captions_json).read_text())
    if "shapes" not in data:
        return None
    size = int(data["images"][0]["width"]) if data.get("images") else 0
    return {int(entry["image_id"]): entry["objects"] for entry in data["shapes"]}, size
