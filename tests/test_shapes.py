"""The shapes world: deterministic generation, COCO-loadable files, true captions, scoring."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from caption.data.shapes import COLORS, SHAPES, WORDS, generate_shapes, load_shapes
from caption.evaluation.shapes import (
    ParsedCaption,
    content_correct,
    parse_caption,
    pointing_hits,
    shapes_accuracy,
)

SPLITS = ("train", "val", "test")
RED_CIRCLE = {"color": "red", "shape": "circle", "bbox": [10, 10, 20, 20]}
BLUE_SQUARE = {"color": "blue", "shape": "square", "bbox": [60, 12, 20, 20]}  # right of the circle
GREEN_TRIANGLE = {"color": "green", "shape": "triangle", "bbox": [12, 60, 20, 20]}  # below it


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return generate_shapes(out, n=200, seed=3)


def _load(path):
    return json.loads(path.read_text())


def _all_objects(paths):
    merged = {}
    for split in SPLITS:
        merged.update(load_shapes(paths[split])[0])
    return merged


def test_layout_and_split_sizes(world):
    assert set(world) == {*SPLITS, "images"}
    ids = {split: [im["id"] for im in _load(world[split])["images"]] for split in SPLITS}
    assert [len(ids[s]) for s in SPLITS] == [160, 20, 20]
    assert sorted(sum(ids.values(), [])) == list(range(1, 201))
    assert len(list(world["images"].glob("*.png"))) == 200


def test_files_load_with_pycocotools(world):
    for split in SPLITS:
        coco = COCO(str(world[split]))
        for image_id in coco.getImgIds():
            image = coco.loadImgs(image_id)[0]
            assert (world["images"] / image["file_name"]).is_file()
            assert (image["width"], image["height"]) == (96, 96)
            assert len(coco.getAnnIds(imgIds=image_id)) == 5


def test_objects_are_distinct_in_bounds_and_non_overlapping(world):
    counts = set()
    for objects in _all_objects(world).values():
        counts.add(len(objects))
        assert len({(o["color"], o["shape"]) for o in objects}) == len(objects)
        for i, a in enumerate(objects):
            x, y, w, h = a["bbox"]
            assert a["color"] in COLORS and a["shape"] in SHAPES
            assert 16 <= w <= 32 and w == h and x >= 0 and y >= 0 and x + w <= 96 and y + h <= 96
            for b in objects[i + 1:]:
                bx, by, bw, bh = b["bbox"]
                assert x + w <= bx or bx + bw <= x or y + h <= by or by + bh <= y
    assert counts == {1, 2, 3}


def test_images_show_the_annotated_objects(world):
    for split in SPLITS:
        data = _load(world[split])
        names = {im["id"]: im["file_name"] for im in data["images"]}
        for entry in data["shapes"][:10]:
            pixels = np.asarray(Image.open(world["images"] / names[entry["image_id"]]).convert("RGB"))
            for obj in entry["objects"]:
                x, y, w, h = obj["bbox"]
                assert tuple(pixels[y + h // 2 + 2, x + w // 2]) == COLORS[obj["color"]]
            assert tuple(pixels[0, 0]) == (255, 255, 255)  # objects keep a margin from the edge


def test_every_generated_caption_is_true_and_in_vocabulary(world):
    objects = _all_objects(world)
    seen_relations = set()
    for split in SPLITS:
        for ann in _load(world[split])["annotations"]:
            assert content_correct(ann["caption"], objects[ann["image_id"]]), ann
            words = ann["caption"].replace(",", " ").split()
            assert set(words) <= set(WORDS)
            seen_relations.add(parse_caption(ann["caption"]).relation)
    assert seen_relations == {None, "above", "below", "left of", "right of"}


def test_same_seed_same_bytes_and_different_seed_differs(tmp_path, world):
    again = generate_shapes(tmp_path / "a", n=200, seed=3)
    for split in SPLITS:
        assert again[split].read_bytes() == world[split].read_bytes()
    for name in ("shapes_000001.png", "shapes_000150.png"):
        assert (again["images"] / name).read_bytes() == (world["images"] / name).read_bytes()
    other = generate_shapes(tmp_path / "b", n=200, seed=4)
    assert other["train"].read_bytes() != world["train"].read_bytes()


def test_rerun_on_complete_folder_writes_nothing(tmp_path):
    paths = generate_shapes(tmp_path, n=20, seed=1)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    assert generate_shapes(tmp_path, n=20, seed=1) == paths
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert not list(tmp_path.rglob("*.tmp"))


def test_changed_arguments_or_incomplete_folder_regenerate(tmp_path):
    first = generate_shapes(tmp_path, n=20, seed=1)["train"].read_bytes()
    assert generate_shapes(tmp_path, n=20, seed=2)["train"].read_bytes() != first
    assert generate_shapes(tmp_path, n=10, seed=1)["images"].joinpath("shapes_000010.png").is_file()
    assert len(list((tmp_path / "images").glob("*.png"))) == 10  # stale images removed
    (tmp_path / "images" / "shapes_000004.png").unlink()
    generate_shapes(tmp_path, n=10, seed=1)
    assert (tmp_path / "images" / "shapes_000004.png").is_file()


def test_bad_splits_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="splits"):
        generate_shapes(tmp_path, n=10, splits=(("train", 0.5), ("val", 0.2)))


def test_load_annotations_without_shapes_key_is_none(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": [], "annotations": []}))
    assert load_shapes(path) is None


def test_parse_caption():
    parsed = parse_caption("From left to right there is a red circle, a blue square and a green triangle")
    assert parsed == ParsedCaption((("red", "circle"), ("blue", "square"), ("green", "triangle")),
                                   ("left of",), 0)
    assert parse_caption("a blue square under a red circle").relation == "below"
    assert parse_caption("a red circle to the left of a blue square").relation == "left of"
    assert parse_caption("a single red circle").relation is None
    assert parse_caption("a red circle above a blue square left of a red square").relation is None
    assert parse_caption("a red circle and a square").stray == 1


@pytest.mark.parametrize("caption", [
    "a red circle to the left of a blue square",
    "there is a blue square to the right of a red circle",
    "a red circle is left of a blue square",
])
def test_true_two_object_captions_pass(caption):
    assert content_correct(caption, [RED_CIRCLE, BLUE_SQUARE])


@pytest.mark.parametrize("caption", [
    "a green circle to the left of a blue square",  # swapped colour
    "a red circle to the left of a blue circle",  # swapped shape
    "a red circle",  # missing object
    "a red circle to the left of a blue square and a green triangle",  # extra object
    "a red circle to the right of a blue square",  # wrong relation
    "a red circle above a blue square",  # wrong axis
    "a red circle and a blue square",  # no relation
    "a red circle to the left of a blue square and a red",  # dangling colour
    "a red circle to the left of a red circle",  # repeated object
])
def test_wrong_two_object_captions_fail(caption):
    assert not content_correct(caption, [RED_CIRCLE, BLUE_SQUARE])


def test_single_and_three_object_captions():
    assert content_correct("a red circle on a white background", [RED_CIRCLE])
    assert not content_correct("a red circle above a blue square", [RED_CIRCLE])
    assert content_correct("a red circle above a green triangle", [RED_CIRCLE, GREEN_TRIANGLE])
    assert content_correct("a green triangle under a red circle", [RED_CIRCLE, GREEN_TRIANGLE])
    row = [{"color": c, "shape": "square", "bbox": [x, 40, 20, 20]}
           for c, x in (("red", 4), ("blue", 38), ("green", 72))]
    assert content_correct("a red square, a blue square and a green square from left to right", row)
    assert content_correct("from right to left there is a green square, a blue square and a red square", row)
    assert not content_correct("a blue square, a red square and a green square from left to right", row)
    assert not content_correct("a red square, a blue square and a green square from top to bottom", row)


def _peak(grid, r, c):
    alpha = np.full(grid, 0.01)
    alpha[r, c] = 1.0
    return alpha / alpha.sum()


def test_pointing_hits_peak_inside_and_outside_the_box():
    objects = [RED_CIRCLE, BLUE_SQUARE]  # 96 px, 6x6 grid: cell centres at 8, 24, 40, 56, 72, 88
    words = "a red circle to the left of a blue square".split()
    alphas = np.stack([_peak((6, 6), 0, 0)] * len(words))
    alphas[2] = _peak((6, 6), 1, 1)  # "circle": centre (24, 24) lies in [10, 30]^2 -> hit
    alphas[9] = _peak((6, 6), 1, 1)  # "square": centre (24, 24) is not in the blue square -> miss
    assert pointing_hits(words, alphas, objects, 96) == (1, 2)
    alphas[9] = _peak((6, 6), 1, 4)  # centre (x=72, y=24) lies in the blue square -> hit
    assert pointing_hits(words, alphas, objects, 96) == (2, 2)
    assert pointing_hits(words, alphas.reshape(len(words), 36), objects, 96) == (2, 2)
    wrong = "a green circle to the left of a blue square".split()  # no green circle: a miss
    assert pointing_hits(wrong, alphas, objects, 96) == (1, 2)


def test_shapes_accuracy_aggregates():
    annotations = {1: [RED_CIRCLE], 2: [RED_CIRCLE, BLUE_SQUARE]}
    hit, miss = _peak((6, 6), 1, 1), _peak((6, 6), 5, 5)
    results = {
        1: ("a red circle", ["a", "red", "circle"], np.stack([miss, miss, hit])),
        2: ("a red circle above a blue square", "a red circle above a blue square".split(),
            np.stack([miss] * 7)),
    }
    scores = shapes_accuracy(results, annotations, image_size=96)
    assert scores["content_accuracy"] == 0.5
    assert scores["pointing_accuracy"] == pytest.approx(1 / 3)
    assert scores["pointed_words"] == 3
    with pytest.raises(ValueError, match="no shapes annotation"):
        shapes_accuracy({7: ("a red circle", [], None)}, annotations, image_size=96)
