"""The runtime (device, precision, threads): auto's choice on faked machines, explicit precisions and
refusals, threads, and the one stderr line every command prints."""

from __future__ import annotations

import json
import platform

import pytest
import torch
from PIL import Image

from caption.config import (
    Config,
    ConfigError,
    load_config,
    save_config,
)
from caption.errors import CaptionError
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


# ----------------------------------------------------------------------------- config: precision


def test_precision_is_one_config_value(tmp_path):
    assert Config().precision == "auto"
    cfg = load_config(None, ["precision=bf16"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    with pytest.raises(ConfigError, match="'precision'"):
        load_config(None, ["precision=fp8"])
    with pytest.raises(ConfigError, match="train.amp"):  # the old switch is gone: precision replaces it
        load_config(None, ["train.amp=false"])


# ----------------------------------------------------------------------------- commands


def test_runtime_sets_and_reports_its_threads():
    before = torch.get_num_threads()
    try:
        runtime = resolve_runtime("cpu", "auto", threads=1, probe=_machine("cpu", False))
        assert runtime.threads == torch.get_num_threads() == 1 and runtime.device == torch.device("cpu")
        assert runtime.precision.name == "fp32" and runtime.describe().endswith("device cpu (fake cpu), 1 thread")
        assert resolve_runtime("cpu", "fp32").threads == 1  # None keeps what the process has
        with pytest.raises(CaptionError, match="threads"):
            resolve_runtime("cpu", "fp32", threads=0)
        with pytest.raises(CaptionError, match="device"):
            resolve_runtime("nonsense", "fp32")
    finally:
        torch.set_num_threads(before)


def test_predict_reports_precision_device_and_threads_on_stderr_only(tiny_checkpoint, tmp_path, capsys):
    from caption.commands.main import main

    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(image)
    before = torch.get_num_threads()
    try:
        args = ["predict", str(image), "--checkpoint", str(tiny_checkpoint), "--precision", "bf16", "--threads", "1"]
        assert main(args) == 0
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr()
    assert out.out.startswith(f"{image}\t") and len(out.out.splitlines()) == 1
    report = [line for line in out.err.splitlines() if line.startswith("caption predict: precision")]
    assert len(report) == 1 and report[0].startswith("caption predict: precision bf16 (as asked), device cpu (")
    assert report[0].endswith(", 1 thread")
    assert main(["predict", str(image), "--checkpoint", str(tiny_checkpoint), "--precision", "fp16"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.strip().splitlines()[-1].startswith("caption predict: error: precision fp16")


@pytest.mark.slow
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
