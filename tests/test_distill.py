"""Knowledge distillation (train.objective=distill): the word-level KL to the teachers' renormalised
mean log-probabilities, teacher captions as extra targets, and the settings it refuses."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from caption.checkpoint import load_checkpoint, load_checkpoints, read_checkpoint
from caption.config import ConfigError
from caption.data.datasets import collate_captions
from caption.data.records import ImageRecord
from caption.errors import DataError, MissingFileError
from caption.training.distill import Distillation, with_teacher_captions
from caption.training.distributed import Dist
from caption.training.loop import fit
from caption.training.objectives import check_objective
from caption.training.splits import load_training_data

CACHED = ("model.fine_tune=false", "model.dropout=0.0")


@pytest.fixture(scope="module")
def teachers(shapes_dir, tmp_path_factory):
    """Two cross-entropy runs over one cached encoder (one seed, so one encoder; two learning rates)."""
    root = tmp_path_factory.mktemp("teachers")
    runs = []
    for lr in ("0.003", "0.001"):
        cfg = tiny_config(shapes_dir, *CACHED, "train.epochs=1", f"train.lr={lr}", f"data.cache_dir={root / 'cache'}")
        runs.append(fit(cfg, root / f"lr{lr}", progress_bars=False).run_dir)
    return runs


def _distill(shapes_dir, teachers, *overrides):
    return tiny_config(shapes_dir, *CACHED, "train.objective=distill", f"train.init_from={teachers[0]}",
                       f"train.teachers={teachers[0]},{teachers[1]}", "train.epochs=1", "train.batch_size=8",
                       f"data.cache_dir={teachers[0].parent / 'cache'}", *overrides)


def _objective(cfg, run_dir):
    init = load_checkpoint(cfg.train.init_from)
    data = load_training_data(cfg, run_dir, init.model.encoder, init.vocab, runtime=_cpu(), progress=False)
    return Distillation(cfg, init.vocab, data.train), init


def _cpu():
    from caption.runtime import resolve_runtime

    return resolve_runtime("cpu", "fp32")


def _batch(objective, n=6):
    return collate_captions([objective.dataset[i] for i in range(n)])


def test_teachers_give_the_ensembles_renormalised_mean_log_probs(shapes_dir, teachers, tmp_path):
    objective, init = _objective(_distill(shapes_dir, teachers), tmp_path)
    batch = _batch(objective)
    got = objective._teacher_log_probs(batch.inputs, batch.captions, batch.rows, torch.device("cpu"))  # (N, V)
    feats = batch.inputs.index_select(0, batch.rows)  # (B, L, D)
    members = [load_checkpoint(t).model.decoder.eval() for t in teachers]
    with torch.no_grad():
        logps = [F.log_softmax(m(feats, batch.captions).word_logits, -1) for m in members]
    want = F.log_softmax((logps[0] + logps[1]) / 2, -1)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(len(got)))  # a distribution per word
    assert not any(p.requires_grad for p in objective.teacher.parameters())


def test_a_student_equal_to_its_only_teacher_has_zero_kl(shapes_dir, teachers, tmp_path):
    cfg = _distill(shapes_dir, teachers, f"train.teachers={teachers[0]}", "train.distill_weight=1.0")
    objective, init = _objective(cfg, tmp_path)
    student = init.model.eval()
    result = objective.step(student, _batch(objective), Dist(0, 1, torch.device("cpu")))
    kl_sum, tokens = result.metrics["kl"]
    assert tokens > 0 and abs(kl_sum) < 1e-3
    # weight 1: the loss is the KL (about 0) plus the attention penalty, not the cross-entropy
    assert result.loss.item() < result.metrics["xent"][0] / tokens


def test_the_kl_pulls_the_student_to_the_teachers(shapes_dir, teachers, tmp_path):
    cfg = _distill(shapes_dir, teachers, f"train.teachers={teachers[1]}", "train.distill_weight=1.0")
    objective, init = _objective(cfg, tmp_path)
    student, batch = init.model.train(), _batch(objective, 8)
    torch.manual_seed(5)
    for p in student.decoder.parameters():  # a student far from the teacher
        p.data.normal_(0.0, 0.3)
    optim = torch.optim.Adam(student.decoder.parameters(), lr=3e-3)
    kls = []
    for _ in range(15):
        result = objective.step(student, batch, Dist(0, 1, torch.device("cpu")))
        optim.zero_grad()
        result.loss.backward()
        optim.step()
        kls.append(result.metrics["kl"][0] / result.metrics["kl"][1])
    assert kls[0] > 0.01 and kls[-1] < 0.5 * kls[0]


def test_teacher_captions_join_the_human_ones(tmp_path):
    records = [ImageRecord(1, None, ("a dog",)), ImageRecord(2, None, ("a cat", "the cat"))]
    path = tmp_path / "teacher.json"
    path.write_text(json.dumps([{"image_id": 2, "caption": " a cat sits "}, {"image_id": 9, "caption": "x"}]))
    got = with_teacher_captions(records, path)
    assert [r.captions for r in got] == [("a dog",), ("a cat", "the cat", "a cat sits")]
    path.write_text(json.dumps([{"image_id": 9, "caption": "x"}]))
    with pytest.raises(DataError, match="none of its 1 images"):
        with_teacher_captions(records, path)
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(DataError, match="not a COCO results file"):
        with_teacher_captions(records, path)
    with pytest.raises(MissingFileError, match="not found"):
        with_teacher_captions(records, tmp_path / "missing.json")


def test_bad_settings_fail_first(shapes_dir, teachers, tmp_path):
    for override, match in (("train.distill_weight=1.5", r"in \[0, 1\]"), ("train.teachers=", "needs train.teachers"),
                            ("model.blend=hard", "soft-attention")):
        with pytest.raises(ConfigError, match=match):
            check_objective(_distill(shapes_dir, teachers, override))
    with pytest.raises(ConfigError, match="needs train.teachers or train.teacher_captions"):
        check_objective(_distill(shapes_dir, teachers, "train.teachers=", "train.distill_weight=0"))


def test_teachers_must_share_the_students_vocabulary(shapes_dir, teachers, tmp_path):
    # a run that keeps only frequent words counts another vocabulary
    other = fit(tiny_config(shapes_dir, *CACHED, "train.epochs=1", "data.min_freq=40",
                            f"data.cache_dir={teachers[0].parent / 'cache'}"), tmp_path / "other", progress_bars=False)
    assert len(load_checkpoint(other.run_dir).vocab) != len(load_checkpoint(teachers[0]).vocab)
    with pytest.raises(ConfigError, match="vocabulary"):
        _objective(_distill(shapes_dir, teachers, f"train.teachers={other.run_dir}"), tmp_path / "s")


@pytest.mark.slow
def test_a_distilled_run_with_teacher_captions(shapes_dir, teachers, tmp_path):
    results = tmp_path / "teacher_captions.json"
    teacher = load_checkpoints(teachers)
    records = json.loads((shapes_dir / "captions_train.json").read_text())["images"]
    results.write_text(json.dumps([{"image_id": r["id"], "caption": "a red circle"} for r in records]))
    run = fit(_distill(shapes_dir, teachers, f"train.teacher_captions={results}"), tmp_path / "run",
              progress_bars=False)
    (row,) = run.history
    assert row["train_kl"] > 0 and row["train_xent"] > 0
    state = read_checkpoint(run.run_dir / "last.pt")
    assert state["config"]["train"]["teachers"] == f"{teachers[0]},{teachers[1]}"
    humans = sum(len(a) for a in [json.loads((shapes_dir / "captions_train.json").read_text())["annotations"]])
    assert state["progress"]["step"] == -(-(humans + len(records)) // 8)  # one extra caption per photo
    assert teacher.vocab.itos == load_checkpoint(run.run_dir / "last.pt").vocab.itos
