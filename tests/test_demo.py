"""`caption demo` on a tiny world: a seed's run is reused, another seed's run is never reused."""

from __future__ import annotations

import pytest

from caption.commands import demo
from caption.commands.main import main
from caption.config import load_config, save_config
from caption.training.run_dir import RunDirError


@pytest.fixture
def tiny_demo(tmp_path, monkeypatch):
    """The packaged demo config, shrunk to train in seconds."""
    cfg = load_config(demo.CONFIG, [
        "data.image_size=48", "model.small_channels=8", "model.grid=3", "model.embed_dim=8", "model.hidden_dim=16",
        "model.attention_dim=8", "train.epochs=1", "train.batch_size=32", "data.keep_images=false"])
    path = tmp_path / "shapes.yaml"
    save_config(cfg, path)
    monkeypatch.setattr(demo, "CONFIG", path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_demo_reuses_its_seed_and_refuses_another(tiny_demo, capsys):
    run = tiny_demo / "run"
    scores = demo.run_demo(run, seed=0, n=40, examples=2)
    out = capsys.readouterr().out
    assert {"content_accuracy", "pointing_accuracy", "BLEU-4"} <= set(scores)
    assert f"--checkpoint {run}" in out and "caption evaluate --checkpoint" in out and "caption attend" in out
    assert demo.run_demo(run, seed=0, n=40, examples=2) == scores
    assert "reusing the trained model" in capsys.readouterr().out
    with pytest.raises(RunDirError, match="already holds a run"):
        demo.run_demo(run, seed=1, n=40, examples=2)
    demo.run_demo(run, seed=1, n=40, examples=2, overwrite=True)
    assert "training" in capsys.readouterr().out and load_config(run / "config.yaml").train.seed == 1
    # a run directory written by another version of the project (a key this one does not know)
    (run / "config.yaml").write_text((run / "config.yaml").read_text() + "future_key: 1\n")
    with pytest.raises(RunDirError, match="already holds a run"):
        demo.run_demo(run, seed=1, n=40, examples=2)
    demo.run_demo(run, seed=1, n=40, examples=2, overwrite=True)
    assert load_config(run / "config.yaml").train.seed == 1


def test_demo_default_run_directory_per_seed(tiny_demo):
    assert demo.demo_run_dir(0).as_posix() == "runs/shapes"
    assert demo.demo_run_dir(2).as_posix() == "runs/shapes-seed2"
    assert main(["demo", "--seed", "2", "--run-dir", str(tiny_demo / "x"), "--device", "nonsense"]) == 2
    assert not (tiny_demo / "x").exists()
