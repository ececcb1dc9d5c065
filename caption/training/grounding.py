"""Attention supervised by detected boxes (``train.ground_weight``): a word that names a COCO category
the detector finds in its photo should look at that category's cells.

For every such training word the loss adds −log(attention mass inside the category's cells), as in
Liu et al. 2017's weak supervision, weighted by ``train.ground_weight`` and averaged over the batch's
grounded words. Words, categories and cells come from :mod:`caption.guidance.grounding`, the same
table and rule that ``caption evaluate --pointing`` measures with. Words with no box are left alone.

The detector runs once per training photo, at full size, and its findings are cached beside the
feature cache, in the split's cache folder (``detections-<split>-<n>.pt``; Flickr8k's 6,000 photos took
22 minutes on a busy 2-core AMD EPYC with AVX2 only, about 10 photos/s alone); a cache whose image ids
differ from the split's is rebuilt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from caption.data.images import ImageError, load_image, prefetch
from caption.data.records import ImageRecord
from caption.errors import CaptionError
from caption.fileio import atomic_write
from caption.guidance.detector import COCO_LABELS, Detection, load_detector
from caption.guidance.grounding import MIN_SCORE, cell_masks, detect_full_size, token_labels
from caption.model.decoder import DecoderOutput
from caption.vocab import Vocabulary

DETECT_BATCH = 16  # photos per detector forward pass
STORED_SCORE = 0.3  # the cache keeps detections down to this score, so MIN_SCORE can move without a rebuild


def _as_rows(found: Sequence[Detection]) -> torch.Tensor:
    """(N, 6) float32 rows: COCO id, score, x0, y0, x1, y1."""
    return torch.tensor([[d.cls, d.score, *d.box] for d in found], dtype=torch.float32).reshape(-1, 6)


def _as_detections(rows: torch.Tensor) -> list[Detection]:
    return [Detection(COCO_LABELS[int(r[0])], int(r[0]), float(r[1]), tuple(float(v) for v in r[2:]))
            for r in rows]


def detect_split(records: Sequence[ImageRecord], cache_dir: str | Path, split: str, *,
                 progress: bool = True) -> list[list[Detection]]:
    """Every photo's detections (full size, score >= ``STORED_SCORE``), from the cache or computed once;
    an unreadable photo has none."""
    path = Path(cache_dir) / f"detections-{split}-{len(records)}.pt"
    ids = [r.image_id for r in records]
    if path.is_file():
        data = torch.load(path, weights_only=True)
        if data["image_ids"] == ids:
            return [_as_detections(rows) for rows in data["rows"]]
    detector, reason = load_detector(min_score=STORED_SCORE)
    if detector is None:
        raise CaptionError(f"train.ground_weight needs the COCO detector: {reason}")
    rows: list[torch.Tensor] = []
    chunk: list = []
    with tqdm(total=len(records), desc=f"detecting ({split})", unit="img", disable=not progress) as bar:
        for _, photo in prefetch(records, lambda r: load_image(r.path), ahead=2 * DETECT_BATCH):
            chunk.append(photo)
            if len(chunk) == DETECT_BATCH:
                rows += _detect_chunk(detector, chunk)
                bar.update(len(chunk))
                chunk = []
        rows += _detect_chunk(detector, chunk)
        bar.update(len(chunk))
    atomic_write(path, lambda f: torch.save({"image_ids": ids, "rows": rows}, f))
    return [_as_detections(r) for r in rows]


def _detect_chunk(detector, photos: list) -> list[torch.Tensor]:
    good = [p for p in photos if not isinstance(p, ImageError)]
    found = iter(detect_full_size(detector, good))
    return [_as_rows(()) if isinstance(p, ImageError) else _as_rows(next(found)) for p in photos]


class BoxTargets:
    """Per training photo, the cells of each detected category; per token, the category it names."""

    def __init__(self, masks: Sequence[dict[int, torch.Tensor]], labels: torch.Tensor):
        self.masks = list(masks)  # photo (record index) -> {COCO id: (L,) bool}
        self.labels = labels  # (V,) COCO id per token, 0: names none

    @classmethod
    def build(cls, records: Sequence[ImageRecord], vocab: Vocabulary, grid: int, cache_dir: str | Path,
              split: str = "train", progress: bool = True) -> "BoxTargets":
        found = detect_split(records, cache_dir, split, progress=progress)
        return cls([cell_masks(d, (grid, grid), MIN_SCORE) for d in found], token_labels(vocab))

    def loss(self, out: DecoderOutput, image_index: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(sum over grounded words of −log mass inside, their count) for one teacher-forced batch."""
        cls = self.labels.to(out.targets.device)[out.targets]  # (B, T)
        b_idx, t_idx = ((cls > 0) & out.mask).nonzero(as_tuple=True)
        images = image_index.tolist()
        keep, rows = [], []
        for k, (b, t) in enumerate(zip(b_idx.tolist(), t_idx.tolist())):
            cells = self.masks[images[b]].get(int(cls[b, t]))
            if cells is not None:
                keep.append(k)
                rows.append(cells)
        if not keep:
            return out.alphas.new_zeros(()).float(), 0
        inside = torch.stack(rows).to(out.alphas.device)  # (N, L)
        alphas = out.alphas[b_idx[keep], t_idx[keep]].float()  # (N, L)
        mass = (alphas * inside).sum(-1)  # (N,)
        return -(mass + 1e-6).log().sum(), len(keep)
