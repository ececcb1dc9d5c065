"""What the COCO detector adds to guidance: whether people are in a photo, and which of the
objects a caption names it confirms.

The detector (:mod:`caption.guidance.detector`) costs about three times the captioning of a photo,
so it looks only at the photos where a decision depends on it (:class:`Evidence` is asked per
image), and the people probe settles the clear cases first where that was measured to be safe:

- A caption that names a person keeps it without the detector when the probe is at least
  ``PROBE_PEOPLE``: on Flickr8k dev that settles 741 of the 764 captions that name a person (the
  probe was fitted on Flickr8k, where the detector, on 224-pixel photos, misses people the probe
  finds). On the ImageNet dev half (500 photos, people labelled by eye) it lets 48 of the 84
  invented people stand, the price of not removing real ones elsewhere.
- A photo whose caption guidance would change is always looked at: at 0.8 the probe calls 45 of
  the 395 ImageNet photos with no one in them photos of people, and their objects went unnamed.

A person counts as seen at ``DETECTOR_PERSON``: on the 224-pixel input the captioner has, the
detector scores real people lower than on full-size photos (0.34-0.49 on a beach photo whose
people score 0.45-0.80 at full size); at 0.3 it finds someone in 68 of the 78 ImageNet photos with
people and in 16 of the 395 without. An object a caption names is confirmed at ``CONFIRMED``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from caption.decoding.constrained import Constraint
from caption.guidance.detector import COCO_LABELS, Detection, Detector
from caption.guidance.names import sayable
from caption.vocab import Vocabulary

PROBE_PEOPLE = 0.7  # a caption naming a person keeps it without the detector at this probe value
DETECTOR_PERSON = 0.3  # the detector sees a person at this score
CONFIRMED = 0.5  # the detector confirms an object a caption names at this score
# how captions name the COCO classes whose label is not a caption word
COCO_WORDS = {"sports ball": "ball", "dining table": "table", "potted plant": "plant", "cell phone": "phone",
              "wine glass": "glass", "baseball bat": "bat", "baseball glove": "glove", "tennis racket": "racket",
              "motorcycle": "motorbike", "tv": "television"}


def coco_phrases(vocab: Vocabulary) -> dict[str, tuple[tuple[int, ...], ...]]:
    """COCO label -> the phrases (singular, plural) a caption names it by, for the sayable ones
    ("person" left out: people are decided on their own)."""
    phrases = {}
    for label in dict.fromkeys(c for c in COCO_LABELS if c and c != "person"):
        said = sayable(label, vocab) + sayable(COCO_WORDS.get(label, label), vocab)
        if said:
            phrases[label] = tuple(dict.fromkeys(said))
    return phrases


@dataclass(frozen=True)
class Seen:
    """What the detector found in one photo."""

    person: bool  # it sees someone (a person at ``DETECTOR_PERSON`` or above)
    detections: tuple[Detection, ...] = ()


class Evidence:
    """The detector's answers for one batch, looked up lazily: ``look(indices)`` runs it once on
    those images' pixels (B, 3, S, S) uint8, and ``seen(b)`` tells afterwards."""

    def __init__(self, detector: Detector, pixels: torch.Tensor):
        self.detector, self.pixels = detector, pixels
        self.found: dict[int, tuple[Detection, ...]] = {}

    def look(self, indices: Sequence[int]) -> None:
        todo = [b for b in dict.fromkeys(indices) if b not in self.found]
        if todo:
            for b, found in zip(todo, self.detector(self.pixels[todo])):
                self.found[b] = found

    def seen(self, b: int) -> Seen:
        found = self.found[b]
        return Seen(any(d.label == "person" and d.score >= DETECTOR_PERSON for d in found), found)


def found(seen: Seen, phrases: dict[str, tuple[tuple[int, ...], ...]]) -> tuple[tuple[int, ...], ...]:
    """The phrases of the strongest object (not a person) the detector finds at ``CONFIRMED``
    that captions can name; () when there is none."""
    best = next((d for d in seen.detections if d.label != "person" and d.score >= CONFIRMED
                 and d.label in phrases), None)
    return () if best is None else phrases[best.label]


def confirmed(tokens: Sequence[int], seen: Seen, phrases: dict[str, tuple[tuple[int, ...], ...]]
              ) -> tuple[tuple[int, ...], ...]:
    """The phrases of the objects the caption names that the detector sees at ``CONFIRMED``."""
    labels = dict.fromkeys(d.label for d in seen.detections if d.score >= CONFIRMED and d.label in phrases)
    said = [p for label in labels if Constraint(phrases[label]).satisfied_by(tokens) for p in phrases[label]]
    return tuple(dict.fromkeys(said))
