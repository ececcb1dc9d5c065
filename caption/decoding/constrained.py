"""Constrained beam search (Anderson et al. 2017): every caption must say one of a set of phrases.

Each image has a :class:`Constraint`: a disjunction of phrases (token-id sequences: "cat", "cats",
"hot dog") that may start only where the model expects a noun (the probability of ``slot_words``
at that step is at least ``slot_mass``: "a ___", "a brown ___", not "two dogs are ___"), and, when
``within`` is set, only among the caption's first ``within`` words (the object as the subject).
``penalty`` is taken off the ranking score of every word of ``penalized`` emitted (people, say);
with ``stop`` the caption ends right after the phrase ("a small lizard").

The beams are two banks of the beam core (:class:`caption.decoding.core.Beams`): the *free* bank
holds captions that have begun no phrase, the *held* bank those that say one or are in the middle
of one, so captions that already hold the phrase are never crowded out by those that do not.
:func:`_rules` holds the language rules: which candidate may enter which bank, and the order of the
held bank. All images and their 2K beams are one (B*2K)-row batch through the decoder's ``step``,
the keys projected once per image, as in :mod:`caption.decoding.beam`. Only captions that say a
phrase can be the result (finished ones, and at ``max_len`` the live ones), ranked by
``(log_prob - penalties) / len**length_penalty``; the result reports the model's own
log-probability. An image without such a caption gets ``None`` (the caller falls back).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from caption.config import DecodeConfig
from caption.decoding.core import Beams
from caption.decoding.results import Hypothesis
from caption.decoding.rules import log_probs
from caption.vocab import END_ID

_NONE = -1  # a token before the caption's start (matches no phrase word)
_ANY = -2  # an unused slot of a right-aligned phrase prefix (matches any token)
_NEVER = 10**9  # "no deadline"


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
    stop: bool = False  # the caption ends with the phrase's noun phrase: "a small lizard"

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
        ends = [i + len(p) for k, p in enumerate(self.phrases) for i in range(min(self.within or len(tokens), len(tokens)))
                if tokens[i : i + len(p)] == list(p) and (slots is None or slots[i])
                and not (k < len(self.not_after) and set(_lead(tokens, slots, i)) & set(self.not_after[k]))]
        if not ends:
            return False
        first = min(ends)
        if not self.end_phrase or first >= len(tokens):
            return True
        noun_next = slots is not None and self.slot_mass > 0 and first + 1 < len(tokens) and slots[first + 1]
        return tokens[first] not in self.slot_words and not noun_next


def _lead(tokens: Sequence[int], slots: Sequence[bool] | None, i: int) -> list[int]:
    """The words that lead into position i's noun phrase: back to the last word not said where the
    model expected a noun (``slots``; None: the word right before i alone), so "two young" leads
    into "gibbon", and "of" into "vehicles" in "a group of vehicles"."""
    j = i - 1
    while slots is not None and j > 0 and slots[j]:
        j -= 1
    return list(tokens[max(j, 0) : i])


def _leads(tokens: torch.Tensor, slots: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """(N, P, t) bool: which of each row's tokens (N, t) lead into a phrase starting at start (N, P)
    (:func:`_lead`), given the noun slots (N, t+1)."""
    t = tokens.shape[1]
    at = torch.arange(t, device=tokens.device)
    last = torch.where(slots[:, :t], -1, at.expand(tokens.shape[0], t)).cummax(1).values  # (N, t) last non-slot up to j
    j = last.gather(1, (start - 1).clamp(0, t - 1)).clamp(min=0)  # (N, P) where the lead begins
    return (at >= j.unsqueeze(-1)) & (at < start.unsqueeze(-1))  # (N, P, t)


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
        self.stop = torch.tensor([c.stop for c in constraints], device=device)  # (B,)
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
            blocked = (tokens.unsqueeze(1).unsqueeze(-1) == self.not_after[image].unsqueeze(2)).any(-1)  # (N, P, t)
            ok &= ~(blocked & _leads(tokens, slots, start)).any(-1)  # no word leading into it rules it out
        hits = torch.zeros((N, V), dtype=torch.long, device=tokens.device)  # (N, V)
        hits.scatter_add_(1, word[image], ok.long())
        return hits > 0

    def can_still_start(self, t: int, image: torch.Tensor) -> torch.Tensor:
        """(N,) bool: whether a caption of t+1 words may still start a phrase in time."""
        return (t + 1) < self.within[image]


@dataclass(frozen=True)
class _Progress:
    """Where each row's caption stands with its image's phrases (R rows per image, the free bank's
    first, then the held bank's)."""

    says: torch.Tensor  # (B, R) bool, the caption says a phrase
    midway: torch.Tensor  # (B, R) bool, the caption is in the middle of a phrase (held bank, not said yet)
    since: torch.Tensor  # (B, R) long, words since the phrase was said, -1: not said
    slots: torch.Tensor  # (B*R, t) bool, the positions where the model expected a noun

    @staticmethod
    def start(constraints: Sequence[Constraint], device: torch.device) -> "_Progress":
        """Before the first word (R = 1): a constraint without phrases is said from the start."""
        says = torch.tensor([[not c.phrases] for c in constraints], device=device)  # (B, 1)
        return _Progress(says, torch.zeros_like(says), torch.full(says.shape, -1, device=device),
                         torch.empty((len(constraints), 0), dtype=torch.bool, device=device))

    def follow(self, moves: "_Moves", held: torch.Tensor, rows: torch.Tensor) -> "_Progress":
        """The new rows' progress: the free bank's K have said nothing; the held bank's K are the
        candidates at ``held`` (B, K) in R*V; ``rows`` (B*2K,) are the rows they continue."""
        B, R, V = moves.says.shape
        said = moves.says.view(B, R * V).gather(1, held)  # (B, K) said, else in the middle of one
        said_now = (moves.says & ~self.says.unsqueeze(-1)).view(B, R * V).gather(1, held)  # (B, K) with this word
        since = torch.where(self.since >= 0, self.since + 1, -1).gather(1, held // V)  # (B, K) floor division
        since = torch.where(said_now, 0, since)
        nothing = torch.zeros_like(said)
        return _Progress(torch.cat([nothing, said], 1), torch.cat([nothing, ~said], 1),  # (B, 2K) each
                         torch.cat([torch.full_like(since, -1), since], 1), moves.slots[rows])  # (B, 2K), (B*2K, t+1)


@dataclass(frozen=True)
class _Moves:
    """Where each candidate (a row's caption and one more word) may go, each (B, R, V)."""

    free: torch.Tensor  # bool, into the free bank: it begins no phrase, and one may still begin in time
    held: torch.Tensor  # bool, into the held bank: it says a phrase (and may end), or takes one a word further
    says: torch.Tensor  # bool, the caption says a phrase with this word or before
    tier: torch.Tensor  # long, the held bank's order: 2 says a phrase, 1 takes a begun one further, 0 begins one
    slots: torch.Tensor  # (B*R, t+1) bool, the noun slots so far, the next word's position included


def _rules(phrases: _Phrases, progress: _Progress, t: int, logp: torch.Tensor, tokens: torch.Tensor,
           image: torch.Tensor) -> _Moves:
    """The language rules at step ``t`` for every candidate, from the step's log-probabilities
    logp (B*R, V), the captions so far tokens (B*R, t) and each row's image (B*R,)."""
    B, R = progress.says.shape
    V = logp.shape[1]
    slots = torch.cat([progress.slots, phrases.slots(logp, image).unsqueeze(1)], 1)  # (B*R, t+1)
    completes = phrases.completes(tokens, slots, image, V).view(B, R, V)  # the word completes a phrase
    extends = phrases.extends(tokens, slots, image, V).view(B, R, V) & ~completes  # it begins or continues one
    said, midway = progress.says.unsqueeze(-1), progress.midway.unsqueeze(-1)  # (B, R, 1) each
    says = said | completes  # (B, R, V)
    held = says | (extends & ~said)  # a caption in the middle of a phrase may do nothing else
    free = ~said & ~midway & ~completes & phrases.can_still_start(t, image).view(B, R, 1)
    held[..., END_ID] &= says[..., END_ID]  # only a caption that says a phrase may end
    ends_noun = phrases.end_phrase[image].view(B, R)  # (B, R) the phrase must end its noun phrase
    just_said = ((progress.since == 0) & ends_noun).unsqueeze(-1)  # (B, R, 1) no noun right after it
    held &= ~(just_said & (phrases.slot_words[image].view(B, R, V) > 0))
    noun = slots[:, -1] & (phrases.slot_mass[image] > 0)  # (B*R,) a noun expected now (slot_mass 0: never)
    later = (progress.since == 1) & ends_noun & noun.view(B, R)  # (B, R) a noun expected one word after it
    held &= ~later.unsqueeze(-1)  # "a frog brown ___": that word began another noun phrase
    stop = ((progress.since == 0) & phrases.stop[image].view(B, R)).unsqueeze(-1)  # (B, R, 1) the phrase was just said
    held &= ~stop | (torch.arange(V, device=logp.device) == END_ID)  # with ``stop``: only <end> may follow it
    # the held bank keeps captions that say a phrase first, then those furthest into one, then fresh starts:
    # a phrase's later words cost log-probability, and fresh starts would crowd out those under way
    tier = says.long() * 2 + (extends & midway).long()  # (B, R, V)
    return _Moves(free, held, says, tier, slots)


def constrained_beam_search(decoder: nn.Module, features: torch.Tensor, options: DecodeConfig,
                            constraints: Sequence[Constraint], mask=None) -> list[Hypothesis | None]:
    """The best caption that satisfies its image's constraint, for each image of features (B, L, D)
    (None where none did within ``max_len``); K = ``options.beam_size`` beams per bank. Before the
    first word one row per image runs (R = 1); from then on R = 2K rows per image."""
    B, device = features.shape[0], features.device
    if len(constraints) != B:
        raise ValueError(f"{len(constraints)} constraints for {B} images")
    memory = decoder.prepare(features, mask)  # keys once per image, shared by its beams
    state = decoder.init_state(memory)  # (B*R, H), R = 1
    beams = Beams(B, options, memory.values.shape[1], device)
    progress, phrases = _Progress.start(constraints, device), None
    for t in range(options.max_len):
        out = decoder.step(beams.prev, state, memory)
        logp = log_probs(out.logits, t, options, beams.tokens)  # (B*R, V)
        if phrases is None:
            phrases = _Phrases(constraints, logp.shape[1], device)
        image = torch.arange(B, device=device).repeat_interleave(beams.scores.shape[1])  # (B*R,)
        moves = _rules(phrases, progress, t, logp, beams.tokens, image)
        own = logp.view(moves.says.shape) + beams.log_probs.unsqueeze(-1)  # (B, R, V) the model's log-probabilities
        ranked = beams.candidates(logp + phrases.bias[image])  # (B, R, V) penalties taken off
        free = beams.top(ranked.masked_fill(~moves.free, float("-inf")))
        held = beams.top(ranked.masked_fill(~moves.held, float("-inf")), moves.tier, tiers=3)
        beams.finish(held, out.alpha, own)
        rows = beams.advance([free, held], out.alpha, own)
        progress = progress.follow(moves, held.kept, rows)
        state = out.state.index(rows)
        if beams.done():
            break
    return beams.results(memory, eligible=progress.says)
