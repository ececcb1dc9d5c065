"""Two CPU processes under torchrun (gloo) end a step with the weights of one process on the same global
batch; a multi-process run reads the feature cache `caption prepare` built, and without one stops at once."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config

from caption.checkpoint import read_checkpoint
from caption.config import apply_overrides, save_config
from caption.data.records import load_split
from caption.errors import DataError
from caption.model import build_encoder
from caption.runtime import resolve_runtime
from caption.training.distributed import Dist
from caption.training.loop import fit
from caption.training.splits import prepare, require_cache, split_data
from caption.vocab import Vocabulary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_train(cfg, tmp_path, run_dir, prepared: bool = True) -> subprocess.CompletedProcess:
    """``caption train`` of ``cfg`` into ``run_dir`` by two CPU processes (gloo), after ``caption prepare``
    (in this process) as docs/coco.md says; ``prepared=False``: without it, and the run must fail."""
    if prepared:
        prepare(cfg, run_dir, runtime=resolve_runtime("cpu", cfg.precision), progress=False)
    config = tmp_path / "tiny.yaml"
    save_config(cfg, config)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "caption", "train", "--config", str(config),
           "--run-dir", str(run_dir), "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert (proc.returncode == 0) == prepared, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_process_ddp_step_equals_single_process(shapes_dir, tmp_path):  # noqa: F811
    # one optimizer step per epoch: the global batch holds every training caption (32 images x 5);
    # frozen (cached) encoder: BatchNorm statistics of a per-process half batch would differ on CPU
    cfg = tiny_config(shapes_dir, "train.epochs=1", "train.batch_size=160", "model.dropout=0.0",
                      "model.fine_tune=false")
    fit(cfg, tmp_path / "single", progress_bars=False)
    _torchrun_train(cfg, tmp_path, tmp_path / "ddp")
    single = read_checkpoint(tmp_path / "single" / "last.pt")
    ddp = read_checkpoint(tmp_path / "ddp" / "last.pt")
    assert single["progress"]["step"] == ddp["progress"]["step"] == 1
    moved = 0
    for key, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
        moved += int(value.dtype.is_floating_point and value.abs().sum() > 0)
    assert moved > 10


@pytest.mark.slow
def test_fine_tuning_from_an_epoch_under_ddp_averages_the_encoder_gradients(shapes_dir, tmp_path):  # noqa: F811
    # the encoder is frozen in epoch 1 (one step) and trained from epoch 2 (one step): the DDP wrapper
    # must then average its gradients too, so rank 0 ends with the single-process weights
    cfg = tiny_config(shapes_dir, "train.epochs=2", "train.batch_size=160", "model.dropout=0.0",
                      "model.fine_tune=false", "train.fine_tune_from_epoch=1")
    fit(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=1)), tmp_path / "epoch1",
        progress_bars=False)
    fit(cfg, tmp_path / "single", progress_bars=False)
    proc = _torchrun_train(cfg, tmp_path, tmp_path / "ddp")
    before = read_checkpoint(tmp_path / "epoch1" / "last.pt")["model"]
    single = read_checkpoint(tmp_path / "single" / "last.pt")["model"]
    ddp = read_checkpoint(tmp_path / "ddp" / "last.pt")["model"]
    encoder = [k for k, v in single.items() if k.startswith("encoder.") and v.is_floating_point()]
    assert sum(not torch.equal(before[k], single[k]) for k in encoder) > 4  # epoch 2 trained the encoder
    for key in encoder:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-5, atol=1e-6, msg=key)
    assert proc.stdout.count("run directory:") == 1  # printed by rank 0 only


def test_only_rank_0_prints_the_run_directory(tmp_path, monkeypatch, capsys):
    import caption.training.loop
    from caption.commands.main import main
    from caption.config import load_config

    monkeypatch.setattr(caption.training.loop, "fit", lambda cfg, run_dir, **kw: caption.training.loop.FitResult(run_dir, 0.5, 1, []))
    save_config(load_config(None, ["name=tiny"]), tmp_path / "tiny.yaml")
    printed = {}
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        assert main(["train", "--config", str(tmp_path / "tiny.yaml"), "--run-dir", str(tmp_path / "run")]) == 0
        printed[rank] = capsys.readouterr().out
    assert printed["1"] == "" and printed["0"].startswith(f"run directory: {tmp_path / 'run'}")


@pytest.mark.slow
def test_two_processes_without_a_cache_stop_before_writing_and_say_prepare(shapes_dir, tmp_path):
    cfg = tiny_config(shapes_dir, "train.epochs=1", "model.fine_tune=false")
    run_dir = tmp_path / "ddp"
    proc = _torchrun_train(cfg, tmp_path, run_dir, prepared=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("caption train: error:")]
    assert errors and all(line == errors[0] for line in errors), proc.stderr[-3000:]  # one line (per process)
    assert "feature cache" in errors[0] and "not built" in errors[0] and "`caption prepare`" in errors[0]
    assert not run_dir.exists()  # nothing written: no config, vocabulary, lock or half-built cache


def test_a_multi_process_run_checks_the_cache_before_anything_is_written(shapes_dir, tmp_path):
    cfg = tiny_config(shapes_dir, "model.fine_tune=false")
    run_dir = tmp_path / "run"
    with pytest.raises(DataError, match=r"train split's feature cache .* is not built: .*`caption prepare`"):
        require_cache(cfg, run_dir, "fp32")
    assert not run_dir.exists()
    require_cache(apply_overrides(cfg, ["data.cache=none"]), run_dir, "fp32")  # nothing cached: nothing to check
    require_cache(apply_overrides(cfg, ["model.fine_tune=true"]), run_dir, "fp32")
    prepare(cfg, run_dir, runtime=resolve_runtime("cpu", "fp32"), progress=False)
    require_cache(cfg, run_dir, "fp32")  # finished by one process: torchrun may start


def test_a_multi_process_run_opens_a_finished_cache_and_never_rebuilds_a_stale_one(shapes_dir, tmp_path):
    cfg = tiny_config(shapes_dir, "model.fine_tune=false")
    run_dir, runtime = tmp_path / "run", resolve_runtime("cpu", "fp32")
    prepare(cfg, run_dir, runtime=runtime, progress=False)
    files = {p: p.read_bytes() for p in (run_dir / "cache").iterdir()}
    torch.manual_seed(cfg.train.seed)  # the encoder prepare cached
    encoder, vocab = build_encoder(cfg.model), Vocabulary.load(run_dir / "vocab.json")
    rank1 = Dist(rank=1, world=2, device=torch.device("cpu"))  # no process group: a build would need one
    records = load_split(cfg.data, "train")
    data = split_data(cfg, "train", vocab, encoder, run_dir, runtime=runtime, records=records, dist=rank1)
    assert len(data.features) == len(records)
    with pytest.raises(DataError, match="train split's feature cache .* is stale"):  # other images: rebuild needed
        split_data(cfg, "train", vocab, encoder, run_dir, runtime=runtime, records=records[1:], dist=rank1)
    assert {p: p.read_bytes() for p in (run_dir / "cache").iterdir()} == files  # left as it was
