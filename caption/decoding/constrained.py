"""Constrained beam search (Anderson et al. 2017): every caption must say one of a set of phrases.

Each image has a :class:`Constraint`: a disjunction of phrases (token-id sequences: "cat", "cats",
"hot dog") that may start only where the model expects a noun (the probability of ``slot_words``
at that step is at least ``slot_mass``: "a ___", "a brown ___", not "two dogs are ___"), and, when
``within`` is set, only among the caption's first ``within`` words (the object as the subject).
``penalty`` is taken off the ranking score of every word of ``penalized`` emitted (people, say).

A two-state machine runs per beam: state 0, no phrase said yet; state 1, one said. Each state
keeps its own K beams, so captions that already hold the phrase are never crowded out by those
that do not. All images and their 2K beams are one (B*2K)-row batch through the decoder's
``step``, the keys projected once per image, as in :mod:`caption.decoding.beam`. Only state-1
captions can be the result (finished ones, and at ``max_len`` the live ones), ranked by
``(log_prob - penalties) / len**length_penalty``; the result reports the model's own
log-probability. An image without a state-1 caption gets ``None`` (the caller falls back).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from caption.config import DecodeConfig
from caption.decoding.results import Hypothesis, normalised
from caption.decoding.rules import log_probs
from caption.vocab import END_ID, START_ID

_NONE = -1  # a token before the caption's start (matches no phrase word)
_ANY = -2  # an unused slot of a right-aligned phrase prefix (matches any token)
_NEVER = 10**9  # "no deadline"
_TIER = 1e6  # log-probability distance between tiers of state 1 (far below any caption's)


@dataclass(frozen=True)
class Constraint:
    """What one image's caption must say: one of ``phrases`` (each a tuple of token ids; none: the
    caption need say nothing, only the penalty applies), starting
    within its first ``within`` words (0: anywhere) at a step where ``slot_words`` have at least
    ``slot_mass`` probability (0: anywhere); ``penalty`` is taken off the ranking score for every
    word of ``penalized`` the caption emits."""

    phrases: tuple[tuple[int, ...], ...]
    within: int = 0
    penalized: tuple[int, ...] = ()
    penalty: float = 0.0
    slot_words: tuple[int, ...] = ()
    slot_mass: float = 0.0
    end_phrase: bool = False  # the phrase ends its noun phrase: no noun right after it ("a fish dog"), nor one word later ("a frog brown dog")
    not_after: tuple[tuple[int, ...], ...] = ()  # per phrase, words that may not come right before it ("a" before "owl")

    def __post_init__(self) -> None:
        if any(not p for p in self.phrases):
            raise ValueError("a phrase of a constraint needs at least one word")
        if self.within < 0 or self.penalty < 0 or not 0 <= self.slot_mass <= 1:
            raise ValueError("within and penalty must be >= 0, slot_mass in [0, 1]")

    def satisfied_by(self, tokens: Sequence[int], slots: Sequence[bool] | None = None) -> bool:
        """Whether ``tokens`` say one of the phrases starting within the first ``within`` words, at
        a position i where ``slots[i]`` (the model expected a noun there; None: everywhere), and,
        with ``end_phrase``, the first such phrase to end is not followed by one of ``slot_words``,
        nor by a word after which the model expects a noun (``slots`` of the position after it, when
        ``slot_mass`` is above 0)."""
        tokens = list(tokens)
        if not self.phrases:
            return True
        before = [None] + tokens
        ends = [i + len(p) for k, p in enumerate(self.phrases) for i in range(min(self.within or len(tokens), len(tokens)))
                if tokens[i : i + len(p)] == list(p) and (slots is None or slots[i])
                and not (k < len(self.not_after) and before[i] in self.not_after[k])]
        if not ends:
            return False
        first = min(ends)
        if not self.end_phrase or first >= len(tokens):
            return True
        noun_next = slots is not None and self.slot_mass > 0 and first + 1 < len(tokens) and slots[first + 1]
        return tokens[first] not in self.slot_words and not noun_next


class _Phrases:
    """The constraints of B images as tensors: phrase words right-aligned, so one comparison with
    each row's last M-1 words tells which phrases the next word would complete."""

    def __init__(self, constraints: Sequence[Constraint], vocab_size: int, device: torch.device):
        B, P = len(constraints), max([1, *(len(c.phrases) for c in constraints)])
        self.M = max([1, *(len(p) for c in constraints for p in c.phrases)])
        prefix = torch.full((B, P, max(self.M - 1, 1)), _ANY, dtype=torch.long)  # (B, P, M-1)
        last = torch.zeros((B, P), dtype=torch.long)  # (B, P) final word of each phrase
        length = torch.zeros((B, P), dtype=torch.long)  # (B, P), 0 for padding
        bias = torch.zeros((B, vocab_size))  # (B, V) ranking penalty per word
        A = max([1, *(len(n) for c in constraints for n in c.not_after)])
        not_after = torch.full((B, P, A), _ANY, dtype=torch.long)  # (B, P, A) words a phrase may not follow
        slot_words = torch.zeros((B, vocab_size))  # (B, V) 1 for the words whose mass makes a noun slot
        # the first j words of each phrase, j = 1..M-1: its first j-1 right-aligned, and its j-th word
        parts = [(torch.full_like(prefix, _ANY), torch.zeros_like(last)) for _ in range(self.M - 1)]
        for b, c in enumerate(constraints):
            for p, words in enumerate(c.phrases):
                if len(words) > 1:
                    prefix[b, p, prefix.shape[2] - (len(words) - 1) :] = torch.tensor(words[:-1])
                for j in range(1, len(words)):
                    if j > 1:
                        parts[j - 1][0][b, p, prefix.shape[2] - (j - 1) :] = torch.tensor(words[: j - 1])
                    parts[j - 1][1][b, p] = words[j - 1]
                last[b, p], length[b, p] = words[-1], len(words)
                if p < len(c.not_after) and c.not_after[p]:
                    not_after[b, p, : len(c.not_after[p])] = torch.tensor(c.not_after[p])
            bias[b, list(c.penalized)] = -c.penalty
            slot_words[b, list(c.slot_words)] = 1.0
        self.parts = [(pre.to(device), word.to(device)) for pre, word in parts]
        self.not_after = not_after.to(device)
        self.prefix, self.last, self.length = prefix.to(device), last.to(device), length.to(device)
        self.bias, self.slot_words = bias.to(device), slot_words.to(device)
        self.slot_mass = torch.tensor([c.slot_mass for c in constraints], device=device)  # (B,)
        self.end_phrase = torch.tensor([c.end_phrase for c in constraints], device=device)  # (B,)
        self.within = torch.tensor([c.within or _NEVER for c in constraints], device=device)  # (B,)

    def slots(self, logp: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """(N,) bool: whether each row's next word is a noun slot (where a phrase may start)."""
        mass = (logp.exp() * self.slot_words[image]).sum(1)  # (N,)
        return mass >= self.slot_mass[image]

    def completes(self, tokens: torch.Tensor, slots: torch.Tensor, image: torch.Tensor, V: int) -> torch.Tensor:
        """(N, V) bool: which next word completes a phrase that started in time and at a noun slot,
        after each row's ``tokens`` (N, t); ``slots`` (N, t+1) says which positions were noun slots
        (the next one included); ``image`` (N,) is each row's image."""
        return self._hits(tokens, slots, image, V, self.prefix, self.last, self.length[image])

    def extends(self, tokens: torch.Tensor, slots: torch.Tensor, image: torch.Tensor, V: int) -> torch.Tensor:
        """(N, V) bool: which next word takes a phrase (started in time, at a noun slot) one word
        further without completing it: "hot" of "hot dog", or "dog" after "hot" of "hot dog house"."""
        hits = torch.zeros((tokens.shape[0], V), dtype=torch.bool, device=tokens.device)
        for j, (prefix, word) in enumerate(self.parts, start=1):  # the phrase's j-th word, of more than j
            length = torch.where(self.length[image] > j, j, 0)  # (N, P) j words so far, 0: no such phrase
            hits |= self._hits(tokens, slots, image, V, prefix, word, length)
        return hits

    def _hits(self, tokens, slots, image, V: int, prefix, word, length) -> torch.Tensor:
        """(N, V) bool: rows whose last words match ``prefix`` (B, P, M-1) so that ``word`` (B, P)
        is the length-th word (N, P) of a phrase (0: none) that started in time at a noun slot."""
        N, t = tokens.shape
        width = prefix.shape[2]
        tail = torch.full((N, width), _NONE, dtype=torch.long, device=tokens.device)  # (N, M-1)
        take = min(width, t)
        if take:
            tail[:, width - take :] = tokens[:, t - take :]
        prefix = prefix[image]  # (N, P, M-1)
        ok = ((prefix == tail.unsqueeze(1)) | (prefix == _ANY)).all(-1) & (length > 0)  # (N, P)
        start = t - (length - 1)  # (N, P) where the phrase would have started
        ok &= (start < self.within[image].unsqueeze(1)) & (start >= 0)
        ok &= slots.gather(1, start.clamp(0, t))  # (N, P) it started at a noun slot
        if t:
            before = tokens.gather(1, (start - 1).clamp(0, t - 1)).masked_fill(start < 1, _NONE)  # (N, P) word before it
            ok &= ~(before.unsqueeze(-1) == self.not_after[image]).any(-1)
        hits = torch.zeros((N, V), dtype=torch.long, device=tokens.device)  # (N, V)
        hits.scatter_add_(1, word[image], ok.long())
        return hits > 0

    def can_still_start(self, t: int, image: torch.Tensor) -> torch.Tensor:
        """(N,) bool: whether a caption of t+1 words may still start a phrase in time."""
        return (t + 1) < self.within[image]


def constrained_beam_search(decoder: nn.Module, features: torch.Tensor, options: DecodeConfig,
                            constraints: Sequence[Constraint], mask=None) -> list[Hypothesis | None]:
    """The best caption that satisfies its image's constraint, for each image of features (B, L, D)
    (None where none did within ``max_len``); K = ``options.beam_size`` beams per state. Before the
    first word one row per image runs (R = 1); from then on R = 2K rows per image."""
    B = features.shape[0]
    if len(constraints) != B:
        raise ValueError(f"{len(constraints)} constraints for {B} images")
    memory = decoder.prepare(features, mask)  # keys once per image, shared by its beams
    state = decoder.init_state(memory)  # (B*R, H), R = 1
    search = _Search(B, options, memory.values.shape[1], features.device)
    search.sat[:, 0] = torch.tensor([not c.phrases for c in constraints])  # nothing to say: satisfied from the start
    table: _Phrases | None = None
    for t in range(options.max_len):
        out = decoder.step(search.prev, state, memory)
        logp = log_probs(out.logits, t, options, search.tokens)  # (B*R, V)
        table = table or _Phrases(constraints, logp.shape[1], features.device)
        state = out.state.index(search.advance(t, logp, out.alpha, table))
        if search.done():
            break
    pool = memory.pool_alpha  # (B, L) for model.init_state=attend, else None
    hyps = [search.best(b) for b in range(B)]
    return [h if h is None or pool is None else dataclasses.replace(h, init_alpha=pool[b], others=tuple(
        dataclasses.replace(o, init_alpha=pool[b]) for o in h.others)) for b, h in enumerate(hyps)]


class _Search:
    """The beams of B images in two banks (state-0 rows first, then state 1), what finished, and
    the step that moves them on."""

    def __init__(self, B: int, options: DecodeConfig, L: int, device: torch.device):
        self.B, self.K, self.options = B, options.beam_size, options
        self.scores = torch.zeros((B, 1), device=device)  # (B, R) ranking scores (penalties in)
        self.logps = torch.zeros((B, 1), device=device)  # (B, R) the model's log-probabilities
        self.sat = torch.zeros((B, 1), dtype=torch.bool, device=device)  # (B, R) the row says a phrase
        self.pend = torch.zeros((B, 1), dtype=torch.bool, device=device)  # (B, R) state 1, in the middle of a phrase
        self.age = torch.full((B, 1), -1, dtype=torch.long, device=device)  # (B, R) words since the phrase ended, -1: none
        self.prev = torch.full((B,), START_ID, dtype=torch.long, device=device)  # (B*R,)
        self.tokens = torch.empty((B, 0), dtype=torch.long, device=device)  # (B*R, t)
        self.slots = torch.empty((B, 0), dtype=torch.bool, device=device)  # (B*R, t) noun slots so far
        self.alphas = torch.empty((B, 0, L), device=device)  # (B*R, t, L)
        self.finished: list[list[tuple[float, Hypothesis]]] = [[] for _ in range(B)]  # (normalised score, hyp)
        self.best_finished = torch.full((B,), float("-inf"), device=device)  # need-th best normalised score

    def advance(self, t: int, logp: torch.Tensor, alpha: torch.Tensor, table: _Phrases) -> torch.Tensor:
        """One step: score every (row, word), move each to its state's bank, set aside finished
        captions; returns the rows (B*2K,) the new beams continue from."""
        B, V, R = self.B, logp.shape[1], self.scores.shape[1]
        image = torch.arange(B, device=logp.device).repeat_interleave(R)  # (B*R,)
        ranked = (logp + table.bias[image]).view(B, R, V) + self.scores.unsqueeze(-1)  # (B, R, V)
        true = logp.view(B, R, V) + self.logps.unsqueeze(-1)  # (B, R, V)
        slots = torch.cat([self.slots, table.slots(logp, image).unsqueeze(1)], 1)  # (B*R, t+1)
        done = table.completes(self.tokens, slots, image, V).view(B, R, V)  # (B, R, V) the word completes a phrase
        going = table.extends(self.tokens, slots, image, V).view(B, R, V) & ~done  # (B, R, V) it starts/continues one
        sat, pend = self.sat.unsqueeze(-1), self.pend.unsqueeze(-1)  # (B, R, 1) each
        free = ~sat & ~pend
        new_sat = sat | (done & ~sat)  # (B, R, V)
        in1 = new_sat | (going & ~sat)  # state 1: said, or under way (a row under way may do nothing else)
        in0 = free & ~done & table.can_still_start(t, image).view(B, R, 1)  # state 0: still free to say one
        in1[..., END_ID] &= new_sat[..., END_ID]  # only a caption that says a phrase may end
        ends = table.end_phrase[image].view(B, R)  # (B, R) the phrase must end its noun phrase
        after = ((self.age == 0) & ends).unsqueeze(-1)  # (B, R, 1) the phrase just ended: no noun now
        in1 &= ~(after & (table.slot_words[image].view(B, R, V) > 0))
        noun = slots[:, -1] & (table.slot_mass[image] > 0)  # (B*R,) a noun expected now (slot_mass 0: never)
        later = (self.age == 1) & ends & noun.view(B, R)  # (B, R) one word after the phrase a noun is expected again
        in1 &= ~later.unsqueeze(-1)  # "a frog brown ___": that word began another noun phrase
        # state 1 keeps captions that say a phrase first, then those furthest into one, then fresh starts:
        # a phrase's later words cost log-probability, and fresh starts would crowd out those under way
        tier = new_sat.float() * 2 + (going & pend).float()  # (B, R, V)
        picks = [self._bank(ranked.masked_fill(~in0, float("-inf")).view(B, R * V), V),
                 self._bank(ranked.masked_fill(~in1, float("-inf")).view(B, R * V), V, tier.view(B, R * V))]
        self._finish(picks[1], true.view(B, R * V), alpha, R, V)
        keep = torch.cat([p[1] for p in picks], 1)  # (B, 2K) candidates in R*V
        rows = (torch.arange(B, device=logp.device).unsqueeze(1) * R + keep // V).view(-1)  # (B*2K,) floor division
        self.scores = torch.cat([p[0] for p in picks], 1)  # (B, 2K)
        self.logps = true.view(B, R * V).gather(1, keep)  # (B, 2K)
        said = new_sat.view(B, R * V).gather(1, picks[1][1])  # (B, K) of state 1: said, else under way
        self.sat = torch.cat([torch.zeros_like(picks[0][1], dtype=torch.bool), said], 1)  # (B, 2K)
        self.pend = torch.cat([torch.zeros_like(picks[0][1], dtype=torch.bool), ~said], 1)  # (B, 2K)
        ended = (new_sat & ~sat).view(B, R * V).gather(1, picks[1][1])  # (B, K) said it with this word
        age = torch.where(self.age >= 0, self.age + 1, -1).unsqueeze(-1).expand(B, R, V).reshape(B, R * V)
        age = torch.where(ended, 0, age.gather(1, picks[1][1]))  # (B, K)
        self.age = torch.cat([torch.full_like(picks[0][1], -1), age], 1)  # (B, 2K)
        self.prev = (keep % V).view(-1)  # (B*2K,) next words
        self.tokens = torch.cat([self.tokens[rows], self.prev.unsqueeze(1)], 1)  # (B*2K, t+1)
        self.slots = slots[rows]  # (B*2K, t+1)
        self.alphas = torch.cat([self.alphas[rows], alpha.to(self.alphas.dtype)[rows].unsqueeze(1)], 1)  # (B*2K, t+1, L)
        return rows

    def _bank(self, cand: torch.Tensor, V: int, tier: torch.Tensor | None = None):
        """One state's top 2K candidates of cand (B, R*V) (by ``tier`` first, then score); the best
        K that do not end go on. Returns the kept scores (B, K) (-inf for a dead slot), their
        indices (B, K) in R*V, and the top scores and indices (B, C) for :meth:`_finish`."""
        C = min(2 * self.K, cand.shape[1])
        if tier is None:
            top, idx = cand.topk(C, dim=1)  # (B, C)
        else:  # tiers far apart, scores within a tier; -inf stays last
            key = torch.where(torch.isfinite(cand), cand.double() + tier.double() * _TIER, cand.double())  # (B, R*V)
            idx = key.topk(C, dim=1).indices  # (B, C)
            top = cand.gather(1, idx)
        rank = torch.arange(top.shape[1], device=cand.device)
        is_end = (idx % V) == END_ID
        keep = torch.argsort(is_end.long() * top.shape[1] + rank, dim=1)[:, : self.K]  # (B, K) best non-<end>
        scores = top.gather(1, keep).masked_fill(is_end.gather(1, keep), float("-inf"))  # (B, K)
        return scores, idx.gather(1, keep), top, idx

    def _finish(self, pick, true: torch.Tensor, alpha: torch.Tensor, R: int, V: int) -> None:
        """Set aside the satisfied captions that end among their bank's top K candidates."""
        _, _, top, idx = pick
        rank = torch.arange(top.shape[1], device=top.device)
        fin = ((idx % V) == END_ID) & (rank < self.K) & torch.isfinite(top)  # (B, C)
        need = self.K if self.options.alternatives else 1
        for b, j in fin.nonzero().tolist():
            c = int(idx[b, j])
            r = b * R + c // V
            seq = self.tokens[r].tolist() + [END_ID]
            maps = torch.cat([self.alphas[r], alpha[r : r + 1].to(self.alphas.dtype)], 0)  # (T, L)
            self.finished[b].append((normalised(float(top[b, j]), len(seq), self.options.length_penalty),
                                     Hypothesis(seq, float(true[b, c]), maps, True)))
            norms = sorted((s for s, _ in self.finished[b]), reverse=True)
            self.best_finished[b] = norms[need - 1] if len(norms) >= need else float("-inf")

    def done(self) -> bool:
        """Whether no live beam (of either state) can still beat each image's best finished caption."""
        bound = self.scores.max(1).values / self.options.max_len**self.options.length_penalty  # (B,)
        return bool((self.best_finished >= bound).all())

    def best(self, b: int) -> Hypothesis | None:
        """Image b's best satisfied caption (finished, or live at the length cap), with runners-up
        when ``options.alternatives``; None when there is none."""
        options, R = self.options, self.scores.shape[1]
        pool = list(self.finished[b])
        if self.tokens.shape[1] == options.max_len:  # live captions count only at the cap
            for k in range(R):
                s = float(self.scores[b, k])
                if bool(self.sat[b, k]) and math.isfinite(s):
                    hyp = Hypothesis(self.tokens[b * R + k].tolist(), float(self.logps[b, k]), self.alphas[b * R + k], False)
                    pool.append((normalised(s, len(hyp.tokens), options.length_penalty), hyp))
        if not pool:
            return None
        pool.sort(key=lambda pair: pair[0], reverse=True)
        if not options.alternatives:
            return pool[0][1]
        return dataclasses.replace(pool[0][1], others=tuple(h for _, h in pool[1 : options.beam_size]))
