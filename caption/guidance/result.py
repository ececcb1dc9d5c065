"""What guidance adds to a caption: :class:`GuideInfo` (what the encoder's ImageNet classifier said
about the image and what it made the caption say) and :class:`GuidedResult`, a search's
:class:`caption.decoding.results.DecodingResult` that carries it.

Decoding knows nothing of guidance: its results hold what a search produced. Every caption of the
one inference path (:mod:`caption.pipeline`) is a GuidedResult, its ``guide`` None where guidance
did not run, so users of :class:`caption.inference.CaptionModel` read ``result.guide`` alike
whether it ran or not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from caption.decoding.results import DecodingResult


@dataclass(frozen=True)
class GuideInfo:
    """What the encoder's ImageNet classifier said about one image and what it made the caption
    say (:mod:`caption.guidance.guide`)."""

    labels: tuple[tuple[str, float], ...]  # the classifier's top labels with their probabilities, best first
    constraint: str | None = None  # the name the caption had to say (most specific first); None: no name
    names: tuple[str, ...] = ()  # every name that would do, as the vocabulary spells them (plurals too)
    satisfied: bool = False  # the caption says one of them (or something as plausible)
    no_people: bool = False  # people and what they wear were kept out (the name is the subject of a photo without people)
    shaped: bool = False  # guidance changed the caption: the plain one did not do as asked
    people: float | None = None  # the people probe's probability that the photo shows people; None: no probe
    spelled: tuple[tuple[int, str], ...] = ()  # (position, name): a word the caption says for a stand-in token

    def spell(self, words: list[str]) -> list[str]:
        """The caption's words with each stand-in replaced by the name it says (``spelled``)."""
        words = list(words)
        for i, word in self.spelled:
            words[i] = word
        return words


@dataclass(frozen=True)
class GuidedResult(DecodingResult):
    """One image's caption and what guidance made of it; its runners-up (``alternatives``) are
    plain DecodingResults."""

    guide: GuideInfo | None = None  # the classifier's labels and the constraint; None: not guided

    @classmethod
    def of(cls, result: DecodingResult, guide: GuideInfo | None = None) -> "GuidedResult":
        """``result`` with ``guide``; its words spelled as ``guide`` says (:meth:`GuideInfo.spell`)."""
        searched = {f.name: getattr(result, f.name) for f in dataclasses.fields(DecodingResult)}
        if guide is not None:
            searched["words"] = guide.spell(result.words)
        return cls(**searched, guide=guide)


def guide_of(result: object) -> GuideInfo | None:
    """The guide of a result: a GuidedResult's, or None for a result without one (a plain
    search's, or a stand-in with the same fields)."""
    return getattr(result, "guide", None)
