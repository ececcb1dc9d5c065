"""Feature cache for a frozen encoder: encode every image once, train the decoder from disk.

Layout: ``<prefix>.f16`` is a raw float16 array (N, L, D) read with ``np.memmap``; ``<prefix>.json``
is its index (key, sizes, storage, image ids, how many images are done, which were unreadable). With
``storage="int8"`` (``data.cache=int8``, half the disk) the grid is ``<prefix>.i8``, int8 (N, L, D), and
``<prefix>.scale``, float32 (N, L): each cell is rounded to 255 levels of its own largest magnitude. Building is
resumable: progress is flushed every few batches and on any exception (index written atomically
after the array), and a rerun encodes only the images not yet done. A stale cache (other key,
records, encoder weights or preprocessing) is rebuilt from scratch. :class:`FeatureStore` reopens
the array lazily in each process, so it pickles cheaply into DataLoader workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from caption.checkpoint import quantize_rows
from caption.config import EncoderConfig
from caption.data.images import ImageError, ImageTransform, preprocess
from caption.data.records import ImageRecord
from caption.errors import DataError
from caption.fileio import atomic_write_json
from caption.pipeline import encode_images, inference_encoder
from caption.model import Encoder
from caption.runtime import Runtime, resolve_runtime

log = logging.getLogger("caption.training.cache")

FORMAT_VERSION = 1
_FP16_MAX = 65504.0
STORAGES = ("f16", "int8")  # data.cache's on-disk forms ("none" caches nothing)


def quantize(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 (B, L, D) -> int8 (B, L, D) and float32 (B, L) scales, one per cell
    (:func:`caption.checkpoint.quantize_rows` over each cell's D values): x ≈ q * scale with
    |error| <= scale / 2 = max|x_cell| / 254."""
    values, scale = quantize_rows(torch.from_numpy(feats))  # (B, L, D), (B, L, 1)
    return values.numpy(), scale.squeeze(-1).numpy()  # (B, L, D), (B, L)


def _arrays(prefix: Path, storage: str) -> list[tuple[Path, np.dtype, int]]:
    """The files of a cache: (path, dtype, how many leading axes of (N, L, D) it has)."""
    if storage not in STORAGES:
        raise ValueError(f"feature cache storage must be one of {', '.join(STORAGES)}, got '{storage}'")
    name = prefix.name
    if storage == "f16":
        return [(prefix.with_name(name + ".f16"), np.dtype(np.float16), 3)]
    return [(prefix.with_name(name + ".i8"), np.dtype(np.int8), 3), (prefix.with_name(name + ".scale"), np.dtype(np.float32), 2)]


def cache_key(encoder: EncoderConfig, image_size: int, precision: str = "fp32") -> str:
    """Short stable name of everything that determines the features (the encoder's whole config,
    the image size and the precision the encoder ran in), e.g. ``resnet101-DEFAULT-224-g14-1a2b3c4d``
    (fp32) or ``efficientnet_lite0-DEFAULT-224-g7-bf16-5e6f7a8b``."""
    info = {**dataclasses.asdict(encoder), "image_size": int(image_size)}
    if precision != "fp32":  # fp32 keys stay what they were before precision existed
        info["precision"] = precision
    digest = hashlib.sha1(json.dumps(info, sort_keys=True).encode()).hexdigest()[:8]
    weights = re.sub(r"[^A-Za-z0-9_.]+", "_", encoder.weights)
    tag = "" if precision == "fp32" else f"-{precision}"
    return f"{encoder.encoder}-{weights}-{int(image_size)}-g{encoder.grid}{tag}-{digest}"


def encoder_digest(encoder: nn.Module) -> str:
    """sha1 of the encoder's floating-point parameters and buffers (random-init encoders differ per seed)."""
    h = hashlib.sha1()
    for name, tensor in encoder.state_dict().items():
        if not tensor.is_floating_point():
            continue  # e.g. BatchNorm's num_batches_tracked: no effect on eval outputs
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _index_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".json")


def _read_index(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class FeatureStore:
    """Read-only view of a finished cache: ``store[i]`` is image i's (L, D) float32 feature grid."""

    def __init__(self, path_prefix: str | Path):
        self.prefix = Path(path_prefix)
        self.index_path = _index_path(self.prefix)
        index = _read_index(self.index_path)
        if index is None:
            raise FileNotFoundError(f"no feature cache index at {self.index_path}")
        if not index.get("complete"):
            raise ValueError(f"feature cache {self.prefix} is incomplete ({index.get('done', 0)}/{index.get('N')} "
                             "images); run build_features again to finish it")
        self.key = index.get("key")
        self.shape = (int(index["N"]), int(index["L"]), int(index["D"]))
        self.storage: str = index.get("storage", "f16")
        self.files = _arrays(self.prefix, self.storage)
        self.image_ids: list[int] = [int(i) for i in index["image_ids"]]
        self.bad: set[int] = {int(i) for i in index.get("bad", [])}
        self._positions: dict[int, int] | None = None
        self._arrays: list[np.memmap] | None = None

    def _mm(self) -> list[np.memmap]:
        if self._arrays is None:  # opened lazily, once per process
            self._arrays = [np.memmap(path, dtype=dtype, mode="r", shape=self.shape[:ndim])
                            for path, dtype, ndim in self.files]
        return self._arrays

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        arrays = self._mm()
        grid = np.array(arrays[0][i], dtype=np.float32)  # (L, D)
        if self.storage == "int8":
            grid *= arrays[1][i][:, None]  # (L, 1) per-cell scales
        return torch.from_numpy(grid)

    def index_of(self, image_id: int) -> int:
        """Position of an image id in the store (KeyError if absent)."""
        if self._positions is None:
            self._positions = {image_id: i for i, image_id in enumerate(self.image_ids)}
        return self._positions[image_id]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_arrays"] = None  # never ship an open file mapping to another process
        state["_positions"] = None
        return state

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.prefix)!r}, shape={self.shape}, storage={self.storage}, bad={len(self.bad)})"


class _Progress:
    """The build's running state, flushed to disk as memmaps first, index second."""

    def __init__(self, prefix: Path, storage: str, header: dict):
        self.files, self.index_path, self.header = _arrays(prefix, storage), _index_path(prefix), header
        self.storage = storage
        self.arrays: list[np.memmap] | None = None
        self.done = 0
        self.bad: list[int] = []

    def sizes_match(self, index: dict) -> bool:
        """Whether every array file of ``index`` is there, at its full size."""
        shape = (int(index["N"]), int(index["L"]), int(index["D"]))
        return all(path.is_file() and path.stat().st_size == int(np.prod(shape[:ndim])) * dtype.itemsize
                   for path, dtype, ndim in self.files)

    def resume(self, index: dict) -> bool:
        """Adopt a matching unfinished index; False if an array file is missing or the wrong size."""
        if not self.sizes_match(index):
            return False
        shape = (int(index["N"]), int(index["L"]), int(index["D"]))
        self.arrays = [np.memmap(path, dtype=dtype, mode="r+", shape=shape[:ndim]) for path, dtype, ndim in self.files]
        self.done, self.bad = int(index["done"]), [int(i) for i in index.get("bad", [])]
        return True

    def write(self, rows: list[int], feats: np.ndarray) -> None:
        """Store float32 (B', L, D) features at ``rows``, creating the arrays on the first call."""
        n, (length, dim) = self.header["N"], feats.shape[1:]
        if self.arrays is None:
            self.arrays = [np.memmap(path, dtype=dtype, mode="w+", shape=(n, length, dim)[:ndim])
                           for path, dtype, ndim in self.files]
        elif self.arrays[0].shape[1:] != (length, dim):
            raise ValueError(f"encoder output changed shape mid-build: {self.arrays[0].shape[1:]} -> {(length, dim)}")
        if self.storage == "int8":
            self.arrays[0][rows], self.arrays[1][rows] = quantize(feats)  # (B', L, D), (B', L)
        else:
            self.arrays[0][rows] = np.clip(feats, -_FP16_MAX, _FP16_MAX).astype(np.float16)  # (B', L, D)

    def save(self, complete: bool = False) -> None:
        length, dim = None, None
        if self.arrays is not None:
            for array in self.arrays:
                array.flush()
            length, dim = self.arrays[0].shape[1:]
        index = dict(self.header, L=length, D=dim, done=self.done, bad=self.bad, complete=complete)
        atomic_write_json(self.index_path, index)


def _matches(index: dict | None, header: dict) -> bool:
    return index is not None and all(index.get(k) == v for k, v in header.items()) and index.get("L") is not None


class CacheNotReady(DataError):
    """A cache that would have to be built or finished where building is not allowed (``build=False``)."""

    def __init__(self, prefix: Path, reason: str):
        super().__init__(f"feature cache {prefix} is {reason}")
        self.prefix, self.reason = prefix, reason


def _not_ready(index: dict | None, header: dict) -> str | None:
    """Why the cache whose index is ``index`` cannot be read as it is (None: it can); an empty
    ``header`` skips the check that it was built for these images and this encoder."""
    if index is None:
        return "not built"
    if not all(index.get(k) == v for k, v in header.items()):
        return "stale (built for other images, encoder weights or preprocessing)"
    if not index.get("complete") or index.get("L") is None:
        return f"unfinished ({index.get('done', 0)}/{index.get('N')} images)"
    return None


def cache_prefix(cache_dir: str | Path, encoder_cfg: EncoderConfig, image_size: int, split: str, precision: str,
                 storage: str = "f16") -> tuple[Path, str]:
    """Where :func:`open_or_build` keeps one split's cache (``<cache_dir>/<split>-<key>[-int8]``), and its key."""
    key = cache_key(encoder_cfg, image_size, precision)
    name = f"{split}-{key}" if storage == "f16" else f"{split}-{key}-{storage}"
    return Path(cache_dir) / name, key


def cache_state(prefix: str | Path) -> str | None:
    """Whether the cache at ``prefix`` is finished, by its index alone (None when it is; else why not).
    A cheap look before anything is loaded; :func:`build_features` also checks the images and encoder."""
    return _not_ready(_read_index(_index_path(Path(prefix))), {})


def build_features(encoder: nn.Module, records: Sequence[ImageRecord], transform: ImageTransform,
                   path_prefix: str | Path, *, runtime: Runtime | None = None, batch_size: int = 32,
                   progress: bool = True, key: str | None = None, flush_every: int = 20,
                   storage: str = "f16", build: bool = True) -> FeatureStore:
    """Encode every record's image once into ``<prefix>.f16`` (or, ``storage="int8"``, ``.i8`` and
    ``.scale``) and ``<prefix>.json``; resume if interrupted.

    ``key`` (default: the prefix's file name) identifies the encoder settings; with the image ids, the
    encoder's weights and the transform it decides whether an existing cache is reused or rebuilt.
    Images go through the one inference path (:func:`caption.pipeline.encode_images`, a captioning
    :class:`Encoder` as its :func:`caption.pipeline.inference_encoder` copy) in ``runtime``'s device
    and precision (default: the CPU in fp32); the key should name the precision (:func:`cache_key`).
    Unreadable images are recorded in ``bad`` (their features stay zero) and reported, not fatal.
    ``build=False`` only opens a finished, matching cache, and raises :class:`CacheNotReady` (touching
    nothing) where one would have to be built, finished or rebuilt.
    """
    if not records:
        raise ValueError("build_features needs at least one record")
    runtime = runtime or resolve_runtime("cpu", "fp32")
    prefix = Path(path_prefix)
    header = {
        "version": FORMAT_VERSION, "key": key or Path(path_prefix).name, "N": len(records),
        "image_ids": [int(r.image_id) for r in records], "encoder": encoder_digest(encoder),
        "transform": re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform)),  # no object addresses
        **({} if storage == "f16" else {"storage": storage}),  # f16 indexes predate the field
    }
    state = _Progress(prefix, storage, header)
    index = _read_index(state.index_path)
    if not build:
        reason = _not_ready(index, header) or (None if state.sizes_match(index) else "missing its arrays")
        if reason is not None:
            raise CacheNotReady(prefix, reason)
        return FeatureStore(path_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    if _matches(index, header) and state.resume(index):
        if index.get("complete"):
            return FeatureStore(path_prefix)
        log.info("resuming feature cache %s at %d/%d images", path_prefix, state.done, len(records))
    else:
        for stale in [*(path for path, _, _ in state.files), state.index_path]:
            stale.unlink(missing_ok=True)
    runner = inference_encoder(encoder, transform.image_size) if isinstance(encoder, Encoder) else encoder
    _encode_remaining(runner, records, transform, state, runtime, batch_size, progress, flush_every)
    if state.arrays is None:
        raise DataError(f"none of the {len(records)} images could be read; no features were cached")
    state.save(complete=True)
    if state.bad:
        first = set(state.bad[:5])
        log.warning("%d unreadable image(s) cached as zeros and marked bad, e.g. %s", len(state.bad),
                    ", ".join(str(r.path) for r in records if r.image_id in first))
    return FeatureStore(path_prefix)


def _encode_remaining(encoder: nn.Module, records: Sequence[ImageRecord], transform: ImageTransform,
                      state: _Progress, runtime: Runtime, batch_size: int, progress: bool, flush_every: int) -> None:
    """Run the encoder over records[state.done:] in order, writing rows and flushing as it goes."""
    start, n = state.done, len(records)
    was_training = encoder.training
    encoder.eval()
    bar = tqdm(total=n, initial=start, desc="caching features", unit="img", disable=not progress)
    positions = range(start, n)
    try:
        batches = encode_images(encoder, positions, lambda i: preprocess(records[i].path, transform, pixels=True),
                                transform, runtime, batch_size=batch_size)
        for b, batch in enumerate(batches):
            if batch.features is not None:
                state.write([batch.items[i] for i in batch.rows()], batch.features.float().cpu().numpy())
            state.bad.extend(int(records[i].image_id) for i, r in zip(batch.items, batch.results)
                             if isinstance(r, ImageError))
            state.done = batch.items[-1] + 1
            bar.update(len(batch.items))
            if (b + 1) % flush_every == 0:
                state.save()
    finally:
        bar.close()
        encoder.train(was_training)
        state.save()  # also on errors and Ctrl-C: a rerun starts where this one stopped


def open_or_build(encoder: nn.Module, records: Sequence[ImageRecord], transform: ImageTransform,
                  cache_dir: str | Path, encoder_cfg: EncoderConfig, image_size: int, split: str,
                  runtime: Runtime | None = None, storage: str = "f16", **kwargs) -> FeatureStore:
    """The cache of one split under ``cache_dir`` (``<split>-<cache_key>``, ``-int8`` added for that
    storage), built or finished if needed, by the encoder running in ``runtime`` (default: the CPU in fp32)."""
    runtime = runtime or resolve_runtime("cpu", "fp32")
    prefix, key = cache_prefix(cache_dir, encoder_cfg, image_size, split, runtime.precision.name, storage)
    return build_features(encoder, records, transform, prefix, key=key, runtime=runtime, storage=storage, **kwargs)
