"""The shapes world's own scores of decoded captions: content accuracy (the caption names exactly
the image's objects and a true relation) and pointing accuracy (each shape noun's attention peak
lies in its object's box). The world and its caption grammar are :mod:`caption.data.shapes`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from caption.data.shapes import COLORS, RELATION_PHRASES, RELATIONS, SHAPES, load_shapes
from caption.errors import DataError

ACCURACY_KEYS = ("content_accuracy", "pointing_accuracy")  # the scores ShapesMetric adds on this world


@dataclass(frozen=True)
class ParsedCaption:
    """What a caption claims: objects in mention order, relation phrases found, stray words.

    ``stray`` counts colour words not followed by a shape and shape words without a colour.
    """

    objects: tuple[tuple[str, str], ...]
    relations: tuple[str, ...]
    stray: int = 0

    @property
    def relation(self) -> str | None:
        """The one relation claimed between consecutive objects; None if none or conflicting."""
        return self.relations[0] if len(set(self.relations)) == 1 else None


def _tokens(caption: str) -> list[str]:
    return re.findall(r"[a-z]+", caption.lower())


def parse_caption(caption: str) -> ParsedCaption:
    """Read a caption of the shapes grammar (any lower/upper case, punctuation ignored)."""
    tokens = _tokens(caption)
    objects, relations, stray, i = [], [], 0, 0
    while i < len(tokens):
        phrase = next((p for p in RELATION_PHRASES if tuple(tokens[i:i + len(p[0])]) == p[0]), None)
        if phrase is not None:
            relations.append(phrase[1])
            i += len(phrase[0])
        elif tokens[i] in COLORS and i + 1 < len(tokens) and tokens[i + 1] in SHAPES:
            objects.append((tokens[i], tokens[i + 1]))
            i += 2
        else:
            stray += tokens[i] in COLORS or tokens[i] in SHAPES
            i += 1
    return ParsedCaption(tuple(objects), tuple(relations), stray)


def _centre(obj: dict) -> tuple[float, float]:
    x, y, w, h = obj["bbox"]
    return x + w / 2, y + h / 2


def relation_holds(first: dict, second: dict, relation: str) -> bool:
    """Whether ``first`` is ``relation`` ("above", "below", "left of", "right of") ``second``."""
    (x1, y1), (x2, y2) = _centre(first), _centre(second)
    dx, dy = x2 - x1, y2 - y1
    if relation in ("left of", "right of"):
        return abs(dx) > abs(dy) and (dx > 0) == (relation == "left of")
    if relation in ("above", "below"):
        return abs(dy) > abs(dx) and (dy > 0) == (relation == "above")
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def content_correct(caption: str, objects: Sequence[dict]) -> bool:
    """True when the caption names exactly the image's objects and a true spatial relation."""
    parsed = parse_caption(caption)
    truth = {(o["color"], o["shape"]): o for o in objects}
    if parsed.stray or sorted(parsed.objects) != sorted(truth):
        return False
    if len(objects) == 1:
        return not parsed.relations
    if parsed.relation is None:
        return False
    chain = [truth[pair] for pair in parsed.objects]
    return all(relation_holds(p, q, parsed.relation) for p, q in zip(chain, chain[1:]))


def _as_grids(alphas: np.ndarray) -> np.ndarray:
    """Attention maps as (T, gh, gw); a flat (T, L) with square L is reshaped."""
    alphas = np.asarray(alphas)
    if alphas.ndim == 2:
        side = int(round(np.sqrt(alphas.shape[1])))
        if side * side != alphas.shape[1]:
            raise ValueError(f"flat attention of {alphas.shape[1]} cells is not a square grid")
        alphas = alphas.reshape(alphas.shape[0], side, side)  # (T, gh, gw)
    if alphas.ndim != 3:
        raise ValueError(f"attention maps must be (T, gh, gw), got shape {alphas.shape}")
    return alphas


def pointing_hits(words: Sequence[str], alphas: np.ndarray, objects: Sequence[dict],
                  image_size: int) -> tuple[int, int]:
    """(hits, total) over emitted shape nouns: does the word's attention peak lie in its object?

    ``alphas[t]`` is the map of ``words[t]``. The object is the one whose colour is the
    preceding word; a noun without a colour, or naming an absent object, is a miss. The peak is
    the centre of the argmax cell, cell (r, c) covering rows r*S/gh..(r+1)*S/gh.
    """
    grids = _as_grids(alphas)
    if len(grids) < len(words):
        raise ValueError(f"{len(words)} words but only {len(grids)} attention maps")
    by_pair = {(o["color"], o["shape"]): o for o in objects}
    hits = total = 0
    for t, word in enumerate(words):
        if word not in SHAPES:
            continue
        total += 1
        obj = by_pair.get((words[t - 1], word)) if t > 0 else None
        if obj is None:
            continue
        gh, gw = grids[t].shape
        r, c = np.unravel_index(int(np.argmax(grids[t])), (gh, gw))
        px, py = (c + 0.5) * image_size / gw, (r + 0.5) * image_size / gh
        x, y, w, h = obj["bbox"]
        hits += bool(x <= px <= x + w and y <= py <= y + h)
    return hits, total


def shapes_accuracy(results: Mapping[int, tuple[str, Sequence[str], np.ndarray | None]],
                    annotations: Mapping[int, Sequence[dict]], image_size: int) -> dict[str, float]:
    """Content and pointing accuracy of decoded captions on the shapes world.

    ``results`` maps image id to (caption, emitted words, attention maps (T, gh, gw) or None).
    Returns content_accuracy (share of images captioned correctly), pointing_accuracy (share
    of shape nouns whose attention peak lies in their object; 0 when none), and the counts
    ``images`` and ``pointed_words``.
    """
    missing = [i for i in results if i not in annotations]
    if missing:
        raise ValueError(f"no shapes annotation for image ids {missing[:5]}")
    correct = hits = total = 0
    for image_id, (caption, words, alphas) in results.items():
        correct += content_correct(caption, annotations[image_id])
        if alphas is not None:
            h, t = pointing_hits(words, alphas, annotations[image_id], image_size)
            hits, total = hits + h, total + t
    return {"content_accuracy": correct / len(results) if results else 0.0,
            "pointing_accuracy": hits / total if total else 0.0,
            "images": float(len(results)), "pointed_words": float(total)}


class ShapesMetric:
    """The shapes world's task metric (``data.metric: shapes``): content and pointing accuracy.

    Built from a split's captions file, which carries every image's objects (``shapes`` key);
    registered by name in :mod:`caption.scoring`.
    """

    keys = ACCURACY_KEYS

    def __init__(self, captions_json: str | Path):
        loaded = load_shapes(captions_json)
        if loaded is None:
            raise DataError(f"{captions_json}: data.metric is 'shapes' but the file has no 'shapes' annotations")
        self.objects, self.image_size = loaded

    def score(self, results: Mapping) -> dict[str, float]:
        """``results``: image id -> DecodingResult (caption, words, alphas (T, gh, gw))."""
        triples = {i: (r.caption, r.words, np.asarray(r.alphas)) for i, r in results.items() if i in self.objects}
        accuracy = shapes_accuracy(triples, self.objects, self.image_size)
        return {key: accuracy[key] for key in self.keys}
