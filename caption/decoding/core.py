"""The beam core: the beams of B images as one batch, the captions they finished, when to stop, the pick.

Plain beam search (:mod:`caption.decoding.beam`) keeps one bank of K beams per image; constrained
beam search (:mod:`caption.decoding.constrained`) keeps two (captions free of a phrase, captions
held to one), its rules deciding which candidate may enter which. Each step the search scores every
candidate (row, next word) and :class:`Beams` does the rest, batched over all images and rows:

- :meth:`Beams.top`: a bank's best candidates, by score or by tier first and score second; the best
  K that do not end go on;
- :meth:`Beams.finish`: a candidate that emits ``<end>`` among its bank's top K is set aside as a
  finished caption (and stays finished);
- :meth:`Beams.advance`: the kept candidates become the next rows (R = K per bank);
- :meth:`Beams.done`: an image is done once no live beam can beat the need-th best of its finished
  captions (log-probabilities only fall as words are added);
- :meth:`Beams.results`: the best caption by ``score / len**length_penalty``, among the finished and,
  at ``max_len``, the live ones (before the cap a live beam is a prefix, not a caption), with the
  next K-1 as runners-up when ``options.alternatives``.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from caption.config import DecodeConfig
from caption.decoding.results import Hypothesis, normalised
from caption.vocab import END_ID, START_ID


@dataclass(frozen=True)
class Top:
    """A bank's best candidates at one step; positions count in the (B, R*V) candidates: row * V + word."""

    scores: torch.Tensor  # (B, C) the top C = min(2K, R*V) candidates' scores, best first
    index: torch.Tensor  # (B, C) their positions
    ends: torch.Tensor  # (B, C) bool, the candidate's word is <end>
    kept: torch.Tensor  # (B, K) positions of the K that go on: the best that do not end
    kept_scores: torch.Tensor  # (B, K) their scores, -inf for a dead slot (kept for want of live candidates)
    words: int  # V


class Beams:
    """The live beams of B images (R rows each, consecutive), their captions so far, and the
    captions they finished; ``scores`` rank them, ``log_probs`` are the model's own (the same
    tensor unless the search ranks by something else)."""

    def __init__(self, B: int, options: DecodeConfig, L: int, device: torch.device):
        self.K, self.options = options.beam_size, options
        self.need = self.K if options.alternatives else 1  # finished captions that must be final to stop
        self.scores = torch.zeros((B, 1), device=device)  # (B, R) R = 1 row per image before the first word
        self.log_probs = self.scores  # (B, R)
        self.prev = torch.full((B,), START_ID, dtype=torch.long, device=device)  # (B*R,) last words
        self.tokens = torch.empty((B, 0), dtype=torch.long, device=device)  # (B*R, t)
        self.alphas = torch.empty((B, 0, L), device=device)  # (B*R, t, L)
        self.finished: list[list[tuple[float, Hypothesis]]] = [[] for _ in range(B)]  # (normalised score, caption)
        self.best_finished = torch.full((B,), float("-inf"), device=device)  # (B,) need-th best normalised score

    def candidates(self, word_scores: torch.Tensor) -> torch.Tensor:
        """(B, R, V) every candidate's score: its row's plus its word's, word_scores (B*R, V)
        (added in place)."""
        B, R = self.scores.shape
        return word_scores.view(B, R, -1).add_(self.scores.unsqueeze(-1))  # (B, R, V)

    def top(self, cand: torch.Tensor, tier: torch.Tensor | None = None, tiers: int = 1) -> Top:
        """The bank's top 2K of cand (B, R, V) (-inf: not in the bank), by score, or with ``tier``
        (B, R, V) of 0 .. tiers-1 by tier first (highest first) and score second."""
        B, R, V = cand.shape
        flat = cand.reshape(B, R * V)  # (B, R*V)
        count = min(2 * self.K, R * V)
        if tier is None:
            scores, index = flat.topk(count, dim=1)  # (B, C)
        else:
            scores, index = _top_by_tier(flat, tier.reshape(B, R * V), count, tiers)  # (B, C)
        ends = (index % V) == END_ID
        rank = torch.arange(count, device=cand.device)
        keep = torch.argsort(ends.long() * count + rank, dim=1)[:, : self.K]  # (B, K) best non-<end>
        kept_scores = scores.gather(1, keep).masked_fill(ends.gather(1, keep), float("-inf"))  # (B, K)
        return Top(scores, index, ends, index.gather(1, keep), kept_scores, V)

    def finish(self, top: Top, alpha: torch.Tensor, own: torch.Tensor | None = None) -> None:
        """Set aside the candidates of ``top`` that end among its K best: captions scored by their
        ranking score, holding the model's log-probability (``own`` (B, R, V), default: the score);
        ``alpha`` (B*R, L) is this step's maps."""
        B, R = self.scores.shape
        rank = torch.arange(top.scores.shape[1], device=top.scores.device)
        fin = top.ends & (rank < self.K) & torch.isfinite(top.scores)  # (B, C)
        for b, j in fin.nonzero().tolist():
            c = int(top.index[b, j])
            r = b * R + c // top.words  # the row it grew from
            seq = self.tokens[r].tolist() + [END_ID]
            maps = torch.cat([self.alphas[r], alpha[r : r + 1].to(self.alphas.dtype)], 0)  # (T, L)
            score = float(top.scores[b, j])
            log_prob = score if own is None else float(own.view(B, -1)[b, c])
            self.finished[b].append((normalised(score, len(seq), self.options.length_penalty),
                                     Hypothesis(seq, log_prob, maps, True)))
            if len(self.finished[b]) >= self.need:
                self.best_finished[b] = heapq.nlargest(self.need, (s for s, _ in self.finished[b]))[-1]

    def advance(self, tops: Sequence[Top], alpha: torch.Tensor, own: torch.Tensor | None = None) -> torch.Tensor:
        """The banks' kept candidates become the rows, bank after bank (R = K per bank); ``own``
        (B, R, V) as for :meth:`finish`. Returns the rows (B*R,) they continue, for the decoder state."""
        B, R = self.scores.shape
        V = tops[0].words
        kept = torch.cat([t.kept for t in tops], 1)  # (B, R') positions of the new rows
        rows = (torch.arange(B, device=kept.device).unsqueeze(1) * R + kept // V).view(-1)  # (B*R',) floor division
        self.scores = torch.cat([t.kept_scores for t in tops], 1)  # (B, R')
        self.log_probs = self.scores if own is None else own.reshape(B, R * V).gather(1, kept)  # (B, R')
        self.prev = (kept % V).view(-1)  # (B*R',)
        self.tokens = torch.cat([self.tokens[rows], self.prev.unsqueeze(1)], 1)  # (B*R', t+1)
        new_alpha = alpha.to(self.alphas.dtype)[rows].unsqueeze(1)  # (B*R', 1, L)
        self.alphas = torch.cat([self.alphas[rows], new_alpha], 1)  # (B*R', t+1, L)
        return rows

    def done(self) -> bool:
        """Whether, for every image, no live beam can still beat the need-th best finished caption."""
        bound = self.scores.max(1).values / self.options.max_len**self.options.length_penalty  # (B,)
        return bool((self.best_finished >= bound).all())

    def results(self, memory, eligible: torch.Tensor | None = None) -> list[Hypothesis | None]:
        """Each image's best caption (None where there is none), runners-up riding along when
        ``options.alternatives``; live beams count at the length cap only, those ``eligible``
        (B, R) bool (default: all). ``memory.pool_alpha`` (B, L), when there is one
        (model.init_state=attend), goes on every caption of its image."""
        pool = memory.pool_alpha
        hyps = [self._best(b, eligible) for b in range(self.scores.shape[0])]
        if pool is None:
            return hyps
        return [None if h is None else dataclasses.replace(h, init_alpha=pool[b], others=tuple(
            dataclasses.replace(o, init_alpha=pool[b]) for o in h.others)) for b, h in enumerate(hyps)]

    def _best(self, b: int, eligible: torch.Tensor | None) -> Hypothesis | None:
        options, R = self.options, self.scores.shape[1]
        pool = list(self.finished[b])
        if self.tokens.shape[1] == options.max_len:
            allowed = [True] * R if eligible is None else eligible[b].tolist()
            for k, (s, log_prob, ok) in enumerate(zip(self.scores[b].tolist(), self.log_probs[b].tolist(), allowed)):
                if ok and math.isfinite(s):
                    hyp = Hypothesis(self.tokens[b * R + k].tolist(), log_prob, self.alphas[b * R + k], False)
                    pool.append((normalised(s, len(hyp.tokens), options.length_penalty), hyp))
        if not pool:
            return None
        pool.sort(key=lambda pair: pair[0], reverse=True)  # stable: the first set aside wins a tie
        if not options.alternatives:
            return pool[0][1]
        return dataclasses.replace(pool[0][1], others=tuple(h for _, h in pool[1 : self.K]))


def _top_by_tier(cand: torch.Tensor, tier: torch.Tensor, count: int, tiers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``count`` of cand (B, N) ordered by tier (B, N) first, highest first, and score
    second; -inf candidates last whatever their tier. Returns scores and positions (B, count)."""
    blocks = [cand.masked_fill(tier != level, float("-inf")).topk(count, dim=1) for level in reversed(range(tiers))]
    scores = torch.cat([block.values for block in blocks], 1)  # (B, tiers*count) tier by tier
    index = torch.cat([block.indices for block in blocks], 1)  # (B, tiers*count)
    order = torch.argsort((scores == float("-inf")).to(torch.uint8), dim=1, stable=True)[:, :count]  # finite first
    return scores.gather(1, order), index.gather(1, order)  # (B, count) each
