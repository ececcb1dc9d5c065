"""COCO metrics: known values on tiny corpora, Java/no-Java paths, METEOR clean-up, results I/O."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
from pycocoevalcap.meteor.meteor import Meteor

from caption.evaluation import metrics
from caption.evaluation.metrics import METRIC_KEYS, coco_scores, write_results

HAS_JAVA = shutil.which("java") is not None
NO_METEOR_KEYS = [k for k in METRIC_KEYS if k != "METEOR"]

# >= 3 distinct images: CIDEr's document frequencies come from the evaluated references.
CAPTIONS = {
    1: "a brown dog runs across the green grass",
    2: "a man rides a red bike down the street",
    3: "two cats sleep together on a blue sofa",
    4: "a plate of pasta with tomato sauce",
}
REFS = {i: [c, c] for i, c in CAPTIONS.items()}
PARTIAL = {1: "a dog runs on the sand", 2: "a man rides a horse", 3: "two dogs sleep on a bed",
           4: "a bowl of soup"}
DISJOINT = {1: "zebra", 2: "violin concert hall", 3: "snowy mountain peak", 4: "yellow taxi cab"}


def _no_java_scores(candidates: dict, references: dict) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return coco_scores(candidates, references, java=False)


def _meteor_children() -> list[int]:
    """Pids of live METEOR JVMs started by this process (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and b"meteor" in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def java_run() -> tuple[dict, dict, dict]:
    """One Java run (PTB tokenizer + METEOR JVM start take seconds) shared by the Java tests.

    Candidates are the captions with capitals and a full stop (the tokenizer must remove
    both), plus a fifth image whose candidate is empty.
    """
    if not HAS_JAVA:
        pytest.skip("no `java` executable on the PATH: PTB tokenizer and METEOR need Java")
    candidates = {i: c.capitalize() + "." for i, c in CAPTIONS.items()}
    candidates[5] = ""
    references = {**REFS, 5: ["a small white kitchen", "an empty kitchen with white cabinets"]}
    return coco_scores(candidates, references, java=True), candidates, references


def test_identical_captions_score_perfectly() -> None:
    scores = _no_java_scores(CAPTIONS, REFS)
    assert list(scores) == NO_METEOR_KEYS
    for n in range(1, 5):
        assert scores[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx(1.0)
    # pycocoevalcap's Cider is CIDEr-D: mean n-gram cosine (1 here) times 10.
    assert scores["CIDEr"] == pytest.approx(10.0, abs=1e-6)
    json.dumps(scores)  # plain floats, ready for --json output


def test_disjoint_words_score_zero() -> None:
    scores = _no_java_scores(DISJOINT, REFS)
    for n in range(1, 5):
        assert scores[f"BLEU-{n}"] == pytest.approx(0.0, abs=1e-9)
    assert scores["ROUGE-L"] == 0.0
    assert scores["CIDEr"] == 0.0


def test_cider_ranks_exact_above_partial_above_disjoint() -> None:
    exact, partial, disjoint = (_no_java_scores(c, REFS)["CIDEr"]
                                for c in (CAPTIONS, PARTIAL, DISJOINT))
    assert exact > partial > disjoint == 0.0
    assert 0.0 < partial < 5.0


def test_each_image_scored_once_against_all_its_references() -> None:
    # Each candidate equals one of two different references. Scored once against both, its
    # n-grams are all matched (BLEU 1); split into one (candidate, reference) pair per
    # reference, half the pairs would not match and BLEU would drop far below 1.
    other = {1: "a puppy on a lawn", 2: "someone cycling in town", 3: "kittens napping",
             4: "spaghetti dinner"}
    references = {i: [other[i], c] for i, c in CAPTIONS.items()}
    scores = _no_java_scores(CAPTIONS, references)
    assert scores["BLEU-1"] == pytest.approx(1.0, abs=1e-6)
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx(1.0)
    # CIDEr averages the similarity over references: one perfect match of two is ~5.
    assert 4.5 < scores["CIDEr"] < 5.5


def test_empty_candidate_scores_without_crashing() -> None:
    candidates = {**CAPTIONS, 2: ""}
    scores = _no_java_scores(candidates, REFS)
    assert 0.0 < scores["BLEU-4"] < 1.0
    assert scores["CIDEr"] == pytest.approx(10.0 * 3 / 4, abs=1e-6)


def test_no_java_skips_meteor_with_exactly_one_warning() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = coco_scores(CAPTIONS, REFS, java=False)
    assert "METEOR" not in scores
    assert [w.category for w in caught] == [UserWarning]
    message = str(caught[0].message)
    assert "Java was not found" in message and "METEOR" in message and "PTB" in message


def test_missing_java_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match="Java was not found"):
        assert "METEOR" not in coco_scores(CAPTIONS, REFS)
    with pytest.raises(RuntimeError, match="java=True"):
        coco_scores(CAPTIONS, REFS, java=True)


@pytest.mark.parametrize(
    "candidates, references, missing",
    [({**CAPTIONS, 7: "a cat"}, REFS, "7"), (CAPTIONS, {**REFS, 9: ["a cat"]}, "9")],
)
def test_mismatched_ids_are_named(candidates: dict, references: dict, missing: str) -> None:
    with pytest.raises(ValueError, match=f"image id {missing}"):
        coco_scores(candidates, references, java=False)


def test_bad_references_are_rejected() -> None:
    with pytest.raises(ValueError, match="image id 1"):
        coco_scores(CAPTIONS, {**REFS, 1: []}, java=False)
    with pytest.raises(ValueError, match="image id 1"):
        coco_scores(CAPTIONS, {**REFS, 1: "a plain string, not a list"}, java=False)
    with pytest.raises(ValueError, match="empty"):
        coco_scores({}, {}, java=False)


@pytest.mark.slow
def test_java_run_reports_meteor(java_run: tuple[dict, dict, dict]) -> None:
    scores, _, _ = java_run
    assert list(scores) == list(METRIC_KEYS)
    assert 0.5 < scores["METEOR"] < 1.0  # 4 perfect images, 1 empty candidate
    assert not _meteor_children(), "the METEOR JVM must be shut down after scoring"


@pytest.mark.slow
def test_ptb_and_python_tokenizers_agree_on_simple_captions(
    java_run: tuple[dict, dict, dict],
) -> None:
    scores, candidates, references = java_run
    fallback = _no_java_scores(candidates, references)
    for key in NO_METEOR_KEYS:
        assert scores[key] == pytest.approx(fallback[key], abs=1e-9), key


class _DeadMeteor(Meteor):
    """pycocoevalcap's Meteor, but its 'JVM' writes to stderr and exits at once."""

    def __init__(self) -> None:
        code = "import sys; sys.stderr.write('boom: out of memory'); sys.exit(1)"
        self.meteor_p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lock = threading.Lock()


def test_meteor_failure_raises_clearly_and_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[_DeadMeteor] = []

    def make_meteor() -> _DeadMeteor:
        made.append(_DeadMeteor())
        return made[-1]

    monkeypatch.setattr(metrics, "Meteor", make_meteor)
    res = {i: [c] for i, c in CAPTIONS.items()}
    with pytest.raises(RuntimeError, match="METEOR's Java process failed.*boom"):
        metrics._meteor(REFS, res)
    (meteor,) = made
    assert meteor.meteor_p.returncode is not None  # reaped, not leaked
    assert not meteor.lock.locked()  # else Meteor.__del__ would deadlock at exit


def test_write_results_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text("stale")
    out = write_results({42: "a dog runs", 7: "", 3: "café au lait"}, path)
    assert out == path
    assert json.loads(path.read_text(encoding="utf-8")) == [
        {"image_id": 42, "caption": "a dog runs"},
        {"image_id": 7, "caption": ""},
        {"image_id": 3, "caption": "café au lait"},
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temp left


def test_repetition_scores_count_repeated_bigrams_and_distinct_captions():
    from pathlib import Path

    from caption.data.records import ImageRecord
    from caption.evaluation.scoring import repeats_a_bigram, repetition_scores

    assert repeats_a_bigram("a man in a black jacket and a black jacket")
    assert repeats_a_bigram("A little boy and a little girl.")  # tokenised: case and punctuation ignored
    assert not repeats_a_bigram("a dog runs on a beach")  # "a" twice, but no pair twice
    captions = {1: "a dog on a dog on", 2: "a cat", 3: "a cat"}
    records = [ImageRecord(i, Path(f"{i}.jpg"), ("a dog", "a boy and a girl")) for i in (1, 2, 3)]
    scores = repetition_scores(captions, records)
    assert scores == {"repeated_bigram_rate": round(1 / 3, 4), "references_repeated_bigram_rate": 0.0,
                      "distinct_captions": 2}
