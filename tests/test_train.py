"""Training end to end on a tiny shapes world: files, resume equivalence, caching, checkpoints."""

from __future__ import annotations

import csv

import dataclasses
import json
import pickle

import pytest
import torch

from caption.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from caption.config import ConfigError, apply_overrides, load_config
from caption.training.loop import fit
from caption.training.splits import prepare
from caption.vocab import Vocabulary, tokenize
from conftest import Killed, evaluate_checkpoint, tiny_config

pytestmark = pytest.mark.slow  # training runs


def _weights(run_dir):
    return read_checkpoint(run_dir / "last.pt")["model"]


def _assert_same_run(first, second) -> str:
    """Two run directories ended with identical last.pt weights and metrics.csv; returns that csv."""
    a, b = _weights(first), _weights(second)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    metrics = (first / "metrics.csv").read_text()
    assert (second / "metrics.csv").read_text() == metrics
    return metrics


def test_fit_writes_the_run_directory(shapes_dir, tmp_path):
    result = fit(tiny_config(shapes_dir), tmp_path / "run", progress_bars=False)
    run = tmp_path / "run"
    for name in ("config.yaml", "vocab.json", "last.pt", "best.pt", "metrics.csv"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    assert load_config(run / "config.yaml") == tiny_config(shapes_dir)
    assert result.epochs == 2 and len(result.history) == 2
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "val_CIDEr" in header and "val_content_accuracy" in header
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))


def _kill_at_step_7(progress):
    if progress.step == 7:  # mid-epoch (an epoch is 10 steps); the last checkpoint was at step 6
        raise Killed


@pytest.mark.parametrize("setting", ["train.lr_schedule=plateau", "train.lr_schedule=cosine",
                                     "train.group_by_image=true"])
def test_resume_after_a_mid_epoch_kill_ends_with_the_same_weights_and_metrics(shapes_dir, tmp_path, setting):
    cfg = tiny_config(shapes_dir, "train.checkpoint_every=3", "train.epochs=2", setting, "train.warmup_steps=4")
    fit(cfg, tmp_path / "straight", progress_bars=False)
    with pytest.raises(Killed):
        fit(cfg, tmp_path / "resumed", progress_bars=False, on_step=_kill_at_step_7)
    state = read_checkpoint(tmp_path / "resumed" / "last.pt")
    assert state["progress"]["step"] == 6 and state["progress"]["epoch"] == 0 and state["progress"]["batch"] == 6
    fit(cfg, tmp_path / "resumed", resume=True, progress_bars=False)
    # the resumed epoch's train_xent covers the whole epoch, not only the part after the resume
    assert len(_assert_same_run(tmp_path / "straight", tmp_path / "resumed").splitlines()) == 3


def test_validation_every_n_steps_selects_mid_epoch_and_resumes_exactly(shapes_dir, tmp_path):
    """train.val_every_steps=4 with 10-step epochs: rows at steps 4, 8, 10 (epoch end), 12, 16, 20;
    best.pt is the best of all six; a run killed after step 7 and resumed writes the same rows."""
    cfg = tiny_config(shapes_dir, "train.val_every_steps=4", "train.epochs=2", "train.checkpoint_every=3")
    result = fit(cfg, tmp_path / "straight", progress_bars=False)
    rows = list(csv.DictReader((tmp_path / "straight" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [4, 8, 10, 12, 16, 20]
    assert [r["epoch"] for r in rows] == ["0.4", "0.8", "1", "1.2", "1.6", "2"]
    best = max(float(r["val_CIDEr"]) for r in rows)
    assert result.best_score == pytest.approx(best, abs=1e-4) and len(result.history) == 6
    best_step = read_checkpoint(tmp_path / "straight" / "best.pt")["progress"]["step"]
    assert best_step == int(next(r["step"] for r in rows if float(r["val_CIDEr"]) == best))
    with pytest.raises(Killed):
        fit(cfg, tmp_path / "resumed", progress_bars=False, on_step=_kill_at_step_7)
    fit(cfg, tmp_path / "resumed", resume=True, progress_bars=False)
    _assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def test_max_steps_stops_mid_epoch_with_last_pt_and_a_larger_budget_goes_on_exactly(shapes_dir, tmp_path):
    """train.max_steps=7 with 10-step epochs: last.pt at step 7, no validation row; resumed with
    train.max_steps=0 the run ends with the weights and metrics of one that never stopped."""
    cfg = tiny_config(shapes_dir, "train.epochs=2")
    fit(cfg, tmp_path / "straight", progress_bars=False)
    result = fit(apply_overrides(cfg, ["train.max_steps=7"]), tmp_path / "budget", progress_bars=False)
    state = read_checkpoint(tmp_path / "budget" / "last.pt")
    assert state["progress"]["step"] == 7 and state["progress"]["batch"] == 7 and state["progress"]["epoch"] == 0
    assert result.epochs == 0 and result.history == [] and not (tmp_path / "budget" / "metrics.csv").exists()
    fit(apply_overrides(cfg, ["train.max_steps=7"]), tmp_path / "budget", resume=True, progress_bars=False)
    assert read_checkpoint(tmp_path / "budget" / "last.pt")["progress"]["step"] == 7  # spent: nothing more
    fit(cfg, tmp_path / "budget", resume=True, progress_bars=False)
    _assert_same_run(tmp_path / "straight", tmp_path / "budget")


def test_max_steps_at_an_epoch_end_validates_that_epoch(shapes_dir, tmp_path):
    result = fit(tiny_config(shapes_dir, "train.epochs=3", "train.max_steps=10"), tmp_path / "run", progress_bars=False)
    assert result.epochs == 1 and len(result.history) == 1
    assert read_checkpoint(tmp_path / "run" / "last.pt")["progress"]["step"] == 10
    with pytest.raises(ConfigError, match="train.max_steps"):
        fit(tiny_config(shapes_dir, "train.max_steps=-1"), tmp_path / "bad", progress_bars=False)
    assert not (tmp_path / "bad").exists()


def test_fp16_grad_scaler_is_built_once_saved_and_restored(shapes_dir, tmp_path, monkeypatch):
    import caption.training.loop

    scalers = []

    def fp16_on_cpu(runtime):  # what fp16 on CUDA gets, on the CPU
        scalers.append(torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=4))
        return scalers[-1]

    monkeypatch.setattr(caption.training.loop, "grad_scaler", fp16_on_cpu)
    cfg = tiny_config(shapes_dir, "train.checkpoint_every=3", "train.epochs=2")
    fit(cfg, tmp_path / "straight", progress_bars=False)
    assert len(scalers) == 1  # one scaler for the whole fit: its scale carries over from epoch to epoch
    state = read_checkpoint(tmp_path / "straight" / "last.pt")
    steps = state["progress"]["step"]  # no overflow in fp32: the scale doubles every 4 steps
    assert state["scaler"]["scale"] == 2.0 ** (8 + steps // 4) and state["scaler"]["_growth_tracker"] == steps % 4
    with pytest.raises(Killed):
        fit(cfg, tmp_path / "resumed", progress_bars=False, on_step=_kill_at_step_7)
    assert read_checkpoint(tmp_path / "resumed" / "last.pt")["scaler"]["_growth_tracker"] == 6 % 4
    fit(cfg, tmp_path / "resumed", resume=True, progress_bars=False)
    assert read_checkpoint(tmp_path / "resumed" / "last.pt")["scaler"] == state["scaler"]
    assert scalers[-1].state_dict() == state["scaler"]


def test_resume_needs_a_checkpoint_and_the_same_model(shapes_dir, tmp_path):
    cfg = tiny_config(shapes_dir, "train.epochs=1")
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        fit(cfg, tmp_path / "none", resume=True, progress_bars=False)
    fit(cfg, tmp_path / "run", progress_bars=False)
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hidden_dim=32))
    with pytest.raises(ValueError, match="differs"):
        fit(other, tmp_path / "run", resume=True, progress_bars=False)


def test_frozen_encoder_trains_from_the_cache_without_running_the_cnn(shapes_dir, tmp_path, monkeypatch):
    cfg = tiny_config(shapes_dir, "model.fine_tune=false", "train.epochs=1")
    summary = prepare(cfg, tmp_path / "run")
    assert summary["train_cache"]["images"] == 32 and summary["val_cache"]["images"] == 4
    vocab = Vocabulary.load(tmp_path / "run" / "vocab.json")
    train = json.loads((shapes_dir / "captions_train.json").read_text())["annotations"]
    assert set(vocab.itos[4:]) == {w for a in train for w in tokenize(a["caption"])}  # training split only

    from caption.model.encoder import Encoder

    def no_cnn(self, images):
        raise AssertionError("the CNN ran although features are cached")

    monkeypatch.setattr(Encoder, "forward", no_cnn)
    result = fit(cfg, tmp_path / "run", progress_bars=False)
    assert result.epochs == 1


def test_int8_cache_halves_the_files_and_trains(shapes_dir, tmp_path):
    cfg = tiny_config(shapes_dir, "model.fine_tune=false", "train.epochs=1")
    f16 = prepare(cfg, tmp_path / "f16")
    int8 = prepare(apply_overrides(cfg, ["data.cache=int8"]), tmp_path / "int8")
    for split in ("train", "val"):
        assert int8[f"{split}_cache"]["path"].endswith("-int8") and int8[f"{split}_cache"]["images"] == f16[f"{split}_cache"]["images"]
    size = lambda run, pattern: sum(p.stat().st_size for p in (tmp_path / run / "cache").glob(pattern))  # noqa: E731
    assert size("int8", "*.i8") * 2 == size("f16", "*.f16") and not list((tmp_path / "int8" / "cache").glob("*.f16"))
    result = fit(apply_overrides(cfg, ["data.cache=int8"]), tmp_path / "int8", progress_bars=False)
    assert result.epochs == 1 and "val_content_accuracy" in result.history[0]


def test_no_cache_runs_the_frozen_encoder_on_every_batch_and_leaves_it_unchanged(shapes_dir, tmp_path, monkeypatch):
    cfg = tiny_config(shapes_dir, "model.fine_tune=false", "train.epochs=1", "data.cache=none")
    summary = prepare(cfg, tmp_path / "run")
    assert summary["cache"].startswith("none (data.cache=none") and not (tmp_path / "run" / "cache").exists()
    from caption.model.encoder import Encoder

    images = []
    forward = Encoder.forward

    def counting(self, x):
        images.append(len(x))
        return forward(self, x)

    monkeypatch.setattr(Encoder, "forward", counting)
    result = fit(cfg, tmp_path / "run", progress_bars=False)
    state = read_checkpoint(tmp_path / "run" / "last.pt")
    assert result.epochs == 1 and not (tmp_path / "run" / "cache").exists()
    assert len(images) >= state["progress"]["step"] == 10 and sum(images) >= 32  # one call per training batch at least
    fresh = state["model"]
    torch.manual_seed(cfg.train.seed)
    from caption.model import build_model

    initial = build_model(cfg.model, 10).encoder.state_dict()
    for key, value in initial.items():  # the seeded frozen encoder: the same weights after training
        assert torch.equal(fresh[f"encoder.{key}"], value), key
    with pytest.raises(ConfigError, match="data.cache must be one of f16, int8, none"):
        fit(apply_overrides(cfg, ["data.cache=int4"]), tmp_path / "bad", progress_bars=False)
    assert not (tmp_path / "bad").exists()


def test_checkpoints_load_safely_and_mismatches_are_clear(shapes_dir, tmp_path):
    fit(tiny_config(shapes_dir, "train.epochs=1"), tmp_path / "run", progress_bars=False)
    loaded = load_checkpoint(tmp_path / "run")  # a run directory means its best checkpoint
    assert loaded.path.name == "best.pt" and len(loaded.vocab) > 4
    # a checkpoint that would unpickle an arbitrary object is refused
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "vocab": {}, "payload": pickle.loads(pickle.dumps(Killed()))}, evil)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(evil)
    # weights saved for another vocabulary size
    bigger = Vocabulary(loaded.vocab.itos[4:] + ["zebra"])
    save_checkpoint(tmp_path / "mismatch.pt", loaded.model, loaded.config, bigger)
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(tmp_path / "mismatch.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt.pt"):
        load_checkpoint(tmp_path / "corrupt.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_evaluate_any_coco_file_and_the_cli_json(shapes_dir, tmp_path, capsys):
    from caption.commands.main import main

    fit(tiny_config(shapes_dir, "train.epochs=1"), tmp_path / "run", progress_bars=False)
    scores = evaluate_checkpoint(tmp_path / "run", captions=str(shapes_dir / "captions_test.json"),
                                 images=str(shapes_dir / "images"), beam=2, java=False, progress=False)
    assert scores["images"] == 4 and {"content_accuracy", "pointing_accuracy", "CIDEr", "BLEU-4"} <= set(scores)
    results = json.loads((tmp_path / "run" / "eval" / "captions_captions_test.json").read_text())
    assert len(results) == 4 and set(results[0]) == {"image_id", "caption"}
    code = main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--split", "test", "--json", "--no-java"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and json.loads(out[-1])["images"] == 4
    code = main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--split", "test", "--json", "--no-java",
                 "--beam", "2", "--length-penalty", "1.0", "--out", str(tmp_path / "lp")])
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    written = json.loads((tmp_path / "lp" / "captions_test.json").read_text())
    assert code == 0 and scores["length_penalty"] == 1.0 and scores["beam"] == 2
    assert scores["mean_words"] == pytest.approx(sum(len(r["caption"].split()) for r in written) / len(written), abs=0.01)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nope")]) == 2


def test_select_metric_picks_the_best_checkpoint_and_is_checked_first(shapes_dir, tmp_path):
    with pytest.raises(ConfigError, match="train.select_metric: 'BLEU-9'.*content_accuracy"):
        fit(tiny_config(shapes_dir, "train.select_metric=BLEU-9"), tmp_path / "bad", progress_bars=False)
    assert not (tmp_path / "bad" / "last.pt").exists()  # refused before any training
    cfg = tiny_config(shapes_dir, "train.select_metric=content_accuracy", "train.epochs=1")
    result = fit(cfg, tmp_path / "run", progress_bars=False)
    assert result.best_score == result.history[0]["val_content_accuracy"]


def test_cosine_schedule_warms_up_then_decays_to_its_floor(shapes_dir, tmp_path):
    from caption.training.schedule import _cosine

    assert [_cosine(s, 20, 4, 0.1) for s in (0, 3)] == [0.25, 1.0]
    assert _cosine(12, 20, 4, 0.1) == pytest.approx(0.55) and _cosine(20, 20, 4, 0.1) == pytest.approx(0.1)
    cfg = tiny_config(shapes_dir, "train.lr_schedule=cosine", "train.warmup_steps=3", "train.min_lr_ratio=0.1")
    result = fit(cfg, tmp_path / "run", progress_bars=False)
    steps = result.history[-1]["step"]  # 2 epochs of 10 steps: the LR after the last one is the floor
    assert steps == 20 and result.history[-1]["lr"] == pytest.approx(0.1 * cfg.train.lr)
    assert result.history[0]["lr"] == pytest.approx(cfg.train.lr * _cosine(10, 20, 3, 0.1))
