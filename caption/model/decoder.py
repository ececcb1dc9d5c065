"""LSTM decoder with soft attention (Xu et al. 2015), built around one ``step``.

``prepare`` projects the image keys once, ``init_state`` sets h0/c0 from the mean feature, and
``step`` emits one word: attend with h_{t-1}, gate the context with β(h_{t-1}), feed
[embedding; context] to the LSTMCell, and score the vocabulary. Teacher forcing (``forward``),
greedy and beam search all call ``step``; nothing else reaches into the submodules.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from caption.config import ConfigError, ModelConfig
from caption.model.attention import Memory, SoftAttention
from caption.model.deferred import DeferredLinear
from caption.model.linear import Linear
from caption.vocab import PAD_ID


class DecoderState(NamedTuple):
    h: torch.Tensor  # (N, H)
    c: torch.Tensor  # (N, H)

    def index(self, idx: torch.Tensor | slice) -> "DecoderState":
        """Rows ``idx`` of the state (beam reordering; a slice gives views)."""
        return DecoderState(self.h[idx], self.c[idx])


class StepOutput(NamedTuple):
    logits: torch.Tensor  # (N, V), unnormalised scores of the next word
    state: DecoderState
    alpha: torch.Tensor  # (N, L), attention weights used for this word


class DecoderOutput(NamedTuple):
    word_logits: torch.Tensor  # (N, V), the real (non-padding) targets only, in ``targets[mask]`` order
    alphas: torch.Tensor  # (B, T, L), zero at padding
    targets: torch.Tensor  # (B, T), the words to predict
    mask: torch.Tensor  # (B, T) bool, True on real (non-padding) targets

    @property
    def logits(self) -> torch.Tensor:
        """(B, T, V) with zero logits at padding: for inspection; the loss reads ``word_logits``."""
        (B, T), V = self.mask.shape, self.word_logits.shape[-1]
        return self.word_logits.new_zeros(B, T, V).masked_scatter_(self.mask.unsqueeze(-1), self.word_logits)


class WordInput(NamedTuple):
    emb: torch.Tensor  # (..., E), embedding of the previous word
    gates: torch.Tensor  # (..., 4H), its contribution to the LSTM gates


class AttentionDecoder(nn.Module):
    """Show-Attend-Tell decoder over features (B, L, D) with vocabulary size V.

    The LSTM cell is written out so that its input weights split by source: the previous
    word's part (``word_input``) and the output layer (``readout``) do not depend on the
    recurrence, so teacher forcing runs them once for all T words; only ``_advance`` runs per
    word. ``step`` is exactly ``word_input`` + ``_advance`` + ``readout`` for one word.
    """

    def __init__(self, vocab_size: int, feature_dim: int, cfg: ModelConfig):
        super().__init__()
        E, H, D = cfg.embed_dim, cfg.hidden_dim, feature_dim
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, E)
        self.attention = SoftAttention(cfg.attention, H, D, cfg.attention_dim)
        if cfg.init_state not in ("mean", "zeros"):
            raise ConfigError(f"model.init_state must be 'mean' or 'zeros', got '{cfg.init_state}'")
        self.hidden_dim = H
        self.init_h = Linear(D, H) if cfg.init_state == "mean" else None
        self.init_c = Linear(D, H) if cfg.init_state == "mean" else None
        gates = {"scalar": lambda: Linear(H, 1), "vector": lambda: Linear(H, D), "none": lambda: None}
        if cfg.gate not in gates:
            raise ConfigError(f"model.gate must be one of {', '.join(gates)}, got '{cfg.gate}'")
        self.gate = gates[cfg.gate]()
        self.lstm_word = Linear(E, 4 * H)  # LSTM gates from the previous word
        self.lstm_rec = Linear(D + H, 4 * H, bias=False)  # ... from [context; h_{t-1}]
        self.dropout = nn.Dropout(cfg.dropout)
        self.deep_output = cfg.deep_output
        if cfg.deep_output:  # L_o(E y_{t-1} + L_h h_t + L_z z_t)
            self.out_h = Linear(H, E)
            self.out_z = Linear(D, E)
            self.out = Linear(E, vocab_size)
        else:
            self.out = Linear(H, vocab_size)

    def prepare(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> Memory:
        """features (B, L, D) -> Memory; the keys are projected here, once per image."""
        return self.attention.prepare(features, mask)

    def init_state(self, memory: Memory, beams: int = 1) -> DecoderState:
        """h0, c0 from the mean feature (or zeros); ``beams`` consecutive copies per image -> (B*K, H)."""
        if self.init_h is None:
            zeros = memory.mean.new_zeros(memory.mean.shape[0] * beams, self.hidden_dim)  # (B*K, H)
            return DecoderState(zeros, zeros)
        h, c = self.init_h(memory.mean), self.init_c(memory.mean)  # (B, H)
        if beams > 1:
            h, c = h.repeat_interleave(beams, 0), c.repeat_interleave(beams, 0)  # (B*K, H)
        return DecoderState(h, c)

    def word_input(self, words: torch.Tensor) -> WordInput:
        """words (...) -> embedding (..., E) and gate contribution (..., 4H)."""
        emb = self.embed(words)
        return WordInput(emb, self.lstm_word(emb))

    def _advance(self, word: WordInput, state: DecoderState, memory: Memory, rec=None):
        """Attend with h_{t-1}, gate the context with β, run the LSTM cell: (N, ...) rows.

        ``rec`` computes [context; h] @ W_rec^T (default: ``lstm_rec``; teacher forcing passes a
        DeferredLinear over the same weight).
        """
        context, alpha = self.attention(state.h, memory)  # (N, D), (N, L)
        if self.gate is not None:
            context = torch.sigmoid(self.gate(state.h)) * context  # β: (N, 1) or (N, D)
        rec = self.lstm_rec if rec is None else rec
        gates = word.gates + rec(torch.cat([context, state.h], dim=1))  # (N, 4H)
        i, f, g, o = gates.chunk(4, dim=1)  # (N, H) each
        c = torch.sigmoid(f) * state.c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return DecoderState(h, c), context, alpha

    def readout(self, emb: torch.Tensor, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Vocabulary scores (..., V) from y_{t-1} (..., E), h_t (..., H), z_t (..., D)."""
        if self.deep_output:
            return self.out(self.dropout(emb + self.out_h(h) + self.out_z(context)))
        return self.out(self.dropout(h))

    def step(self, prev_word: torch.Tensor, state: DecoderState, memory: Memory) -> StepOutput:
        """One word for N = B*K rows: prev_word (N,) -> logits (N, V), new state, alpha (N, L)."""
        word = self.word_input(prev_word)
        state, context, alpha = self._advance(word, state, memory)
        return StepOutput(self.readout(word.emb, state.h, context), state, alpha)

    def forward(
        self, features: torch.Tensor, captions: torch.Tensor, feature_mask: torch.Tensor | None = None
    ) -> DecoderOutput:
        """Teacher forcing: captions (B, T+1) = <start> w1 .. <end> <pad>..; padding trails.

        Same result as calling ``step`` T times on the real (unpadded) words. A word runs only
        for the captions that still have it: internally the rows are ordered longest first, so
        those are a prefix of the batch. Only the real words reach the output layer, and they
        come back in the caller's order (``targets[mask]``); the attention maps come back as
        (B, T, L) with zeros at padding.
        """
        inputs, targets = captions[:, :-1], captions[:, 1:]  # (B, T)
        mask = targets != PAD_ID  # (B, T)
        lengths = mask.sum(1)  # (B,)
        order = lengths.argsort(descending=True, stable=True)  # (B,), longest caption first
        if bool((lengths[1:] > lengths[:-1]).any()):  # reorder; a batch already longest first is not copied
            features = features[order]
            feature_mask = None if feature_mask is None else feature_mask[order]
        memory = self.prepare(features, feature_mask)
        state = self.init_state(memory)
        words = self.word_input(inputs[order])  # (B, T, E), (B, T, 4H): all words at once
        running = [n for n in mask[order].sum(0).tolist() if n > 0]  # rows that still have word t, for each t
        if not running:
            raise ValueError("teacher forcing needs at least one word to predict (captions hold only <start>/<pad>)")
        rec = DeferredLinear(self.lstm_rec.weight)  # one weight-gradient GEMM for all T words
        hs, contexts, alphas = [], [], []
        # unbind, then slice each word: indexing [:n, t] would zero-fill a (B, T, 4H) gradient per word
        for n, emb, gates in zip(running, words.emb.unbind(1), words.gates.unbind(1)):
            if n < len(state.h):  # captions that ended drop out of the batch
                state, memory = state.index(slice(0, n)), memory.index(slice(0, n))
            state, context, alpha = self._advance(WordInput(emb[:n], gates[:n]), state, memory, rec)
            hs.append(state.h)
            contexts.append(context)
            alphas.append(alpha)
        # word (b, t) sits at row offsets[t] + rank[b] of the time-major stacks, rank = sorted position
        b, t = mask.nonzero(as_tuple=True)  # (N,) each, in targets[mask] order
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))  # (B,)
        offsets = torch.tensor([0] + running[:-1], device=order.device).cumsum(0)  # (T',)
        src = offsets[t] + rank[b]  # (N,)
        word_logits = self.readout(words.emb[rank[b], t], torch.cat(hs)[src], torch.cat(contexts)[src])  # (N, V)
        alpha = torch.cat(alphas)[src]  # (N, L)
        alphas_out = alpha.new_zeros(*mask.shape, alpha.shape[1]).index_put((b, t), alpha)  # (B, T, L)
        return DecoderOutput(word_logits, alphas_out, targets, mask)
