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


@pytest.mark.slow
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


@pytest.mark.slow
def test_demo_default_run_directory_per_seed(tiny_demo):
    assert demo.demo_run_dir(0).as_posix() == "runs/shapes"
    assert demo.demo_run_dir(2).as_posix() == "runs/shapes-seed2"
    assert main(["demo", "--seed", "2", "--run-dir", str(tiny_demo / "x"), "--device", "nonsense"]) == 2
    assert not (tiny_demo / "x").exists()


class _Clock:
    """A clock that the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _train(remaining: demo.RemainingTime, clock: _Clock, *, epochs: int, steps: int, step_s: float, val_s: float,
           first_epoch: int = 0) -> None:
    """Call ``remaining`` as ``fit`` would: after every step; a validation between epochs."""
    from caption.training.state import Progress

    progress = Progress(epoch=first_epoch, step=first_epoch * steps)
    for epoch in range(first_epoch, epochs):
        progress.epoch, progress.batch = epoch, 0
        for _ in range(steps):
            clock.now += step_s
            progress.batch, progress.step = progress.batch + 1, progress.step + 1
            remaining(progress)
        clock.now += val_s


def test_remaining_time_after_the_first_epoch():
    clock, lines = _Clock(), []
    remaining = demo.RemainingTime(6, started=clock.now - 20, clock=clock, write=lines.append)
    _train(remaining, clock, epochs=6, steps=100, step_s=0.1, val_s=2.0)
    # one epoch = 100 steps + validation = 12 s, so 5 epochs + the test evaluation (30 steps' worth) remain
    assert remaining.left == pytest.approx(5 * 12 + 30 * 0.12, rel=0.02)
    assert len(lines) == 1 and lines[0].startswith("caption demo: about 1 min 03 s to go (1 min 36 s in all)")


def test_remaining_time_says_when_the_machine_is_much_slower_than_the_budget():
    clock, lines = _Clock(), []
    remaining = demo.RemainingTime(6, started=clock.now, clock=clock, write=lines.append)
    _train(remaining, clock, epochs=3, steps=100, step_s=1.5, val_s=10.0)  # 160 s an epoch: ~17 min in all
    assert len(lines) == 2
    assert "3.4x slower than the 5 min 00 s the demo aims at on 2 cores" in lines[1]


def test_remaining_time_of_a_resumed_run_counts_from_where_it_resumed():
    clock, lines = _Clock(), []
    remaining = demo.RemainingTime(4, started=clock.now, clock=clock, write=lines.append)
    _train(remaining, clock, epochs=4, steps=50, step_s=0.2, val_s=0.0, first_epoch=2)
    assert remaining.left == pytest.approx((50 + 30) * 0.2, rel=0.03) and len(lines) == 1
