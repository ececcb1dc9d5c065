"""From a config to training-ready data: records, vocabulary, feature cache, datasets.

Shared by ``caption prepare`` (:func:`prepare`) and ``fit``. The vocabulary is counted on the training split
only. With an encoder that is never fine-tuned, every image's feature grid is computed once
into the cache and training reads it without running the CNN.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from caption.config import Config, ConfigError, EncoderConfig, save_config
from caption.data.datasets import CaptionDataset
from caption.data.images import transform_for
from caption.data.records import ImageRecord, load_split
from caption.errors import DataError
from caption.evaluation.metrics import METRIC_KEYS
from caption.evaluation.scoring import TaskMetric, split_metric, task_metric_keys
from caption.model import build_encoder
from caption.model.check import check_model_config
from caption.runtime import Runtime, resolve_runtime
from caption.training.cache import (
    STORAGES,
    CacheNotReady,
    FeatureStore,
    cache_prefix,
    cache_state,
    open_or_build,
)
from caption.training.distributed import Dist
from caption.training.schedule import check_schedule
from caption.vocab import Vocabulary

log = logging.getLogger("caption.training.splits")

CACHES = (*STORAGES, "none")  # data.cache: an on-disk form, or no cache (the encoder runs every batch)


@dataclass
class SplitData:
    records: list[ImageRecord]
    dataset: CaptionDataset
    features: FeatureStore | None  # cached grids, or None when images go through the encoder
    transform: Callable | None  # image preprocessing (always set: inference needs it too)
    metric: TaskMetric | None  # the data set's own scores (``data.metric``), None for COCO metrics only
    cache_dir: Path  # where this run's caches of the split live (features, detections): :func:`cache_dir`


@dataclass
class TrainingData:
    vocab: Vocabulary
    train: SplitData
    val: SplitData


def check_config(cfg: Config) -> None:
    """Raise a ConfigError now for any setting that would fail later: model choices and sizes, the
    LR schedule, the data set's metric, and the validation score that picks best.pt. Nothing is
    read or written."""
    check_model_config(cfg.model)
    check_schedule(cfg.train)
    if cfg.data.cache not in CACHES:
        raise ConfigError(f"data.cache must be one of {', '.join(CACHES)}, got '{cfg.data.cache}'")
    known = [k for k in METRIC_KEYS if k != "METEOR"]  # validation runs without Java
    known += task_metric_keys(cfg.data.metric)
    if cfg.train.select_metric not in known:
        raise ConfigError(f"train.select_metric: '{cfg.train.select_metric}' is not a validation score "
                          f"for this data (choose from {', '.join(known)})")


def uses_cache(cfg: Config) -> bool:
    """Features are cached when the encoder is never trained, unless ``data.cache=none``."""
    return cfg.data.cache != "none" and not cfg.model.fine_tune and cfg.train.fine_tune_from_epoch < 0


def cache_dir(cfg: Config, run_dir: Path) -> Path:
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir / "cache"


def build_vocab(cfg: Config, run_dir: Path, train_records: list[ImageRecord], write: bool = True) -> Vocabulary:
    """``run_dir/vocab.json`` if present, else counted on the training captions only (min_freq)."""
    path = run_dir / "vocab.json"
    if path.is_file():
        return Vocabulary.load(path)
    vocab = Vocabulary.build((c for r in train_records for c in r.captions), cfg.data.min_freq)
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
        vocab.save(path)
    log.info("vocabulary: %d words (min_freq %d) from %d training images", len(vocab), cfg.data.min_freq,
             len(train_records))
    return vocab


def split_data(cfg: Config, split: str, vocab: Vocabulary, encoder: torch.nn.Module, run_dir: Path, *,
               runtime: Runtime, records: list[ImageRecord] | None = None, dist: Dist | None = None,
               progress: bool = True) -> SplitData:
    """Records, dataset and (for a frozen encoder) the feature cache of one split."""
    records = load_split(cfg.data, split) if records is None else records
    if not records:
        raise DataError(f"the {split} split has no images")
    transform = transform_for(cfg, encoder)
    features = None
    if uses_cache(cfg):
        features = _cached(cfg, split, records, encoder, transform, run_dir, runtime, dist, progress)
    dataset = CaptionDataset(records, vocab, transform=None if features is not None else transform,
                             features=features, max_len=cfg.data.max_caption_len,
                             keep_images=cfg.data.keep_images)
    return SplitData(records, dataset, features, transform, split_metric(cfg, split), cache_dir(cfg, run_dir))


def _cached(cfg, split, records, encoder, transform, run_dir, runtime, dist, progress) -> FeatureStore:
    """The split's cache, built or finished here by a single process; a multi-process run (torchrun)
    only opens a finished one, and stops with :func:`_prepare_first`'s error where there is none."""
    multi = dist is not None and dist.active
    try:
        return open_or_build(encoder, records, transform, cache_dir(cfg, run_dir), encoder.config, cfg.data.image_size,
                             split, runtime=runtime, batch_size=max(cfg.train.batch_size, 32), progress=progress,
                             storage=cfg.data.cache, build=not multi)
    except CacheNotReady as err:
        raise _prepare_first(split, err.prefix, err.reason, run_dir) from err


def require_cache(cfg: Config, run_dir: Path, precision: str) -> None:
    """Before a multi-process run writes anything: DataError (:func:`_prepare_first`) unless every
    split it caches has a finished cache. Its processes never build one: one process would build
    while the others wait at a barrier, and a long build (COCO: hours) outlives the process
    group's timeout (NCCL's default is 30 minutes). The full check (images, encoder weights)
    follows when the data is loaded."""
    if not uses_cache(cfg):
        return
    encoder = EncoderConfig.of(cfg.model)
    for split in ("train", "val"):
        prefix, _ = cache_prefix(cache_dir(cfg, run_dir), encoder, cfg.data.image_size, split, precision,
                                 cfg.data.cache)
        reason = cache_state(prefix)
        if reason is not None:
            raise _prepare_first(split, prefix, reason, run_dir)


def _prepare_first(split: str, prefix: Path, reason: str, run_dir: Path) -> DataError:
    """The one-line error of a multi-process run whose feature cache is not ready."""
    return DataError(f"the {split} split's feature cache {prefix} is {reason}: build it first with `caption prepare` "
                     f"(one process; this run's --config and overrides, --run-dir {run_dir}), then start torchrun "
                     "again (a multi-process run never builds it: its other processes would wait past the process "
                     "group's timeout)")


def load_training_data(cfg: Config, run_dir: Path, encoder: torch.nn.Module, vocab: Vocabulary, *,
                       runtime: Runtime, train_records: list[ImageRecord] | None = None,
                       dist: Dist | None = None, progress: bool = True) -> TrainingData:
    """Train and val data for ``vocab``, caching features with ``encoder`` (in ``runtime``) when it stays frozen."""
    train = split_data(cfg, "train", vocab, encoder, run_dir, runtime=runtime, records=train_records, dist=dist,
                       progress=progress)
    val = split_data(cfg, "val", vocab, encoder, run_dir, runtime=runtime, dist=dist, progress=progress)
    return TrainingData(vocab, train, val)


def prepare(cfg: Config, run_dir: Path, *, runtime: Runtime | None = None, splits: tuple[str, ...] | list[str] = ("train", "val"),
            progress: bool = True) -> dict:
    """What training needs before its first step: the vocabulary (training split only) and, for a
    frozen encoder, the feature cache of ``splits`` built in ``runtime`` (default: CUDA when available,
    else the CPU, in ``cfg.precision``); resumable and idempotent."""
    runtime = runtime or resolve_runtime(None, cfg.precision)
    check_config(cfg)
    train_records = load_split(cfg.data, "train")  # a missing captions file fails before anything is written
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    vocab = build_vocab(cfg, run_dir, train_records)
    summary = {"run_dir": str(run_dir), "vocab": len(vocab), "train_images": len(train_records)}
    if not uses_cache(cfg):
        why = "data.cache=none" if cfg.data.cache == "none" else "the encoder is fine-tuned, so features cannot be cached"
        summary["cache"] = f"none ({why}: the encoder runs on every training batch)"
        return summary
    torch.manual_seed(cfg.train.seed)  # the same encoder weights as training builds
    encoder = build_encoder(cfg.model).to(runtime.device)
    for split in splits:
        records = train_records if split == "train" else None
        data = split_data(cfg, split, vocab, encoder, run_dir, runtime=runtime, records=records, progress=progress)
        summary[f"{split}_cache"] = {"path": str(data.features.prefix), "images": len(data.features),
                                     "unreadable": len(data.features.bad)}
    return summary
