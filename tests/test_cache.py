"""Feature cache: exact values, index round-trip, resume after an interruption, rebuild when stale, pickling."""

from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from caption.config import EncoderConfig, ModelConfig
from caption.data.datasets import CaptionDataset, collate_captions
from caption.data.images import image_transform, preprocess
from caption.data.records import ImageRecord
from caption.model import build_encoder
from caption.runtime import resolve_runtime
from caption.training.cache import (
    FeatureStore,
    build_features,
    cache_key,
    open_or_build,
    quantize,
)
from caption.vocab import Vocabulary

N_IMAGES = 7
BATCH = 2


class TinyEncoder(nn.Module):
    """conv + adaptive pool -> (B, L=4, D=5); counts the images it encodes and can fail on call k."""

    def __init__(self, fail_on_call: int | None = None, on_call=None):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.calls, self.images = 0, 0
        self.fail_on_call, self.on_call = fail_on_call, on_call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.on_call is not None:
            self.on_call(self.calls)
        if self.calls == self.fail_on_call:
            raise RuntimeError("simulated interruption")
        self.images += x.shape[0]
        return self.pool(self.conv(x)).flatten(2).transpose(1, 2)  # (B, L, D)


def _encoder(seed: int = 0, **kwargs) -> TinyEncoder:
    torch.manual_seed(seed)
    return TinyEncoder(**kwargs)


@pytest.fixture()
def records(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    out = []
    for i in range(N_IMAGES):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (9 + i, 11, 3), dtype=np.uint8)).save(path)
        out.append(ImageRecord(100 + i, path, (f"picture number {i}", "a thing")))
    return out


TRANSFORM = image_transform(8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _direct(encoder: nn.Module, record: ImageRecord) -> torch.Tensor:
    with torch.no_grad():
        return encoder(preprocess(record.path, TRANSFORM)[None])[0]  # (L, D)


def _build(encoder, records, prefix, **kwargs) -> FeatureStore:
    return build_features(encoder, records, TRANSFORM, prefix, batch_size=BATCH, progress=False, **kwargs)


def test_cache_key_is_short_stable_and_sensitive():
    cfg = ModelConfig(encoder="efficientnet_lite0", weights="DEFAULT", grid=7)
    key = cache_key(EncoderConfig.of(cfg), 224)
    assert key.startswith("efficientnet_lite0-DEFAULT-224-g7-") and len(key.rsplit("-", 1)[1]) == 8
    assert cache_key(EncoderConfig.of(ModelConfig(encoder="efficientnet_lite0", weights="DEFAULT", grid=7)), 224) == key
    for field, value in (("stage", 16), ("coord_features", True), ("small_channels", 32), ("grid", 14)):
        assert cache_key(EncoderConfig.of(dataclasses.replace(cfg, **{field: value})), 224) != key, field
    assert cache_key(EncoderConfig.of(cfg), 256) != key
    # decoder settings don't matter
    assert cache_key(EncoderConfig.of(dataclasses.replace(cfg, attention="dot", hidden_dim=64)), 224) == key


def test_build_matches_direct_encoding_and_round_trips(records, tmp_path):
    encoder = _encoder()
    encoder.train()
    store = _build(encoder, records, tmp_path / "cache" / "train")
    assert encoder.training  # mode restored; the build itself ran in eval
    assert len(store) == N_IMAGES and store.shape == (N_IMAGES, 4, 5)
    assert store.image_ids == [r.image_id for r in records] and store.bad == set()
    for i, record in enumerate(records):
        feats = store[i]
        assert feats.dtype == torch.float32 and feats.shape == (4, 5)
        torch.testing.assert_close(feats, _direct(encoder, record), atol=2e-3, rtol=1e-3)
    assert store.index_of(103) == 3
    index = json.loads((tmp_path / "cache" / "train.json").read_text())
    assert index["complete"] and index["done"] == N_IMAGES and (index["N"], index["L"], index["D"]) == (7, 4, 5)
    raw = np.memmap(tmp_path / "cache" / "train.f16", dtype=np.float16, mode="r", shape=(7, 4, 5))
    assert np.array_equal(raw[2].astype(np.float32), store[2].numpy())
    reopened = FeatureStore(tmp_path / "cache" / "train")
    assert torch.equal(reopened[6], store[6])


def test_unreadable_images_are_recorded_as_bad(records, tmp_path):
    records[4].path.write_text("not a png")
    records[5].path.unlink()
    encoder = _encoder()
    store = _build(encoder, records, tmp_path / "c")
    assert store.bad == {104, 105}
    assert torch.count_nonzero(store[4]) == 0 and torch.count_nonzero(store[5]) == 0
    torch.testing.assert_close(store[6], _direct(encoder, records[6]), atol=2e-3, rtol=1e-3)
    data = CaptionDataset(records, Vocabulary(), features=store)
    batches = [b for b in DataLoader(data, batch_size=4, collate_fn=collate_captions) if b is not None]
    assert sum(len(b.image_index) for b in batches) == 2 * (N_IMAGES - 2) and data.skipped == 2


def test_interrupted_build_resumes_without_recomputing(records, tmp_path):
    prefix = tmp_path / "c"
    on_disk = []

    def peek(call: int) -> None:  # before call 4, the periodic flush must already be on disk
        if call == 4:
            on_disk.append(json.loads((tmp_path / "c.json").read_text())["done"])

    first = _encoder(fail_on_call=4, on_call=peek)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        _build(first, records, prefix, flush_every=1)
    assert on_disk == [3 * BATCH]
    index = json.loads((tmp_path / "c.json").read_text())
    assert index["done"] == 3 * BATCH and not index["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        FeatureStore(prefix)

    second = _encoder()  # same weights: the cache is resumed
    store = _build(second, records, prefix)
    assert second.images == N_IMAGES - 3 * BATCH
    for i, record in enumerate(records):
        torch.testing.assert_close(store[i], _direct(second, record), atol=2e-3, rtol=1e-3)

    third = _encoder()
    _build(third, records, prefix)
    assert third.calls == 0  # complete: nothing recomputed


def test_stale_cache_is_rebuilt(records, tmp_path):
    prefix = tmp_path / "c"
    _build(_encoder(), records, prefix, key="a")
    for kwargs, encoder, recs in [
        ({"key": "b"}, _encoder(), records),  # other encoder settings
        ({"key": "b"}, _encoder(seed=1), records),  # other weights
        ({"key": "b"}, _encoder(seed=1), records[:5]),  # other records
    ]:
        store = _build(encoder, recs, prefix, **kwargs)
        assert encoder.images == len(recs) and len(store) == len(recs)
        torch.testing.assert_close(store[0], _direct(encoder, recs[0]), atol=2e-3, rtol=1e-3)
    other_size = _encoder(seed=1)
    build_features(other_size, records[:5], image_transform(12, (0.5,) * 3, (0.25,) * 3), prefix,
                   batch_size=BATCH, progress=False, key="b")
    assert other_size.images == 5  # other preprocessing


def test_feature_store_pickles_without_an_open_mapping(records, tmp_path):
    store = _build(_encoder(), records, tmp_path / "c")
    first = store[0]  # opens the memmap in this process
    blob = pickle.dumps(store)
    assert len(blob) < 2000 and b"memmap" not in blob
    clone = pickle.loads(blob)
    assert torch.equal(clone[0], first) and clone.index_of(106) == 6
    data = CaptionDataset(records, Vocabulary(), features=store)
    loader = DataLoader(data, batch_size=5, num_workers=2, collate_fn=collate_captions)
    assert sum(len(b.image_index) for b in loader) == 2 * N_IMAGES


def test_open_or_build_names_the_split(records, tmp_path):
    cfg = EncoderConfig.of(ModelConfig(encoder="small", grid=2))
    store = open_or_build(_encoder(), records, TRANSFORM, tmp_path, cfg, 8, "val", batch_size=BATCH, progress=False)
    assert store.prefix == tmp_path / f"val-{cache_key(cfg, 8)}" and len(store) == N_IMAGES


def test_precision_that_changes_features_changes_the_cache_key():
    spec = EncoderConfig.of(ModelConfig(encoder="efficientnet_lite0", weights="DEFAULT", grid=7))
    assert cache_key(spec, 224) == cache_key(spec, 224, "fp32") == "efficientnet_lite0-DEFAULT-224-g7-6a7805ac"
    bf16 = cache_key(spec, 224, "bf16")
    assert bf16.startswith("efficientnet_lite0-DEFAULT-224-g7-bf16-") and bf16 != cache_key(spec, 224, "fp16")


def test_a_bf16_cache_is_its_own_file_close_to_the_fp32_one(tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path)
        records.append(ImageRecord(i, path, ("a thing",)))
    records.append(ImageRecord(9, tmp_path / "missing.png", ("gone",)))
    cfg = ModelConfig(encoder="small", grid=2, small_channels=16)
    encoder = build_encoder(cfg)
    transform = image_transform(16, encoder.mean, encoder.std)
    stores = {
        name: open_or_build(encoder, records, transform, tmp_path / "cache", EncoderConfig.of(cfg), 16, "train",
                            runtime=resolve_runtime("cpu", name), batch_size=2, progress=False)
        for name in ("fp32", "bf16")
    }
    assert stores["fp32"].prefix != stores["bf16"].prefix and "-bf16-" in stores["bf16"].prefix.name
    assert stores["fp32"].bad == stores["bf16"].bad == {9}
    for i in range(5):
        torch.testing.assert_close(stores["bf16"][i], stores["fp32"][i], atol=0.05, rtol=0.05)
    direct = build_features(encoder, records[:5], transform, tmp_path / "direct", batch_size=5, progress=False)
    torch.testing.assert_close(direct[3], stores["fp32"][3])  # threads or not, the same features


def test_quantize_keeps_every_value_within_half_a_step_of_its_cells_scale():
    rng = np.random.default_rng(1)
    feats = (rng.standard_normal((3, 6, 40)) * rng.uniform(0.01, 50, (3, 6, 1))).astype(np.float32)  # (B, L, D)
    feats[1, 2] = 0.0  # an all-zero cell
    q, scale = quantize(feats)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (3, 6)
    assert np.abs(q).max() == 127 and scale[1, 2] == 0 and not q[1, 2].any()
    error = np.abs(q * scale[..., None] - feats)  # (B, L, D)
    assert (error <= scale[..., None] / 2 * (1 + 1e-5) + 1e-12).all()


def test_an_int8_cache_takes_half_the_disk_resumes_and_reads_back_within_a_step(records, tmp_path):
    f16 = _build(_encoder(), records, tmp_path / "f16")
    first = _encoder(fail_on_call=3)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        _build(first, records, tmp_path / "i8", storage="int8", flush_every=1)
    second = _encoder()
    int8 = _build(second, records, tmp_path / "i8", storage="int8")
    assert second.images == N_IMAGES - 2 * BATCH  # resumed after the two flushed batches
    assert int8.storage == "int8" and int8.shape == f16.shape and "storage=int8" in repr(int8)
    assert (tmp_path / "i8.i8").stat().st_size == N_IMAGES * 4 * 5 and (tmp_path / "i8.scale").stat().st_size == N_IMAGES * 4 * 4
    assert (tmp_path / "f16.f16").stat().st_size == 2 * N_IMAGES * 4 * 5 and not (tmp_path / "i8.f16").exists()
    for i in range(N_IMAGES):
        exact = _direct(second, records[i])  # (L, D)
        step = exact.abs().amax(dim=1, keepdim=True) / 127  # (L, 1)
        assert int8[i].dtype == torch.float32
        assert ((int8[i] - exact).abs() <= step / 2 + 2e-3).all()
    clone = pickle.loads(pickle.dumps(int8))
    assert torch.equal(clone[3], int8[3])


def test_storage_is_part_of_the_cache_name_and_unknown_storage_is_refused(records, tmp_path):
    cfg = EncoderConfig.of(ModelConfig(encoder="small", grid=2))
    store = open_or_build(_encoder(), records, TRANSFORM, tmp_path, cfg, 8, "train", batch_size=BATCH,
                          progress=False, storage="int8")
    assert store.prefix == tmp_path / f"train-{cache_key(cfg, 8)}-int8" and store.storage == "int8"
    with pytest.raises(ValueError, match="storage must be one of f16, int8"):
        _build(_encoder(), records, tmp_path / "x", storage="int4")
