"""The benchmarks print one JSON line naming their precision, device and CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from caption.runtime import (
    cpu_name,
)

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


@pytest.mark.slow
def test_serve_benchmark_reports_rates_latencies_and_the_mixed_run(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import pytest

    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    for i in range(4):
        Image.new("RGB", (40 + i, 30), (10 * i, 90, 200)).save(tmp_path / f"{i}.jpg")
    out = _benchmark(monkeypatch, capsys, "serve.py", "--folder", str(tmp_path), "--images", "4", "--requests", "6",
                     "--repeats", "1", "--clients", "1", "4", "--mixed", "30", "--threads", "1", "--precision", "fp32",
                     "--max-batch", "4", "--checkpoint", str(tiny_checkpoint), "--time-cap", "120",
                     "--overload-clients", "4", "--overload-mb", "1", "--overload-rounds", "1", "--stalled", "1",
                     "--header-timeout-s", "1", "--body-timeout-s", "1")
    assert out["cpu"] == cpu_name() and out["model"]["precision"] == "fp32" and out["model"]["threads"] == 1
    assert [(r["batching"], r["clients"]) for r in out["runs"]] == [(True, 1), (False, 1), (True, 4), (False, 4)]
    for run in out["runs"]:
        assert run["requests"] == 6 and run["non_200"] == 0 and run["requests_per_s"] > 0
        assert 0 < run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"]
    assert set(out["speedup"]) == {"1", "4"}
    assert [r["mean_batch"] for r in out["runs"] if not r["batching"]] == [1.0, 1.0]
    mixed = out["mixed"]
    assert mixed["requests"] == 30 and mixed["bad"] == 10 and mixed["bad_4xx"] == 10
    assert mixed["good_200"] == mixed["good_equal_to_predict"] == 20
    assert mixed["status_5xx"] == 0 and mixed["client_errors"] == 0 and mixed["rss_after_mb"] > 0
    overload = out["overload"]
    assert overload["clients"] == 4 and overload["healthz_after"] == overload["request_after"] == 200
    (burst,) = overload["rounds"]
    assert set(burst["statuses"]) <= {"200", "503"} and sum(burst["statuses"].values()) == 4
    assert burst["rss_peak_mb"] >= burst["rss_before_mb"] > 0 and burst["p99_ms"] > 0
    stalled = out["stalled"]
    assert stalled["body_timeout_s"] == stalled["header_timeout_s"] == 1
    assert all(d["not_dropped"] == 0 and d["max_s"] < 10 for d in stalled["dropped"].values())
    assert stalled["dropped"]["body"]["statuses"] == ["408"] and stalled["others"]["non_200"] == 0


@pytest.mark.slow
def test_detector_benchmark_names_the_cpu_and_what_it_found(monkeypatch, capsys):
    from caption.guidance.detector import load_detector

    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    if load_detector()[0] is None or not (shared / "photos").is_dir():
        pytest.skip("the COCO detector or the shared photos are not here")
    out = _benchmark(monkeypatch, capsys, "detector.py", "--threads", "1", "--batch", "2", "--sizes", "300",
                     "--images", "2")
    assert out["cpu"] == cpu_name() and len(out["runs"]) == 2
    assert all(r["images_per_s"] > 0 and r["blob"] == 300 for r in out["runs"])
    assert ["cat", pytest.approx(0.96, abs=0.05)] in out["detections"]["cat.bmp"]["300"]
