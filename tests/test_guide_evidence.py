"""The COCO detector as guidance's evidence: looked at only where a decision depends on it; people
said only where someone is seen; an object the caption names and the detector confirms is kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_guide_people import VOCAB, _features, _guide, _ids, _probe

from caption.config import GuideConfig
from caption.guidance.record import as_json, caption_record
from caption.guidance.detector import Detection, load_detector
from caption.guidance.evidence import (
    CONFIRMED,
    DETECTOR_PERSON,
    coco_phrases,
    confirmed,
)

PENALTY = GuideConfig().person_penalty
PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"


class FakeDetector:
    """Returns the given detections per image index of the batch it was built for; records calls."""

    def __init__(self, found: dict[int, tuple[Detection, ...]]):
        self.found, self.calls = found, []

    def __call__(self, pixels: torch.Tensor):
        ids = [int(p[0, 0, 0]) for p in pixels]  # each image's index is written in its first pixel
        self.calls.append(ids)
        return tuple(self.found.get(i, ()) for i in ids)


def _pixels(n: int) -> torch.Tensor:
    pixels = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    pixels[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return pixels


def _det(label: str, score: float) -> Detection:
    return Detection(label, 0, score, (0.1, 0.1, 0.9, 0.9))


def _plans(probe_logit: float, tokens: list[str], found: dict, cls: tuple[int | None, ...]):
    """Plans of photos of classes ``cls`` (None: the classifier sure of nothing) with these plain captions."""
    guide = _guide(_probe(probe_logit))
    guide.detector = detector = FakeDetector(found)
    features = _features(*(c or 0 for c in cls))
    features[[b for b, c in enumerate(cls) if c is None]] = 0.0  # uniform: no name reaches its threshold
    plans = guide.plan(features, [_ids(t) for t in tokens], _pixels(len(cls)))
    return plans, detector


def test_the_detector_looks_only_where_a_decision_depends_on_it():
    tokens = ["a man is on the grass",  # a person, the probe sure of people: settled without the detector
              "a dog runs on the grass",  # says what the classifier is sure of (a beagle): nothing to decide
              "a ball is on the grass",  # a zebra the caption does not name: looked at
              "a man with a dog"]  # a beagle named beside a person the probe is sure of: as it is
    plans, detector = _plans(3.0, tokens, {2: (_det("zebra", 0.9),)}, (None, 1, 3, 1))
    assert detector.calls == [[2]]  # one batch, the one photo that needs it
    assert plans[3].constraint is None
    assert plans[0].constraint is None and plans[1].accepts(_ids(tokens[1]))
    zebra = plans[2]  # no one seen: named as in a photo without people, people penalised
    assert zebra.info.no_people and zebra.info.constraint == "zebra" and zebra.short is not None
    assert zebra.constraint.penalty == PENALTY and set(zebra.constraint.penalized) >= set(_ids("man woman boy shirt"))
    assert not zebra.accepts(_ids(tokens[2]))


def test_people_go_only_where_no_one_but_something_else_is_seen():
    tokens = ["a man is on the grass"] * 3
    found = {0: (_det("person", DETECTOR_PERSON + 0.05), _det("dog", 0.9)),
             1: (_det("person", DETECTOR_PERSON - 0.05), _det("dog", 0.9)),
             2: (_det("person", DETECTOR_PERSON - 0.05),)}
    plans, detector = _plans(-3.0, tokens, found, (None, None, None))
    assert detector.calls == [[0, 1, 2]]  # the probe is not sure of people in any
    seen, dog, nothing = plans
    assert seen.constraint is None and not seen.info.no_people  # someone is there: the caption stays
    assert dog.constraint.phrases == ((VOCAB.stoi["dog"],), (VOCAB.stoi["dogs"],)) and dog.info.no_people
    assert dog.constraint.penalty == PENALTY and VOCAB.stoi["man"] in dog.constraint.penalized
    assert dog.info.constraint == "dog" and dog.info.shaped is False
    assert not dog.accepts(_ids(tokens[1])) and dog.accepts(_ids("a dog is on the grass"))
    assert nothing.constraint is None  # nothing is surely there instead: a missed person keeps the caption


def test_an_object_the_caption_names_and_the_detector_confirms_is_kept():
    # the classifier is sure of a zebra; the caption says a dog, and the detector sees one
    tokens = ["a dog runs on the grass", "a man with a dog", "a dog runs on the grass"]
    found = {0: (_det("dog", CONFIRMED + 0.1),), 1: (_det("dog", 0.9),), 2: (_det("dog", CONFIRMED - 0.1),)}
    plans, _ = _plans(-3.0, tokens, found, (3, 3, 3))
    assert plans[0].constraint is None  # kept as it is
    kept = plans[1].constraint  # the dog stays, the man no one sees goes
    assert kept.phrases == ((VOCAB.stoi["dog"],), (VOCAB.stoi["dogs"],)) and kept.penalty == PENALTY
    assert plans[2].info.constraint == "zebra"  # not confirmed: the classifier's name is asked for


def test_coco_phrases_and_confirmed():
    phrases = coco_phrases(VOCAB)
    assert phrases["dog"] == ((VOCAB.stoi["dog"],), (VOCAB.stoi["dogs"],)) and phrases["sports ball"][0] == (
        VOCAB.stoi["ball"],)
    assert "person" not in phrases and "zebra" not in phrases  # the vocabulary has no "zebra"
    seen = type("Seen", (), {"detections": (_det("sports ball", 0.8), _det("dog", 0.2))})()
    assert confirmed(_ids("a boy with two balls"), seen, phrases) == ((VOCAB.stoi["ball"],), (VOCAB.stoi["balls"],))
    assert confirmed(_ids("a dog with a man"), seen, phrases) == ()  # the dog is too weak


def test_without_a_detector_the_probe_decides_as_before():
    guide = _guide(_probe(3.0))  # no detector: a photo of people keeps its caption
    tokens = [_ids("a man is on the grass")]
    assert guide.plan(_features(3), tokens, _pixels(1))[0].constraint is None
    assert guide.detector_off == "none given"


@pytest.mark.slow
def test_real_photos_people_stay_with_people_and_none_are_invented_without(capsys):
    """The shipped model, guided with the real detector: the beach with people keeps them; the owl,
    the cat and the parrot get no person."""
    import caption

    if load_detector()[0] is None or not PHOTOS.is_dir():
        pytest.skip("the COCO detector or the shared photos are not here")
    model = caption.load()
    assert model.guide.detector is not None
    names = ["kite_and_cold.jpg", "owl.jpg", "cat.bmp", "parrot.jpg"]
    results = [o.result for o in model.captions([PHOTOS / n for n in names])]
    people = model.guide.people_words
    assert people.intersection(results[0].tokens), results[0].caption
    for r in results[1:]:
        assert not people.intersection(r.tokens) and r.guide.no_people is not None, r.caption
        record = as_json(caption_record("x", r, 3))
        assert record["guide"]["labels"]


def test_where_someone_is_seen_a_caption_without_people_may_still_be_given_the_name():
    tokens = ["a dog runs on the grass"]  # a zebra the classifier is sure of; someone is there too
    plans, _ = _plans(-3.0, tokens, {0: (_det("person", 0.9), _det("zebra", 0.9))}, (3,))
    (plan,) = plans
    assert plan.info.constraint == "zebra" and not plan.info.no_people and plan.short is None
    assert plan.constraint.penalized == () and not plan.accepts(_ids(tokens[0]))


def test_without_the_detector_guidance_says_so_once_and_the_probe_decides(monkeypatch, caplog):
    import logging

    import caption
    from caption.guidance import guide as guide_module

    monkeypatch.setattr(guide_module, "load_detector", lambda: (None, "no COCO detector: not installed"))
    with caplog.at_level(logging.INFO, logger="caption.inference"):
        model = caption.load()
    assert caplog.text.count("guidance without the COCO detector (no COCO detector: not installed)") == 1
    assert model.guide.detector is None and model.guide.detector_off == "no COCO detector: not installed"
    result = model.configured(beam=1).caption(Path(__file__).parents[1] / "caption" / "assets" / "sample.jpg")
    assert result.words and result.guide is not None  # guided all the same, people by the probe
