"""The record of one image's caption: the one shape ``caption predict --json`` prints,
``caption serve`` answers and ``/openapi.json`` publishes.

:func:`caption_record` builds a :class:`CaptionRecord` from a result, and :func:`as_json` writes
any record as plain JSON values, fields in their declared order. The record types are frozen
dataclasses of the standard library, so ``caption predict`` needs nothing more; the API returns
them as its declared response models, and FastAPI (pydantic) derives the published schema from
these same classes. Two attributes speak to pydantic without importing it: ``__pydantic_config__``
(``RECORD_CONFIG``: a record validates strictly, no unknown field and no coerced value) and a
field's ``exclude_if`` metadata (``OMITTED_WHEN_NONE``), which :func:`as_json` honours too: such
a field is left out of the JSON when it is None (a map not asked for, a guide that did not run),
while other None fields are written as null.

The record sits above decoding and guidance: it reads a DecodingResult and, where guidance ran,
its :class:`caption.guidance.result.GuideInfo`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from caption.decoding.results import DecodingResult, map_entropy
from caption.guidance.result import GuideInfo, guide_of

MAP_DECIMALS = 4  # attention weights in a record
LOG_PROB_DECIMALS = 6
FOCUS_DECIMALS = 1
RECORD_CONFIG = {"extra": "forbid", "strict": True}  # pydantic's reading of every record type


def _is_none(value: object) -> bool:
    return value is None


OMITTED_WHEN_NONE = {"exclude_if": _is_none}  # a field's metadata: left out of the JSON when None

Maps = list[list[list[float]]]  # T attention maps (gh, gw), aligned with the tokens


@dataclass(frozen=True)
class Label:
    """One of the classifier's top labels and its probability."""

    __pydantic_config__ = RECORD_CONFIG
    label: str
    p: float


@dataclass(frozen=True)
class Spelled:
    """A word the caption says for a stand-in token, at its position among the tokens."""

    __pydantic_config__ = RECORD_CONFIG
    position: int
    word: str


@dataclass(frozen=True)
class GuideRecord:
    """What the encoder's ImageNet classifier said and what it made the caption say (:class:`GuideInfo`)."""

    __pydantic_config__ = RECORD_CONFIG
    labels: list[Label]  # best first
    constraint: Optional[str]  # the name the caption had to say; null: none
    names: list[str]  # every name that would do
    satisfied: bool  # the caption says one of them
    no_people: bool  # people and what they wear were kept out
    shaped: bool  # guidance changed the caption
    people: Optional[float]  # the people probe's probability that the photo shows people; null: no probe
    spelled: list[Spelled]  # names beyond the vocabulary, said for stand-in tokens


@dataclass(frozen=True)
class Alternative:
    """One of the beam's runners-up."""

    __pydantic_config__ = RECORD_CONFIG
    caption: str
    tokens: list[str]
    log_prob: float
    attention: Optional[Maps] = field(default=None, metadata=OMITTED_WHEN_NONE)


@dataclass(frozen=True)
class CaptionRecord:
    """One image's caption, as ``caption predict --json`` prints it."""

    __pydantic_config__ = RECORD_CONFIG
    image: str
    caption: str
    tokens: list[str]  # emitted words, "<end>" included when emitted
    log_prob: float
    beam: int
    grid: list[int]  # [gh, gw]
    focus: list[float]  # per token, how many cells its map is spread over (exp of its entropy): 1 = one cell, gh*gw = flat
    attention: Optional[Maps] = field(default=None, metadata=OMITTED_WHEN_NONE)
    init_attention: Optional[list[list[float]]] = field(default=None, metadata=OMITTED_WHEN_NONE)  # before word 1
    guide: Optional[GuideRecord] = field(default=None, metadata=OMITTED_WHEN_NONE)
    alternatives: Optional[list[Alternative]] = field(default=None, metadata=OMITTED_WHEN_NONE)


@dataclass(frozen=True)
class CaptionResults:
    """Several images' records, in the order they were sent."""

    __pydantic_config__ = RECORD_CONFIG
    results: list[CaptionRecord]


def _maps(alphas: torch.Tensor) -> list:
    """Attention maps (..., gh, gw) as nested lists rounded to MAP_DECIMALS."""
    return alphas.double().round(decimals=MAP_DECIMALS).tolist()


def focus(alphas: torch.Tensor) -> list[float]:
    """(T, gh, gw) maps -> per map, the number of cells it is as spread as: exp(entropy), from 1 (all
    weight on one cell) to gh*gw (flat), rounded to FOCUS_DECIMALS."""
    return map_entropy(alphas.flatten(1)).exp().round(decimals=FOCUS_DECIMALS).tolist()  # (T, L) -> (T,)


def guide_record(info: GuideInfo) -> GuideRecord:
    """``info`` as its record."""
    return GuideRecord(labels=[Label(label, p) for label, p in info.labels], constraint=info.constraint,
                       names=list(info.names), satisfied=info.satisfied, no_people=info.no_people,
                       shaped=info.shaped, people=info.people,
                       spelled=[Spelled(position, word) for position, word in info.spelled])


def caption_record(image: str, result: DecodingResult, beam: int, *, attention: bool = True,
                   alternatives: bool | None = None) -> CaptionRecord:
    """One image's record: the caption, its emitted words and their attention maps, the guide's
    labels (where guidance ran), and the beam's runners-up with theirs (``alternatives``; None:
    when ``beam`` > 1). ``attention=False`` leaves every map out."""
    init, guide = result.init_alphas, guide_of(result)
    runners_up = None
    if beam > 1 if alternatives is None else alternatives:
        runners_up = [Alternative(alt.caption, list(alt.words), round(float(alt.log_prob), LOG_PROB_DECIMALS),
                                  _maps(alt.alphas) if attention else None)
                      for alt in result.alternatives]
    return CaptionRecord(
        image=image, caption=result.caption, tokens=list(result.words),
        log_prob=round(float(result.log_prob), LOG_PROB_DECIMALS), beam=beam,
        grid=list(result.alphas.shape[1:]), focus=focus(result.alphas),
        attention=_maps(result.alphas) if attention else None,
        init_attention=_maps(init) if attention and init is not None else None,
        guide=None if guide is None else guide_record(guide),
        alternatives=runners_up,
    )


def as_json(record: Any) -> Any:
    """A record (or a list of them) as plain JSON values: fields in their declared order, those
    marked OMITTED_WHEN_NONE left out when None."""
    if dataclasses.is_dataclass(record):
        return {f.name: as_json(value) for f in dataclasses.fields(record)
                if not ((value := getattr(record, f.name)) is None and f.metadata.get("exclude_if") is _is_none)}
    if isinstance(record, list) and record and dataclasses.is_dataclass(record[0]):
        return [as_json(item) for item in record]
    return record
