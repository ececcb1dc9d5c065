"""The guided search's entry: captions that say what the guide is sure the photo shows.

:func:`guided_decode` captions encoded images as :func:`caption.decoding.decode` does, then
searches again, with constrained beam search (:mod:`caption.decoding.constrained`), the captions
whose :class:`caption.guidance.guide.Plan` does not accept them. Every search goes through the
decoder's ``step`` by :mod:`caption.decoding`; this module only decides which to run.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from caption.config import DecodeConfig
from caption.decoding import decode
from caption.decoding.constrained import Constraint, constrained_beam_search
from caption.decoding.results import Hypothesis, default_grid, to_result
from caption.decoding.rules import eval_mode, read_cells
from caption.decoding.search import search
from caption.guidance.guide import Guide
from caption.guidance.result import GuidedResult, GuideInfo
from caption.vocab import Vocabulary


def guided_decode(decoder: nn.Module, features: torch.Tensor, options: DecodeConfig, guide: Guide, *,
                  vocab: Vocabulary | None = None, grid: tuple[int, int] | None = None,
                  mask: torch.Tensor | None = None, pixels: torch.Tensor | None = None) -> list[GuidedResult]:
    """:func:`caption.decoding.decode` of features (B, L, D) guided by ``guide``: searched
    captions of confidently classified objects must name them, people are said only where the
    detector (looking at ``pixels`` (B, 3, S, S) uint8, where given) or the probe sees them, and
    every result carries the guide's labels (``result.guide``) with its stand-ins spelled.
    Sampling is not guided (``result.guide`` None)."""
    if options.sampling:
        return [GuidedResult.of(r) for r in decode(decoder, features, options, vocab=vocab, grid=grid, mask=mask)]
    grid = default_grid(features.shape[1]) if grid is None else grid
    with eval_mode(decoder):
        pairs = guided_search(read_cells(decoder, options.hard_test), features, options, guide, search, mask,
                              pixels)
    return [GuidedResult.of(to_result(h, options, vocab, grid), info) for h, info in pairs]


PlainSearch = Callable[[nn.Module, torch.Tensor, DecodeConfig, "torch.Tensor | None"], list[Hypothesis]]


def guided_search(decoder: nn.Module, features: torch.Tensor, options: DecodeConfig, guide: Guide,
                  plain: PlainSearch, mask: torch.Tensor | None = None,
                  pixels: torch.Tensor | None = None) -> list[tuple[Hypothesis, GuideInfo]]:
    """Caption features (B, L, D) with ``plain`` search; the captions their Plan (made with the
    plain captions and, for the detector, the images' ``pixels`` (B, 3, S, S)) does not accept are
    searched again with constrained beam search (the plain caption stays where it finds none within
    ``max_len``), and those its plan cuts short once more, ending with the name's noun phrase."""
    hyps = plain(decoder, features, options, mask)
    plans = guide.plan(features, [h.tokens for h in hyps], pixels)
    keep = [p.accepts(h.tokens) for h, p in zip(hyps, plans)]
    infos = [p.info if p.enough is None else dataclasses.replace(p.info, satisfied=k) for p, k in zip(plans, keep)]
    todo = [i for i, p in enumerate(plans) if p.constraint is not None and not keep[i]]
    found = _search(decoder, features, options, {i: plans[i].constraint for i in todo}, mask)
    short = _search(decoder, features, options, {i: plans[i].short for i, h in found.items()
                                                 if plans[i].cut_short(h.tokens)}, mask)
    for i, h in {**found, **short}.items():
        hyps[i] = h
        infos[i] = dataclasses.replace(infos[i], satisfied=plans[i].enough is not None, shaped=True,
                                       spelled=plans[i].said_as(h.tokens))
    return list(zip(hyps, infos))


def _search(decoder: nn.Module, features: torch.Tensor, options: DecodeConfig, constraints: dict[int, Constraint],
            mask: torch.Tensor | None) -> dict[int, Hypothesis]:
    """Constrained beam search for the images of features (B, L, D) that ``constraints`` names by
    index: the captions it found, by image index."""
    if not constraints:
        return {}
    todo = list(constraints)
    sub = torch.tensor(todo, device=features.device)
    found = constrained_beam_search(decoder, features[sub], options, list(constraints.values()),
                                    None if mask is None else mask[sub])
    return {i: h for i, h in zip(todo, found) if h is not None}
