"""Two CPU processes under torchrun (gloo) end a step with the weights of one process on the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

from caption.checkpoint import read_checkpoint
from caption.config import save_config
from caption.train import fit
from test_train import shapes_dir, tiny_config  # noqa: F401  (fixture re-used)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_step_equals_single_process(shapes_dir, tmp_path):  # noqa: F811
    # one optimizer step per epoch: the global batch holds every training caption (32 images x 5);
    # frozen (cached) encoder: BatchNorm statistics of a per-process half batch would differ on CPU
    cfg = tiny_config(shapes_dir, "train.epochs=1", "train.batch_size=160", "model.dropout=0.0",
                      "model.fine_tune=false")
    config = tmp_path / "tiny.yaml"
    save_config(cfg, config)
    fit(cfg, tmp_path / "single", device="cpu", progress_bars=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "caption", "train", "--config", str(config),
           "--run-dir", str(tmp_path / "ddp"), "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = read_checkpoint(tmp_path / "single" / "last.pt")
    ddp = read_checkpoint(tmp_path / "ddp" / "last.pt")
    assert single["progress"]["step"] == ddp["progress"]["step"] == 1
    moved = 0
    for key, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
        moved += int(value.dtype.is_floating_point and value.abs().sum() > 0)
    assert moved > 10
