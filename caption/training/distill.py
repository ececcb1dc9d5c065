"""Knowledge distillation (``train.objective=distill``): one decoder learns what an ensemble knows.

Two signals (Kim & Rush 2016, "Sequence-Level Knowledge Distillation"), either or both:

* **word level**: under teacher forcing, each word's loss mixes the cross-entropy of the reference
  word with the KL divergence from the teachers' next-word distribution to the student's,
  ``(1 - w) * CE + w * KL`` with ``w = train.distill_weight``. The teachers' distribution is what
  the ensemble decodes with: the renormalised mean of the members' log-probabilities
  (:func:`caption.model.ensemble.mean_log_probs`). The teachers (``train.teachers``) run in eval
  mode, without gradients.
* **sequence level**: the teachers' own captions of the training photos (``train.teacher_captions``,
  a COCO results file such as ``caption evaluate`` writes) join the human captions as extra targets.

The doubly-stochastic attention penalty is kept as in :class:`CrossEntropy`. The teachers must read
the same features as the student (encoder, image size, grid) and share its vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from caption.config import Config, ConfigError
from caption.data.datasets import CaptionDataset
from caption.data.records import ImageRecord
from caption.errors import DataError, MissingFileError
from caption.model.ensemble import mean_log_probs
from caption.training.distributed import Dist
from caption.training.objectives import CrossEntropy, StepResult
from caption.training.pretrained import load_teachers, teacher_paths
from caption.training.splits import SplitData
from caption.vocab import Vocabulary


class Distillation(CrossEntropy):
    """Cross-entropy plus the teachers' word distributions, over human and (optionally) teacher captions."""

    unit = "caption"

    @staticmethod
    def check(cfg: Config) -> None:
        """ConfigError for a weight outside [0, 1], a weight with no teachers, or nothing to distill."""
        t = cfg.train
        if not 0.0 <= t.distill_weight <= 1.0:
            raise ConfigError(f"train.distill_weight must be in [0, 1], got {t.distill_weight}")
        if t.distill_weight > 0 and not teacher_paths(cfg):
            raise ConfigError("train.objective=distill with train.distill_weight > 0 needs train.teachers "
                              "(checkpoint files or run directories, separated by commas)")
        if not teacher_paths(cfg) and not t.teacher_captions:
            raise ConfigError("train.objective=distill needs train.teachers or train.teacher_captions")
        if cfg.model.blend == "hard":
            raise ConfigError("train.objective=distill trains a soft-attention decoder (model.blend=soft)")

    def __init__(self, cfg: Config, vocab: Vocabulary, train: SplitData):
        super().__init__(cfg, vocab, train)
        self.weight = cfg.train.distill_weight
        self.teacher = load_teachers(cfg, vocab).model if self.weight > 0 else None  # eval, no gradients
        if cfg.train.teacher_captions:
            records = with_teacher_captions(train.records, Path(cfg.train.teacher_captions))
            base = train.dataset
            self.dataset = CaptionDataset(records, vocab, transform=base.transform, features=base.features,
                                          max_len=base.max_len, keep_images=cfg.data.keep_images)
            self.groups = self.dataset.image_groups() if cfg.train.group_by_image else None

    def step(self, ddp_model: torch.nn.Module, batch, dist: Dist) -> StepResult:
        forced = self.teacher_forced(ddp_model, batch, dist)
        metrics = forced.metrics
        if self.teacher is None:
            return StepResult(forced.loss.total, metrics, len(forced.captions))
        teacher_logp = self._teacher_log_probs(forced.inputs, forced.captions, forced.rows, dist.device)  # (N, V)
        student_logp = F.log_softmax(forced.out.word_logits.float(), dim=-1)  # (N, V)
        kl_sum = (teacher_logp.exp() * (teacher_logp - student_logp)).sum()  # over words and the vocabulary
        loss = forced.loss
        total = (1.0 - self.weight) * loss.xent + self.weight * kl_sum / forced.token_count + loss.penalty + loss.ground
        metrics["kl"] = (kl_sum.item(), forced.tokens)
        return StepResult(total, metrics, len(forced.captions))

    @torch.no_grad()
    def _teacher_log_probs(self, inputs: torch.Tensor, captions: torch.Tensor, rows: torch.Tensor,
                           device: torch.device) -> torch.Tensor:
        """(N, V) the teachers' next-word log-probabilities at the batch's real words (``targets[mask]`` order)."""
        model = self.teacher
        if next(model.parameters()).device != device:
            model.to(device)
        feats = inputs if self.cached else model.encode(inputs)  # (U, L, D)
        feats = feats.index_select(0, rows)  # (B, L, D)
        members = getattr(model.decoder, "members", [model.decoder])  # an ensemble's decoders, or the one
        return mean_log_probs([m(feats, captions).word_logits for m in members], renormalise=True)  # (N, V)


def with_teacher_captions(records: list[ImageRecord], path: Path) -> list[ImageRecord]:
    """The training records with the captions of ``path`` (COCO results: ``[{image_id, caption}]``)
    appended to their images' human captions; DataError when it names none of the training images."""
    if not path.is_file():
        raise MissingFileError(f"train.teacher_captions not found: {path}")
    try:
        results = json.loads(path.read_text())
        extra: dict[int, list[str]] = defaultdict(list)
        for item in results:
            extra[int(item["image_id"])].append(str(item["caption"]).strip())
    except (ValueError, TypeError, KeyError) as err:
        raise DataError(f"train.teacher_captions {path}: not a COCO results file "
                        f"([{{\"image_id\": ..., \"caption\": ...}}]): {err}") from err
    if not any(r.image_id in extra for r in records):
        raise DataError(f"train.teacher_captions {path}: none of its {len(extra)} images is in the training split")
    return [dataclasses.replace(r, captions=r.captions + tuple(extra.get(r.image_id, ()))) for r in records]
