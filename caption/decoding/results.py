"""What decoding returns: one :class:`DecodingResult` per image (searched), or :class:`Samples`
(sampled, K rows per image, with log-probabilities that can carry gradients). What guidance adds
to a result is guidance's (:mod:`caption.guidance.result`), and a result's JSON record is built
above both (:mod:`caption.guidance.record`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from caption.config import DecodeConfig
from caption.vocab import END, END_ID, SPECIALS, Vocabulary


@dataclass(frozen=True)
class DecodingResult:
    """One image's caption. ``alphas[t]`` is the attention map used to emit ``words[t]``."""

    tokens: list[int]  # emitted ids, <end> included when emitted, no <start>
    words: list[str]  # one per token ("<end>" for the end token)
    log_prob: float  # sum of the tokens' log-probabilities
    score: float  # log_prob / len(tokens)**length_penalty
    alphas: torch.Tensor  # (T, gh, gw), each map sums to 1
    finished: bool  # False when cut at max_len
    alternatives: tuple["DecodingResult", ...] = ()  # the beam's runners-up, best first (options.alternatives)
    init_alphas: torch.Tensor | None = None  # (gh, gw) the query-free pool h0/c0 came from (model.init_state=attend)

    @property
    def caption(self) -> str:
        return " ".join(w for w in self.words if w not in SPECIALS)


@dataclass(frozen=True)
class Hypothesis:
    """A search's caption of one image before it becomes a DecodingResult."""

    tokens: list[int]
    log_prob: float
    alphas: torch.Tensor  # (T, L)
    finished: bool
    others: tuple["Hypothesis", ...] = ()  # runners-up, best first, when options.alternatives
    init_alpha: torch.Tensor | None = None  # (L,) the image's query-free pool weights (init_state=attend)


def map_entropy(alphas: torch.Tensor) -> torch.Tensor:
    """(..., L) attention maps -> (...,) their entropy in nats, in float64 (log L for a flat map)."""
    p = alphas.double().clamp_min(1e-12)
    return -(p * p.log()).sum(-1)


def normalised(log_prob: float, length: int, length_penalty: float) -> float:
    """The score a caption is ranked by: ``log_prob / length**length_penalty``."""
    return log_prob / max(length, 1) ** length_penalty


def default_grid(L: int) -> tuple[int, int]:
    """A square grid when L is a square number, else one row."""
    side = math.isqrt(L)
    return (side, side) if side * side == L else (1, L)


def to_result(h: Hypothesis, options: DecodeConfig, vocab: Vocabulary | None,
              grid: tuple[int, int]) -> DecodingResult:
    """A hypothesis as a DecodingResult, its runners-up included; ``vocab`` turns ids into words
    (default: the ids as strings, ``<end>`` named)."""
    if vocab is not None:
        words = [vocab.itos[i] for i in h.tokens]
    else:
        words = [END if i == END_ID else str(i) for i in h.tokens]
    return DecodingResult(
        tokens=h.tokens,
        words=words,
        log_prob=h.log_prob,
        score=normalised(h.log_prob, len(h.tokens), options.length_penalty),
        alphas=h.alphas.float().reshape(len(h.tokens), *grid).cpu(),  # (T, gh, gw)
        finished=h.finished,
        alternatives=tuple(to_result(o, options, vocab, grid) for o in h.others),
        init_alphas=None if h.init_alpha is None else h.init_alpha.float().reshape(grid).cpu(),  # (gh, gw)
    )


@dataclass(frozen=True)
class Samples:
    """Captions of N rows, K consecutive rows per image (N = B*K), as the one decoding loop emits
    them: greedy search's (K = 1) or sampled ones.

    ``log_probs`` are under the distribution the words were picked from (the options' rules
    applied; when sampling, renormalised at the temperature); they carry gradients when sampled
    with ``grad=True`` (self-critical training).
    """

    tokens: torch.Tensor  # (N, T) emitted ids, <end> included when emitted, <pad> after it
    log_probs: torch.Tensor  # (N, T) each token's log-probability, 0 at <pad>
    mask: torch.Tensor  # (N, T) bool, True on emitted tokens (<end> included)
    alphas: torch.Tensor  # (N, T, L) attention used for each token, 0 at <pad> (no gradient)
    init_alphas: torch.Tensor | None  # (B, L) the query-free pool weights (model.init_state=attend), else None
    samples: int  # K

    @property
    def lengths(self) -> torch.Tensor:
        """(N,) tokens per caption, <end> included."""
        return self.mask.sum(1)

    def token_lists(self) -> list[list[int]]:
        """Each row's emitted ids (<end> included when emitted)."""
        return [row[:n] for row, n in zip(self.tokens.tolist(), self.lengths.tolist())]

    def hypotheses(self) -> list[Hypothesis]:
        """Each row as a Hypothesis, rows in order."""
        logp = self.log_probs.detach().sum(1).tolist()  # (N,)
        return [Hypothesis(tokens, logp[i], self.alphas[i, : len(tokens)], END_ID in tokens,
                           init_alpha=None if self.init_alphas is None else self.init_alphas[i // self.samples])
                for i, tokens in enumerate(self.token_lists())]

    def results(self, vocab: Vocabulary | None = None, grid: tuple[int, int] | None = None) -> list[DecodingResult]:
        """Each row as a DecodingResult (``score`` is its log-probability), rows in order."""
        grid = default_grid(self.alphas.shape[-1]) if grid is None else grid
        return [to_result(h, DecodeConfig(), vocab, grid) for h in self.hypotheses()]
