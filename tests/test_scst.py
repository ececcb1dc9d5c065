"""Self-critical training: reward, baseline, starting from a cross-entropy run, exact resume, config checks."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import Killed, tiny_config

from caption.checkpoint import read_checkpoint
from caption.config import ConfigError
from caption.data.records import ImageRecord
from caption.training.loop import fit
from caption.training.scst import CiderReward, ends_on_function_word, mean_of_others
from caption.vocab import END_ID, Vocabulary

CACHED = ("model.fine_tune=false", "model.dropout=0.0")


def _records():
    return [ImageRecord(0, None, ("a dog runs on the grass", "a brown dog runs", "the dog is running on grass")),
            ImageRecord(1, None, ("two people walk down a street", "people walking in the city")),
            ImageRecord(2, None, ("a red car", "a car parked on a street"))]


def test_mean_of_the_other_samples_is_the_baseline():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])  # two images, K = 3
    torch.testing.assert_close(mean_of_others(rewards, 3), torch.tensor([2.5, 2.0, 1.5, 3.0, 3.0, 0.0]))


def test_reward_keeps_end_and_uses_training_frequencies():
    vocab = Vocabulary("a dog runs on the grass brown is running two people walk down street car red".split())
    reward = CiderReward(_records(), vocab)
    assert reward.cider.documents == 3  # frequencies over all training images, counted once
    ids = [vocab.stoi[w] for w in "a dog runs on the grass".split()]
    full, no_end, cut = reward([ids + [END_ID], ids, ids[:4] + [END_ID]], [0, 0, 0])
    assert full > no_end and full > cut  # a caption without <end>, or stopping on "on", earns less
    assert reward([ids + [END_ID]], [1])[0] < 0.1 * full  # another image's references
    # words outside the vocabulary ("walking", "city", "parked") match nothing a caption can say
    oov = {t for refs in reward.refs for ref in refs for t in ref if t >= len(vocab)}
    assert len(oov) == 4  # walking, in, city, parked: each its own id


def test_function_word_endings():
    vocab = Vocabulary("a dog with ball".split())
    ids = {w: vocab.stoi[w] for w in vocab.itos}
    assert ends_on_function_word([ids["a"], ids["dog"], ids["with"], ids["a"], END_ID], vocab)
    assert not ends_on_function_word([ids["a"], ids["dog"], END_ID], vocab)
    assert not ends_on_function_word([END_ID], vocab)


@pytest.fixture(scope="module")
def xent_run(shapes_dir, tmp_path_factory):  # noqa: F811
    """A cross-entropy run at a high LR, for SCST runs to start from."""
    run = tmp_path_factory.mktemp("xent") / "run"
    fit(tiny_config(shapes_dir, *CACHED, "train.epochs=2", "train.lr=0.003"), run, progress_bars=False)
    return run


def _scst(shapes_dir, xent_run, *overrides):  # noqa: F811
    return tiny_config(shapes_dir, *CACHED, "train.objective=scst", f"train.init_from={xent_run}", "train.epochs=1",
                       "train.batch_size=8", "train.lr=1e-4", "train.scst_samples=3", "train.scst_max_len=8",
                       *overrides)


@pytest.mark.slow
def test_scst_starts_from_the_run_not_its_optimizer(shapes_dir, xent_run, tmp_path):  # noqa: F811
    frozen = fit(_scst(shapes_dir, xent_run, "train.lr=0.0"), tmp_path / "lr0", progress_bars=False)
    start, after = read_checkpoint(xent_run / "best.pt"), read_checkpoint(frozen.run_dir / "last.pt")
    for key, value in start["model"].items():  # LR 0: the weights are init_from's, unchanged
        assert torch.equal(after["model"][key], value), key
    assert after["vocab"] == start["vocab"]
    assert after["progress"]["step"] == 4  # 32 training images, 8 per step
    run = fit(_scst(shapes_dir, xent_run), tmp_path / "scst", progress_bars=False)
    state = read_checkpoint(run.run_dir / "last.pt")
    assert {g["lr"] for g in state["optimizer"]["param_groups"] if g["name"] == "decoder"} == {1e-4}  # not 3e-3
    assert any(not torch.equal(state["model"][k], v) for k, v in start["model"].items())
    with open(run.run_dir / "metrics.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert 0.0 < float(row["train_reward"]) and 1.0 <= float(row["train_sample_words"]) <= 7.0
    assert 0.0 <= float(row["train_function_word_end"]) <= 1.0 and "train_xent" not in row and "val_CIDEr" in row


def _kill_at_step_3(progress):
    if progress.step == 3:
        raise Killed


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
@pytest.mark.slow
def test_resume_is_exact(shapes_dir, xent_run, tmp_path, baseline):  # noqa: F811
    cfg = _scst(shapes_dir, xent_run, "train.epochs=2", "train.checkpoint_every=2", f"train.scst_baseline={baseline}",
                "train.lr=1e-3")
    fit(cfg, tmp_path / "straight", progress_bars=False)
    with pytest.raises(Killed):
        fit(cfg, tmp_path / "resumed", progress_bars=False, on_step=_kill_at_step_3)
    assert read_checkpoint(tmp_path / "resumed" / "last.pt")["progress"]["step"] == 2
    fit(cfg, tmp_path / "resumed", resume=True, progress_bars=False)
    a, b = (read_checkpoint(tmp_path / r / "last.pt") for r in ("straight", "resumed"))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    straight, resumed = ((tmp_path / r / "metrics.csv").read_text() for r in ("straight", "resumed"))
    assert resumed == straight and len(straight.splitlines()) == 3


@pytest.mark.slow
def test_bad_settings_fail_first(shapes_dir, xent_run, tmp_path):  # noqa: F811
    for override, match in (("train.objective=rl", "train.objective"), ("train.scst_baseline=zero", "baseline"),
                            ("train.scst_samples=1", "scst_samples"), ("train.init_from=", "init_from")):
        with pytest.raises(ConfigError, match=match):
            fit(_scst(shapes_dir, xent_run, override), tmp_path / "bad", progress_bars=False)
        assert not (tmp_path / "bad").exists()
    with pytest.raises(ConfigError, match="hidden_dim"):
        fit(_scst(shapes_dir, xent_run, "model.hidden_dim=32"), tmp_path / "other", progress_bars=False)
    assert not (tmp_path / "other" / "config.yaml").exists()
    with pytest.raises(ConfigError, match="objective"):  # switching objective is a new run, not a resume
        fit(_scst(shapes_dir, xent_run), xent_run, resume=True, progress_bars=False)


@pytest.mark.slow
def test_two_processes_train_scst(shapes_dir, xent_run, tmp_path):  # noqa: F811
    # sampling goes through the DDP wrapper's forward (Captioner.forward(run=...)), so its gradients
    # are averaged; here: both processes run every step and rank 0 writes the run
    from test_distributed import _torchrun_train

    cfg = _scst(shapes_dir, xent_run, "train.batch_size=16")
    proc = _torchrun_train(cfg, tmp_path, tmp_path / "ddp")
    state = read_checkpoint(tmp_path / "ddp" / "last.pt")
    assert state["progress"]["step"] == 2 and proc.stdout.count("run directory:") == 1
    assert "train_reward" in (tmp_path / "ddp" / "metrics.csv").read_text()


@pytest.mark.slow
def test_scst_under_bf16_autocast(shapes_dir, xent_run, tmp_path):  # noqa: F811
    run = fit(_scst(shapes_dir, xent_run, "precision=bf16"), tmp_path / "bf16", progress_bars=False)
    (row,) = run.history
    assert 0.0 < row["train_reward"] < 10.0 and read_checkpoint(run.run_dir / "last.pt")["progress"]["step"] == 4
