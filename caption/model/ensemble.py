"""Several decoders over one encoder's features, decoded as one: an ensemble.

:class:`EnsembleDecoder` has the decoder interface every search uses (``prepare``,
``init_state``, ``step``), so greedy search, beam search and sampling run an ensemble unchanged.
Each member runs its own ``step``; the ensemble's next-word scores are the mean of the members'
log-probabilities (:func:`mean_log_probs`, a log-linear ensemble: the searches' log-softmax then
renormalises their geometric mean) and its attention map is the mean of the members' maps.
Distillation's teachers give their next-word distribution through the same function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from caption.model.attention import Memory
from caption.model.decoder import AttentionDecoder, DecoderState, StepOutput


def mean_log_probs(member_logits: Sequence[torch.Tensor], renormalise: bool = False) -> torch.Tensor:
    """Each member's (N, V) next-word logits -> the mean of their log-probabilities (N, V), in float32.

    The searches take the log-softmax of whatever a decoder's step returns, so the ensemble's step
    leaves the mean as it is; ``renormalise`` takes that log-softmax here, for callers that want the
    ensemble's distribution itself (a teacher's targets in distillation).
    """
    logp = torch.stack([torch.log_softmax(x.float(), dim=-1) for x in member_logits]).mean(0)  # (N, V)
    return torch.log_softmax(logp, dim=-1) if renormalise else logp  # (N, V)


@dataclass(frozen=True)
class EnsembleMemory:
    """Each member's :class:`Memory` of the same images."""

    members: tuple[Memory, ...]

    @property
    def values(self) -> torch.Tensor:
        return self.members[0].values  # (B, L, D): the features all members read

    @property
    def pool_alpha(self) -> torch.Tensor | None:
        """(B, L) the mean of the members' query-free pool weights, None when no member has a pool."""
        pools = [m.pool_alpha for m in self.members if m.pool_alpha is not None]
        return torch.stack(pools).mean(0) if pools else None

    def index(self, idx: torch.Tensor | slice) -> "EnsembleMemory":
        return EnsembleMemory(tuple(m.index(idx) for m in self.members))


@dataclass(frozen=True)
class EnsembleState:
    """Each member's :class:`DecoderState` of the same N rows."""

    members: tuple[DecoderState, ...]

    def index(self, idx: torch.Tensor | slice) -> "EnsembleState":
        return EnsembleState(tuple(s.index(idx) for s in self.members))


class EnsembleDecoder(nn.Module):
    """Decoders of one vocabulary over one encoder's features, stepped together."""

    def __init__(self, members: Sequence[AttentionDecoder]):
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two decoders")
        sizes = {m.vocab_size for m in members}
        if len(sizes) != 1:
            raise ValueError(f"ensemble members must share one vocabulary, got sizes {sorted(sizes)}")
        self.members = nn.ModuleList(members)
        self.vocab_size = members[0].vocab_size

    def prepare(self, features: torch.Tensor, mask: torch.Tensor | None = None,
                blend: str | None = None) -> EnsembleMemory:
        """features (B, L, D) -> every member's Memory (its own keys, once per image; ``blend`` for
        hard-attention members)."""
        return EnsembleMemory(tuple(m.prepare(features, mask, blend) for m in self.members))

    def init_state(self, memory: EnsembleMemory, beams: int = 1) -> EnsembleState:
        return EnsembleState(tuple(m.init_state(mem, beams) for m, mem in zip(self.members, memory.members)))

    def step(self, prev_word: torch.Tensor, state: EnsembleState, memory: EnsembleMemory) -> StepOutput:
        """prev_word (N,) -> the members' mean log-probabilities (N, V) as logits, their states, mean alpha (N, L)."""
        outs = [m.step(prev_word, s, mem) for m, s, mem in zip(self.members, state.members, memory.members)]
        logp = mean_log_probs([o.logits for o in outs])  # (N, V)
        alpha = torch.stack([o.alpha.float() for o in outs]).mean(0)  # (N, L)
        return StepOutput(logp, EnsembleState(tuple(o.state for o in outs)), alpha)
