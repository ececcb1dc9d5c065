"""A run directory holds one run: another training is refused unless resumed or overwritten, and
locked out while one trains."""

from __future__ import annotations

import dataclasses
import time

import pytest
from conftest import tiny_config

from caption.checkpoint import read_checkpoint
from caption.commands.main import main
from caption.config import save_config
from caption.training.loop import fit
from caption.training.run_dir import RunDirError
from caption.training.splits import prepare

pytestmark = pytest.mark.slow  # training runs


def _files(run_dir) -> dict:
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("caption train: error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_train_refuses_a_directory_that_holds_a_run_unless_told(shapes_dir, tmp_path, capsys):  # noqa: F811
    cfg = tiny_config(shapes_dir, "train.epochs=1")
    run, config = tmp_path / "run", tmp_path / "tiny.yaml"
    save_config(cfg, config)
    fit(cfg, run, progress_bars=False)
    before = _files(run)
    train = ["train", "--config", str(config), "--run-dir", str(run), "--device", "cpu"]
    for overrides in ([], ["model.hidden_dim=32"]):  # the same config or another one
        assert main([*train, *overrides]) == 2
        line = _error_line(capsys)
        assert f"{run} already holds a run" in line and "--resume" in line and "--overwrite" in line
        assert _files(run) == before
    assert main(["train", "--resume", str(run), "--overwrite"]) == 2
    assert "--resume" in _error_line(capsys) and _files(run) == before
    # --overwrite starts over: the old checkpoints, metrics and TensorBoard logs go first
    assert main([*train, "--overwrite", "model.hidden_dim=32"]) == 0
    assert len((run / "metrics.csv").read_text().splitlines()) == 2
    assert read_checkpoint(run / "last.pt")["config"]["model"]["hidden_dim"] == 32
    assert len(list((run / "tb").iterdir())) == 1


def test_a_prepared_directory_is_not_a_run(shapes_dir, tmp_path):  # noqa: F811
    cfg = tiny_config(shapes_dir, "train.epochs=1")
    prepare(cfg, tmp_path / "run")  # config.yaml and vocab.json, written before training
    assert fit(cfg, tmp_path / "run", progress_bars=False).epochs == 1


def test_a_second_training_of_a_locked_directory_fails_at_once(shapes_dir, tmp_path):  # noqa: F811
    cfg = tiny_config(shapes_dir, "train.epochs=1", "train.checkpoint_every=2")
    run, refused = tmp_path / "run", []

    def second_writer(progress):
        if progress.step != 3:  # the first training has written last.pt (step 2) and holds the lock
            return
        before = _files(run)
        for flags in ({}, {"resume": True}, {"overwrite": True}):
            start = time.perf_counter()
            with pytest.raises(RunDirError, match="in use by another training") as err:
                fit(cfg, run, progress_bars=False, **flags)
            assert time.perf_counter() - start < 5 and "\n" not in str(err.value)
            refused.append(flags)
        assert _files(run) == before

    fit(cfg, run, progress_bars=False, on_step=second_writer)
    assert len(refused) == 3
    # the lock goes with the training that held it
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=2))
    assert fit(longer, run, resume=True, progress_bars=False).epochs == 2
