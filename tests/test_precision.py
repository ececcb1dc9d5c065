"""Precision per device: auto's choice on faked machines, the old ``train.amp`` switch, bf16 paths on any
CPU (fp32 log-probabilities, losses and beam scores), the cache key, channels-last encoders and the
one stderr line every command prints."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_model_config
from PIL import Image

from caption.checkpoint import load_checkpoint
from caption.config import (
    Config,
    ConfigError,
    EncoderConfig,
    ModelConfig,
    from_dict,
    load_config,
    save_config,
    to_dict,
)
from caption.data.images import ImageError, image_transform, prefetch
from caption.data.records import ImageRecord
from caption.decoding import DecodingOptions, decode
from caption.decoding.search import _log_probs
from caption.errors import CaptionError
from caption.inference import SHIPPED_MODEL, load
from caption.model import SCORERS, AttentionDecoder, build_encoder
from caption.model.attention import _chunked, _tanh_mlp, _tanh_mlp_reference
from caption.model.fuse import fused_for_inference
from caption.model.ops.deferred import DeferredLinear
from caption.runtime import (
    Capabilities,
    cpu_capabilities,
    cpu_flags,
    cpu_name,
    keep_freed_memory,
    probe,
    resolve_precision,
    resolve_runtime,
)
from caption.training.cache import build_features, cache_key, open_or_build
from caption.training.losses import caption_loss
from caption.vocab import END_ID, START_ID

BF16 = torch.autocast("cpu", dtype=torch.bfloat16)


def _machine(device_type: str, bf16: bool, why: str = "faked"):
    return lambda device: Capabilities(device_type, f"fake {device_type}", bf16, why)


# ----------------------------------------------------------------------------- auto's choice


@pytest.mark.parametrize("flags, expected, why", [
    ({"avx2", "amx_tile", "amx_bf16", "avx512_bf16"}, "bf16", "amx_bf16"),
    ({"avx2", "avx512f", "avx512_bf16"}, "bf16", "avx512_bf16"),
    ({"avx2", "avx512f"}, "fp32", "no amx_bf16/avx512_bf16"),
    (set(), "fp32", "no amx_bf16/avx512_bf16"),
])
def test_auto_on_a_cpu_follows_its_bf16_flags(flags, expected, why):
    caps = cpu_capabilities(frozenset(flags), "Some CPU")
    precision = resolve_precision("auto", "cpu", probe=lambda device: caps)
    assert (precision.name, precision.why, precision.requested) == (expected, why, "auto")
    assert precision.lowered == (expected == "bf16")
    assert precision.describe() == f"precision {expected} (auto: {why}), device cpu (Some CPU)"


@pytest.mark.parametrize("bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cuda_is_bf16_only_where_the_gpu_has_it(bf16, expected):
    precision = resolve_precision("auto", torch.device("cuda"), probe=_machine("cuda", bf16))
    assert precision.name == expected and precision.device.type == "cuda"


def test_explicit_precisions_and_refusals():
    no_bf16_cpu, no_bf16_gpu = _machine("cpu", False), _machine("cuda", False)
    assert resolve_precision("fp32", "cpu", probe=_machine("cpu", True)).name == "fp32"
    assert resolve_precision("bf16", "cpu", probe=no_bf16_cpu).dtype == torch.bfloat16  # emulated: slow, correct
    assert resolve_precision(None, "cpu", probe=no_bf16_cpu).name == "fp32"  # None is auto
    assert resolve_precision("fp16", torch.device("cuda"), probe=no_bf16_gpu).dtype == torch.float16
    with pytest.raises(CaptionError, match="fp16 does not run on a CPU") as err:
        resolve_precision("fp16", "cpu", probe=no_bf16_cpu)
    assert "\n" not in str(err.value)
    with pytest.raises(CaptionError, match="has no bf16"):
        resolve_precision("bf16", torch.device("cuda"), probe=no_bf16_gpu)
    with pytest.raises(CaptionError, match="choose from auto, fp32, bf16, fp16"):
        resolve_precision("fp8", "cpu", probe=no_bf16_cpu)


def test_the_real_machine_is_probed_from_its_cpu_flags():
    caps = probe(torch.device("cpu"))
    assert caps.device_type == "cpu" and caps.name == cpu_name() and caps.name
    assert caps.bf16 == bool({"amx_bf16", "avx512_bf16"} & cpu_flags())
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert keep_freed_memory()


def test_autocast_context_matches_the_precision():
    with resolve_precision("bf16", "cpu").autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with resolve_precision("fp32", "cpu").autocast():
        assert not torch.is_autocast_enabled("cpu")


# ----------------------------------------------------------------------------- config: precision, train.amp


def test_precision_is_one_config_value_and_amp_still_loads(tmp_path):
    assert Config().precision == "auto"
    old = tmp_path / "old.yaml"
    for amp, expected in ((True, "auto"), (False, "fp32")):
        old.write_text(yaml.safe_dump({"train": {"amp": amp, "epochs": 3}}))
        cfg = load_config(old)
        assert cfg.precision == expected and cfg.train.epochs == 3
        assert "amp" not in to_dict(cfg)["train"]
    assert load_config(None, ["train.amp=false"]).precision == "fp32"  # the old override too
    old.write_text(yaml.safe_dump({"precision": "bf16", "train": {"amp": False}}))
    assert load_config(old).precision == "bf16"  # an explicit precision wins
    cfg = load_config(None, ["precision=bf16"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    with pytest.raises(ConfigError, match="'precision'"):
        load_config(None, ["precision=fp8"])
    with pytest.raises(ConfigError, match="train.amp"):
        load_config(None, ["train.amp=maybe"])


def test_the_shipped_checkpoint_carrying_amp_keeps_loading():
    raw = torch.load(SHIPPED_MODEL, map_location="cpu", weights_only=True)
    assert raw["config"]["train"]["amp"] is True  # the file as shipped
    assert from_dict(Config, raw["config"]).precision == "auto"
    loaded = load_checkpoint(SHIPPED_MODEL)
    assert loaded.config.precision == "auto"


# ----------------------------------------------------------------------------- bf16 paths on any CPU


def _captions(B: int = 3, T: int = 6, V: int = 20) -> torch.Tensor:
    caps = torch.randint(4, V, (B, T + 1))
    caps[:, 0], caps[:, -1] = START_ID, END_ID
    return caps


def test_tanh_scores_are_chunked_on_a_cpu_in_fp32_and_bf16_and_match_the_formula():
    keys, query, v = torch.randn(4, 9, 12), torch.randn(4, 3, 12), torch.nn.Linear(12, 1)
    assert _chunked(keys) and _chunked(keys.bfloat16()) and not _chunked(keys.to("meta"))
    with BF16:
        low = _tanh_mlp(keys.bfloat16(), query.bfloat16(), v)  # (B, K, L)
    assert low.shape == (4, 3, 9)
    torch.testing.assert_close(low.float(), _tanh_mlp_reference(keys, query, v), atol=0.05, rtol=0.02)
    torch.testing.assert_close(_tanh_mlp(keys, query, v), _tanh_mlp_reference(keys, query, v))


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_bf16_decoding_keeps_log_probs_scores_and_maps_in_fp32(name):
    decoder = AttentionDecoder(20, 16, tiny_model_config(name)).eval()
    feats = torch.randn(3, 9, 16)
    with torch.no_grad(), BF16:
        memory = decoder.prepare(feats)
        assert memory.values.dtype == torch.bfloat16  # cast once per image, not per word
        out = decoder.step(torch.full((3,), START_ID), decoder.init_state(memory), memory)
        assert out.alpha.dtype == torch.float32
        assert _log_probs(out.logits, 0, DecodingOptions(), torch.empty(3, 0, dtype=torch.long)).dtype == torch.float32
        results = decode(decoder, feats, DecodingOptions(beam_size=3, max_len=6))
    for r in results:
        assert np.isfinite(r.log_prob) and r.alphas.dtype == torch.float32
        torch.testing.assert_close(r.alphas.sum((1, 2)), torch.ones(len(r.tokens)))


def test_bf16_training_step_close_to_fp32_with_fp32_loss_and_gradients():
    decoder = AttentionDecoder(20, 16, tiny_model_config("additive"))
    feats, caps = torch.randn(3, 9, 16), _captions()
    full = caption_loss(decoder(feats, caps))
    with BF16:
        low = caption_loss(decoder(feats, caps))
    assert low.total.dtype == low.xent.dtype == torch.float32
    torch.testing.assert_close(low.total, full.total, atol=0.05, rtol=0.02)
    low.total.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in decoder.parameters())


def test_deferred_weight_gradient_under_bf16_matches_the_per_word_one():
    layer = DeferredLinear(8, 6, bias=False)
    xs = [torch.randn(4, 8) for _ in range(3)]

    def grad(deferred: bool) -> torch.Tensor:
        layer.zero_grad()
        with BF16:
            if deferred:
                with layer.deferred():
                    loss = sum((layer(x).float() ** 2).sum() for x in xs)
            else:
                loss = sum((layer(x).float() ** 2).sum() for x in xs)
        loss.backward()
        return layer.weight.grad.clone()

    a, b = grad(True), grad(False)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=0.05 * b.abs().max().item(), rtol=0.02)


# ----------------------------------------------------------------------------- channels-last encoders


@pytest.mark.parametrize("name", ["small", "mobilenet_v3_large", "resnet50", "efficientnet_lite0"])
def test_every_backbone_runs_channels_last_with_the_same_features(name):
    torch.manual_seed(0)
    enc = build_encoder(ModelConfig(encoder=name, weights="none", grid=2, small_channels=16)).eval()
    convs = [m.weight for m in enc.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        feats = enc(images)  # (B, L, D)
        nchw = enc.pool(enc.blocks.to(memory_format=torch.contiguous_format)(images.contiguous()))
    assert feats.is_contiguous()
    torch.testing.assert_close(feats, nchw.flatten(2).transpose(1, 2), atol=1e-4, rtol=1e-4)


def test_loading_weights_keeps_the_channels_last_layout():
    cfg = ModelConfig(encoder="small", grid=2, small_channels=16)
    enc, other = build_encoder(cfg), build_encoder(cfg)
    other.load_state_dict({k: v.contiguous() for k, v in enc.state_dict().items()})
    conv = other.blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and torch.equal(conv, enc.blocks[0][0].weight)


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "resnet50", "efficientnet_lite0"])
def test_fused_encoder_folds_every_batchnorm_and_gives_the_same_features(name):
    torch.manual_seed(0)
    enc = build_encoder(ModelConfig(encoder=name, weights="none", grid=2)).eval()
    images = torch.randn(2, 3, 64, 64)
    fused = fused_for_inference(enc, torch.zeros(1, 3, 64, 64))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules())  # the original is untouched
    assert not any(p.requires_grad for p in fused.parameters())
    with torch.no_grad():
        expected = enc(images)
        torch.testing.assert_close(fused(images), expected, atol=1e-4 * expected.abs().max().item(), rtol=1e-3)


def test_fusion_that_would_change_the_output_is_not_done():
    class Reused(torch.nn.Module):  # the conv's output feeds the BatchNorm and the sum: not foldable
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
            self.bn.running_mean.fill_(0.5)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    module = Reused().eval()
    fused = fused_for_inference(module, torch.randn(1, 3, 8, 8))
    assert isinstance(fused.bn, torch.nn.BatchNorm2d) and fused is not module


# ----------------------------------------------------------------------------- feature cache


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


# ----------------------------------------------------------------------------- overlapped loading


def test_prefetch_keeps_order_returns_image_errors_and_overlaps():
    def slow(i: int) -> int:
        if i == 2:
            raise ImageError(f"{i}.jpg", "broken")
        time.sleep(0.02)
        return i * 10

    t0 = time.perf_counter()
    out = list(prefetch(range(8), slow, threads=4))
    assert time.perf_counter() - t0 < 6 * 0.02  # several at once: one after the other takes 7 * 0.02 s
    assert [i for i, _ in out] == list(range(8)) and isinstance(out[2][1], ImageError)
    assert [r for i, r in out if i != 2] == [i * 10 for i in range(8) if i != 2]
    assert list(prefetch([1, 3], lambda i: i + 1, threads=0)) == [(1, 2), (3, 4)]
    started = []
    stream = prefetch(range(1000), lambda i: started.append(i) or i, threads=1, ahead=4)
    next(stream)
    stream.close()  # stopping early cancels what has not started
    assert len(started) < 20
    with pytest.raises(ZeroDivisionError):
        list(prefetch([0], lambda i: 1 // i, threads=1))


def test_caption_model_runs_in_the_precision_asked_for(tiny_checkpoint, tmp_path):
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(image)
    fp32 = load(tiny_checkpoint, precision="fp32")
    bf16 = load(tiny_checkpoint, precision="bf16")
    assert (fp32.precision.name, bf16.precision.name) == ("fp32", "bf16")
    assert load(tiny_checkpoint).precision.requested == "auto"  # the checkpoint's own precision
    a, b = fp32.caption(image, beam=2), bf16.caption(image, beam=2)
    assert a.log_prob == pytest.approx(b.log_prob, abs=0.1) or a.tokens != b.tokens
    assert torch.equal(fp32.pixels(image), fp32.transform.pixels(fp32.load_rgb(image)))
    batch = fp32.caption_batch([image, tmp_path / "missing.png", image], beam=2)
    assert isinstance(batch[1], ImageError) and batch[0].tokens == batch[2].tokens == a.tokens
    with pytest.raises(CaptionError, match="fp16"):
        load(tiny_checkpoint, precision="fp16")


# ----------------------------------------------------------------------------- commands


def test_predict_reports_precision_and_device_on_stderr_only(tiny_checkpoint, tmp_path, capsys):
    from caption.commands.main import main

    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(image)
    assert main(["predict", str(image), "--checkpoint", str(tiny_checkpoint), "--precision", "bf16"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith(f"{image}\t") and len(out.out.splitlines()) == 1
    assert "caption predict: precision bf16 (as asked), device cpu (" in out.err
    assert main(["predict", str(image), "--checkpoint", str(tiny_checkpoint), "--precision", "fp16"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.strip().splitlines()[-1].startswith("caption predict: error: precision fp16")


def test_prepare_train_and_evaluate_report_the_precision_they_use(tmp_path, capsys):
    from caption.commands.main import main
    from caption.data.shapes import generate_shapes

    data = tmp_path / "shapes"
    generate_shapes(data, n=24, seed=1, image_size=48)
    cfg = load_config(None, [
        "name=tiny", "data.format=coco", f"data.images={data}/images", "data.image_size=48", "data.min_freq=1",
        *(f"data.{s}_captions={data}/captions_{s}.json" for s in ("train", "val", "test")),
        "model.encoder=small", "model.small_channels=8", "model.grid=2", "model.embed_dim=8", "model.hidden_dim=8",
        "model.attention_dim=8", "train.epochs=1", "train.batch_size=16", "decode.max_len=5",
    ])
    save_config(cfg, tmp_path / "tiny.yaml")
    run = tmp_path / "run"
    args = ["--config", str(tmp_path / "tiny.yaml"), "--run-dir", str(run), "--precision", "bf16"]
    assert main(["prepare", *args]) == 0
    out = capsys.readouterr()
    assert "caption prepare: precision bf16 (as asked), device cpu" in out.err
    assert "-bf16-" in json.loads(out.out)["train_cache"]["path"]
    assert main(["train", *args]) == 0
    assert "caption train: precision bf16 (as asked)" in capsys.readouterr().err
    assert load_config(run / "config.yaml").precision == "bf16"
    assert main(["evaluate", "--checkpoint", str(run), "--split", "val", "--no-java", "--json", "--precision", "fp32",
                 "--out", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr()
    assert "caption evaluate: precision fp32 (as asked)" in out.err and "CIDEr" in json.loads(out.out)
    assert main(["evaluate", "--checkpoint", str(run), "--precision", "fp16"]) == 2


# ----------------------------------------------------------------------------- benchmarks


def _benchmark(monkeypatch, capsys, script: str, *args: str) -> dict:
    import runpy

    root = Path(__file__).resolve().parents[1]
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(root / "benchmarks" / script), run_name="__main__")
    torch.set_num_threads(1)
    return json.loads(capsys.readouterr().out)


def test_predict_benchmark_reports_images_per_s_precision_device_and_cpu(tiny_checkpoint, tmp_path, monkeypatch,
                                                                         capsys):
    for i in range(3):
        Image.new("RGB", (40 + i, 30), (10 * i, 90, 200)).save(tmp_path / f"{i}.jpg")
    out = _benchmark(monkeypatch, capsys, "predict.py", "--folder", str(tmp_path), "--images", "3", "--threads", "1",
                     "--batch-size", "2", "--checkpoint", str(tiny_checkpoint), "--precision", "fp32", "bf16")
    assert out["images"] == 3 and out["beam"] == 3 and out["cpu"] == cpu_name()
    runs = [(r["precision"], r["device"], r["unreadable"]) for r in out["runs"]]
    assert runs == [("fp32", "cpu", 0), ("bf16", "cpu", 0)]
    assert all(r["images_per_s"] > 0 for r in out["runs"])


def test_decoder_benchmark_names_its_precision(monkeypatch, capsys):
    out = _benchmark(monkeypatch, capsys, "decoder.py", "--threads", "1", "--batch", "2", "--beam", "2",
                     "--repeats", "1", "--precision", "bf16")
    assert (out["precision"], out["requested"], out["device"], out["cpu"]) == ("bf16", "bf16", "cpu", cpu_name())
    assert out["train_captions_per_s"] > 0 and out["beam_images_per_s"] > 0
