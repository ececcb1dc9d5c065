"""Where attention should point: the word -> COCO table, boxes as grid cells, the box-supervision loss,
the pointing figures, and the real detector on the shipped sample photo at full size."""

from __future__ import annotations

import json
import math

import pytest
import torch

from caption.commands.main import main
from caption.data.images import load_image
from caption.data.records import ImageRecord
from caption.decoding.results import map_entropy
from caption.evaluation.pointing import Pointed, grounded_words, summarise
from caption.guidance.detector import Detection, load_detector
from caption.guidance.grounding import LABEL_IDS, WORDS_FILE, cell_masks, coco_words, detect_full_size, token_labels
from caption.model.decoder import DecoderOutput
from caption.training.grounding import BoxTargets, detect_split
from caption.training.losses import Loss
from caption.vocab import Vocabulary

SAMPLE = WORDS_FILE.parent / "sample.jpg"  # two dogs on grass


def box(label: str, score: float, x0: float, y0: float, x1: float, y1: float) -> Detection:
    return Detection(label, LABEL_IDS[label], score, (x0, y0, x1, y1))


def test_the_word_table_names_coco_categories_once() -> None:
    table = coco_words()
    assert table["man"] == table["people"] == table["children"] == "person"
    assert table["puppy"] == table["dogs"] == "dog" and table["bike"] == "bicycle"
    assert table["sofa"] == "couch" and table["ball"] == "sports ball"
    assert set(table.values()) <= set(LABEL_IDS)
    assert all(" " not in w and w == w.lower() for w in table)  # single caption words, as tokenised


def test_a_word_listed_under_two_categories_is_refused(tmp_path) -> None:
    path = tmp_path / "words.tsv"
    path.write_text("# two\nperson\tman boxer\ndog\tboxer\n")
    with pytest.raises(ValueError, match="boxer"):
        coco_words(path)
    path.write_text("robot\tandroid\n")
    with pytest.raises(ValueError, match="robot"):
        coco_words(path)


def test_boxes_become_the_cells_whose_centres_they_hold() -> None:
    masks = cell_masks([box("dog", 0.9, 0.0, 0.0, 0.5, 1.0), box("dog", 0.8, 0.9, 0.9, 1.0, 1.0),
                        box("person", 0.4, 0.0, 0.0, 1.0, 1.0)], (4, 4))
    dog = masks[LABEL_IDS["dog"]].view(4, 4)
    assert dog[:, :2].all() and not dog[:3, 2:].any()  # the left half, cells (i, 0..1)
    assert dog[3, 3] and dog.sum() == 9  # the tiny box still marks the cell holding its centre
    assert LABEL_IDS["person"] not in masks  # below the score
    assert LABEL_IDS["person"] in cell_masks([box("person", 0.4, 0, 0, 1, 1)], (4, 4), min_score=0.3)


def test_token_labels_follow_the_table() -> None:
    vocab = Vocabulary(["a", "man", "dogs", "grass"])
    labels = token_labels(vocab)
    assert labels[vocab.stoi["man"]] == LABEL_IDS["person"] and labels[vocab.stoi["dogs"]] == LABEL_IDS["dog"]
    assert labels[vocab.stoi["grass"]] == 0 and labels[0] == 0


def _output(alphas: torch.Tensor, targets: torch.Tensor) -> DecoderOutput:
    mask = targets != 0
    return DecoderOutput(torch.zeros(int(mask.sum()), 8), alphas, targets, mask)


def test_box_loss_is_minus_log_mass_inside_and_ignores_words_without_boxes() -> None:
    vocab = Vocabulary(["a", "man", "dog"])
    man, dog, a = vocab.stoi["man"], vocab.stoi["dog"], vocab.stoi["a"]
    inside = torch.zeros(4, dtype=torch.bool)
    inside[:2] = True
    targets = torch.tensor([[a, man, dog, 0]])  # (B, T): the photo has a person box, no dog box
    alphas = torch.full((1, 4, 4), 0.25, requires_grad=True)  # (B, T, L) flat
    boxes = BoxTargets([{LABEL_IDS["person"]: inside}], token_labels(vocab))
    total, count = boxes.loss(_output(alphas, targets), torch.tensor([0]))
    assert count == 1 and total.item() == pytest.approx(-math.log(0.5), rel=1e-4)
    total.backward()
    assert alphas.grad[0, 1, :2].lt(0).all() and alphas.grad[0, 1, 2:].eq(0).all()  # more weight inside lowers it
    assert alphas.grad[0, [0, 2]].eq(0).all()
    sharp = torch.tensor([[[0.25] * 4, [0.5, 0.5, 0, 0], [0.25] * 4, [0.25] * 4]])
    assert boxes.loss(_output(sharp, targets), torch.tensor([0]))[0].item() == pytest.approx(0.0, abs=1e-5)
    empty = BoxTargets([{}], token_labels(vocab))
    assert empty.loss(_output(sharp, targets), torch.tensor([0]))[1] == 0


def test_pointing_figures_against_both_baselines() -> None:
    inside = torch.tensor([True, False, False, False])
    sharp = Pointed("dog", torch.tensor([0.7, 0.1, 0.1, 0.1]), inside)
    flat = Pointed("dog", torch.full((4,), 0.25), inside)
    mean_map = torch.tensor([0.1, 0.6, 0.2, 0.1])  # a centre bias elsewhere
    figures = summarise([sharp, flat], mean_map)
    assert figures["words"] == 2 and figures["mass"] == pytest.approx((0.7 + 0.25) / 2, abs=1e-4)
    assert figures["mass_uniform"] == pytest.approx(0.25) and figures["mass_fixed"] == pytest.approx(0.1)
    assert figures["peak"] == pytest.approx(1.0)  # a flat map's argmax is its first cell, inside here
    assert figures["peak_fixed"] == 0.0 and figures["entropy_uniform"] == pytest.approx(math.log(4), abs=1e-4)
    assert map_entropy(torch.full((49,), 1 / 49)).item() == pytest.approx(math.log(49), abs=1e-5)


def test_grounded_words_are_those_naming_a_detected_category() -> None:
    masks = {LABEL_IDS["dog"]: torch.tensor([True, False, False, False])}
    alphas = torch.full((4, 2, 2), 0.25)  # (T, gh, gw)
    found = grounded_words(["a", "dog", "and", "man"], alphas, masks, coco_words())
    assert [p.label for p in found] == ["dog"] and found[0].alphas.shape == (4,)


def test_the_real_detector_finds_the_dogs_at_full_size() -> None:
    """The lite extra's detector runs on the shipped sample photo (no ../shared needed)."""
    detector, reason = load_detector(threads=1)
    assert detector is not None, reason
    found = detect_full_size(detector, [load_image(SAMPLE)])[0]
    dogs = [d for d in found if d.label == "dog" and d.score >= 0.5]
    assert len(dogs) == 2
    cells = cell_masks(found, (7, 7))[LABEL_IDS["dog"]]
    assert 5 <= int(cells.sum()) < 49


def test_training_detections_are_computed_once_and_cached(tmp_path, monkeypatch) -> None:
    import caption.training.grounding as training_grounding

    records = [ImageRecord(7, SAMPLE, ["two dogs"]), ImageRecord(8, tmp_path / "missing.jpg", ["?"])]
    first = detect_split(records, tmp_path, "train", progress=False)
    assert {d.label for d in first[0] if d.score >= 0.5} == {"dog"} and first[1] == []
    assert (tmp_path / "detections-train-2.pt").is_file()

    def no_detector(**_):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(training_grounding, "load_detector", no_detector)
    again = detect_split(records, tmp_path, "train", progress=False)
    assert [[(d.label, round(d.score, 4)) for d in found] for found in again] == \
        [[(d.label, round(d.score, 4)) for d in found] for found in first]
    targets = BoxTargets.build(records, Vocabulary(["dogs"]), 7, tmp_path, progress=False)
    assert set(targets.masks[0]) >= {LABEL_IDS["dog"]} and targets.masks[1] == {}


def test_the_box_term_joins_the_loss_it_is_added_to() -> None:
    loss = Loss(torch.tensor(3.0), torch.tensor(2.5), torch.tensor(0.5))
    assert loss.ground == 0.0
    grounded = loss.grounded(torch.tensor(0.25))
    assert grounded.total.item() == 3.25 and grounded.ground.item() == 0.25 and grounded.xent.item() == 2.5


def test_evaluate_pointing_reports_the_sample_photos_dog(tmp_path, capsys) -> None:
    code = main(["evaluate", "--pointing", "--images", str(SAMPLE), "--json", "--out", str(tmp_path), "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(out.strip().splitlines()[-1])
    assert report["images"] == 1 and report["words"] >= 1 and "dog" in report["categories"]
    assert 0 < report["mass"] <= 1 and 0 < report["mass_uniform"] < 1 and report["entropy"] <= report["entropy_uniform"]
    assert json.loads((tmp_path / "pointing.json").read_text()) == report
    assert main(["evaluate", "--pointing"]) == 2
    assert "--pointing needs --images" in capsys.readouterr().err
