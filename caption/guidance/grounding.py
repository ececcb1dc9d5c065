"""Where a caption word's object is: the COCO detector's boxes as attention-grid cells.

Pointing is measured (:mod:`caption.evaluation.pointing`) and supervised
(:mod:`caption.training.grounding`) the same way, through this module:

- :func:`coco_words` reads ``assets/coco_words.tsv``, the reviewed table from the caption words
  that name a COCO category to that category (man/woman/boy/people -> person, puppy -> dog,
  bike -> bicycle). One table, so the measure and the loss agree on which words count.
- :func:`detect_full_size` runs the detector on the photo as decoded, resized straight to the
  detector's own input, not on the captioner's small square (which loses small people).
- :func:`cell_masks` turns a photo's boxes into one mask of grid cells per category: a cell is
  inside when its centre is inside a box of that category (the captioner resizes the whole photo
  to a square, never crops, so box fractions are grid fractions). A box too small to hold a cell
  centre still marks the cell that holds its own centre, so no detected object is without cells.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import torch
from PIL import Image

from caption.guidance.detector import BLOB_SIZE, COCO_LABELS, Detection
from caption.vocab import Vocabulary

WORDS_FILE = Path(__file__).resolve().parents[1] / "assets" / "coco_words.tsv"
MIN_SCORE = 0.5  # a detection counts as the object's box at this score (the detector's usual cut-off)
LABEL_IDS = {label: i for i, label in enumerate(COCO_LABELS) if label}  # label -> COCO id (1..90)


@lru_cache(maxsize=4)
def coco_words(path: str | Path = WORDS_FILE) -> dict[str, str]:
    """Caption word -> the COCO label it names, from the reviewed table (``label<TAB>words``)."""
    table: dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        label, words = line.split("\t")
        if label not in LABEL_IDS:
            raise ValueError(f"{path}: '{label}' is not a COCO label of the detector")
        for word in words.split():
            if table.setdefault(word, label) != label:
                raise ValueError(f"{path}: '{word}' is listed under both '{table[word]}' and '{label}'")
    return table


def token_labels(vocab: Vocabulary, table: dict[str, str] | None = None) -> torch.Tensor:
    """(V,) the COCO id each vocabulary token names, 0 for a token that names none."""
    table = coco_words() if table is None else table
    ids = torch.zeros(len(vocab), dtype=torch.long)
    for token, word in enumerate(vocab.itos):
        if word in table:
            ids[token] = LABEL_IDS[table[word]]
    return ids


def detect_full_size(detector, images: Sequence[Image.Image]) -> tuple[tuple[Detection, ...], ...]:
    """The detector's findings on each photo at its full decoded resolution, resized straight to the
    detector's input side (no detour through the captioner's smaller square)."""
    side = getattr(detector, "size", BLOB_SIZE)
    pixels = [torch.frombuffer(bytearray(im.convert("RGB").resize((side, side), Image.Resampling.BILINEAR).tobytes()),
                               dtype=torch.uint8).view(side, side, 3) for im in images]  # (S, S, 3) each
    if not pixels:
        return ()
    return detector(torch.stack(pixels).permute(0, 3, 1, 2).contiguous())  # (B, 3, S, S)


def cell_masks(detections: Iterable[Detection], grid: tuple[int, int], min_score: float = MIN_SCORE
               ) -> dict[int, torch.Tensor]:
    """COCO id -> (L,) bool: the grid cells inside that category's boxes at ``min_score`` or above."""
    gh, gw = grid
    ys = (torch.arange(gh, dtype=torch.float32) + 0.5) / gh  # cell centres, as fractions
    xs = (torch.arange(gw, dtype=torch.float32) + 0.5) / gw
    masks: dict[int, torch.Tensor] = {}
    for det in detections:
        if det.score < min_score:
            continue
        x0, y0, x1, y1 = det.box
        inside = ((ys >= y0) & (ys <= y1)).unsqueeze(1) & ((xs >= x0) & (xs <= x1)).unsqueeze(0)  # (gh, gw)
        if not inside.any():
            row = min(int((y0 + y1) / 2 * gh), gh - 1)
            col = min(int((x0 + x1) / 2 * gw), gw - 1)
            inside[row, col] = True
        cls = LABEL_IDS[det.label]
        masks[cls] = masks.get(cls, torch.zeros(gh * gw, dtype=torch.bool)) | inside.flatten()  # (L,)
    return masks
