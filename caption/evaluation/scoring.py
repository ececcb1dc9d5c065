"""Caption a split and score it: the COCO metrics, plus a data set's own metric when it has one.

Each image is decoded once (batched beam search) and scored against all of its references.
Inputs are either cached feature grids (a frozen encoder) or images run through the encoder.

A data set with scores of its own (the shapes world's content and pointing accuracy) names a
*task metric* in its config (``data.metric``); the metric is registered here by name and built
from the split's captions file, so nothing else in training or evaluation knows about it.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Protocol, Sequence

from tqdm import tqdm

from caption.config import Config, ConfigError
from caption.data.images import ImageTransform, preprocess
from caption.data.records import ImageRecord
from caption.decoding import DecodeConfig, DecodingResult
from caption.evaluation.metrics import coco_scores
from caption.model import Captioner
from caption.pipeline import Outcome, caption_batches, encode_images, feature_batches
from caption.runtime import Runtime
from caption.vocab import Vocabulary, tokenize


def caption_records(
    model: Captioner, vocab: Vocabulary, records: Sequence[ImageRecord], options: DecodeConfig, *,
    runtime: Runtime, features=None, transform: ImageTransform | None = None, batch_size: int = 32,
    progress: bool = True,
) -> dict[int, DecodingResult]:
    """image_id -> DecodingResult for every readable image of ``records``: validation during
    training, by the one path from features to captions (:mod:`caption.pipeline`).

    ``features`` (a FeatureStore of cached grids) skips the encoder; otherwise each image goes
    through ``model.encoder`` by the one inference loop (:func:`caption.pipeline.encode_images`).
    """
    model.eval()
    if features is not None:
        batches = feature_batches(features, [r.image_id for r in records], batch_size, runtime)
    else:
        batches = encode_images(model.encoder, range(len(records)),
                                lambda i: preprocess(records[i].path, transform, pixels=True), transform, runtime,
                                batch_size=batch_size)
    outcomes = caption_batches(batches, model.decoder, options, runtime=runtime, vocab=vocab, grid=model.grid)
    return collect(outcomes, [r.image_id for r in records], progress)


def collect(outcomes: Iterable[Outcome], image_ids: Sequence, progress: bool = True) -> dict:
    """image_id -> DecodingResult from outcomes in the order of ``image_ids`` (an unreadable image
    is left out), with a progress bar on stderr."""
    results = {}
    bar = tqdm(total=len(image_ids), desc="captioning", unit="img", disable=not progress, leave=False)
    for image_id, (_, result) in zip(image_ids, outcomes):
        if isinstance(result, DecodingResult):
            results[image_id] = result
        bar.update(1)
    bar.close()
    return results


class TaskMetric(Protocol):
    """A data set's own scores of decoded captions, beside the COCO metrics."""

    keys: tuple[str, ...]  # the scores it adds, e.g. ("content_accuracy", "pointing_accuracy")

    def score(self, results: Mapping[int, DecodingResult]) -> dict[str, float]:
        """Scores over the images of ``results`` (image id -> caption with its attention maps)."""
        ...


# name -> factory(captions file) of a task metric; built-in ones as "module:attribute", imported on first use
_TASK_METRICS: dict[str, Callable[[Path], TaskMetric] | str] = {"shapes": "caption.evaluation.shapes:ShapesMetric"}


def register_task_metric(name: str, factory: Callable[[Path], TaskMetric]) -> None:
    """Make ``data.metric=<name>`` build ``factory(captions_file)`` for every scored split."""
    _TASK_METRICS[name] = factory


def _factory(name: str) -> Callable[[Path], TaskMetric]:
    if name not in _TASK_METRICS:
        raise ConfigError(f"data.metric: unknown metric '{name}' (choose from '', {', '.join(sorted(_TASK_METRICS))})")
    factory = _TASK_METRICS[name]
    if isinstance(factory, str):
        module, attribute = factory.split(":")
        factory = _TASK_METRICS[name] = getattr(importlib.import_module(module), attribute)
    return factory


def task_metric_keys(name: str) -> tuple[str, ...]:
    """The scores the task metric ``name`` adds ('' adds none), known before any data is read."""
    return tuple(getattr(_factory(name), "keys", ())) if name else ()


def task_metric(name: str, captions_file: str | Path) -> TaskMetric | None:
    """The task metric ``name`` ('' = none) for the images of ``captions_file``."""
    return _factory(name)(Path(captions_file)) if name else None


def split_metric(cfg: Config, split: str) -> TaskMetric | None:
    """The task metric ``data.metric`` names, for the images of one split's captions file."""
    path = {"train": cfg.data.train_captions, "val": cfg.data.val_captions, "test": cfg.data.test_captions}[split]
    if cfg.data.metric and (cfg.data.format != "coco" or not path):
        raise ConfigError(f"data.metric={cfg.data.metric} needs data.format coco and a {split} captions file")
    return task_metric(cfg.data.metric, path)


def repeats_a_bigram(caption: str) -> bool:
    """Whether a caption says some word pair twice ("a black jacket and a black jacket")."""
    words = tokenize(caption)
    bigrams = list(zip(words, words[1:]))
    return len(bigrams) != len(set(bigrams))


def repetition_scores(captions: Mapping[int, str], records: Sequence[ImageRecord]) -> dict[str, float]:
    """Share of captions that repeat a bigram, the same share over the human references, and how
    many of the captions are distinct."""
    refs = [c for r in records if r.image_id in captions for c in r.captions]
    return {
        "repeated_bigram_rate": round(sum(map(repeats_a_bigram, captions.values())) / max(len(captions), 1), 4),
        "references_repeated_bigram_rate": round(sum(map(repeats_a_bigram, refs)) / max(len(refs), 1), 4),
        "distinct_captions": len(set(captions.values())),
    }


@dataclass
class Evaluation:
    scores: dict[str, float]  # BLEU-1..4, METEOR, ROUGE-L, CIDEr (+ the task metric's keys)
    captions: dict[int, str]  # image_id -> generated caption
    results: dict[int, DecodingResult]


def score_results(
    results: dict[int, DecodingResult], records: Sequence[ImageRecord], *, java: bool | None = None,
    metric: TaskMetric | None = None,
) -> Evaluation:
    """COCO metrics over the captioned images (each once, against all its references), plus ``metric``'s."""
    captions = {image_id: r.caption for image_id, r in results.items()}
    references = {r.image_id: list(r.captions) for r in records if r.image_id in captions}
    with warnings.catch_warnings():
        if java is False:  # model selection during training: METEOR skipped on purpose
            warnings.simplefilter("ignore", UserWarning)
        scores = coco_scores(captions, references, java=java)
    if metric is not None:
        scores.update(metric.score(results))
    return Evaluation(scores, captions, results)
