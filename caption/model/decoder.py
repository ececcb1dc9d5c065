"""LSTM decoder with soft attention (Xu et al. 2015), built around one ``step``.

``prepare`` projects the image keys once, ``init_state`` sets h0/c0 from the mean feature (or
from a query-free attention pool over the grid, ``model.init_state=attend``, or zeros), and
``step`` emits one word: attend with h_{t-1}, gate the context with β(h_{t-1}), feed
[embedding; context] to the LSTMCell, and score the vocabulary. ``step`` is three parts:
``word_input`` (the previous word's embedding and gate input), ``_advance`` (attention and the
recurrence) and ``readout`` (the vocabulary scores). Greedy and beam search call ``step``;
teacher forcing (``forward``) calls the same three parts, batched over the words.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from caption.config import ConfigError, ModelConfig
from caption.model.attention import AttentionPool, Memory, SoftAttention
from caption.model.ops.deferred import DeferredLinear
from caption.model.ops.linear import Linear
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
    cells: torch.Tensor | None = None  # (B, T) the cell each word read (hard attention, blend "sample"), 0 at padding

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
    recurrence, so teacher forcing runs them once for all words; only ``_advance`` runs per
    word. ``step`` is ``word_input`` + ``_advance`` + ``readout`` for one word.
    """

    def __init__(self, vocab_size: int, feature_dim: int, cfg: ModelConfig):
        super().__init__()
        E, H, D = cfg.embed_dim, cfg.hidden_dim, feature_dim
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, E)
        self.attention = SoftAttention(cfg.attention, H, D, cfg.attention_dim)
        if cfg.blend not in ("soft", "hard"):
            raise ConfigError(f"model.blend must be 'soft' or 'hard', got '{cfg.blend}'")
        self.hard = cfg.blend == "hard"
        if cfg.init_state not in ("mean", "attend", "zeros"):
            raise ConfigError(f"model.init_state must be 'mean', 'attend' or 'zeros', got '{cfg.init_state}'")
        self.hidden_dim = H
        self.pool = AttentionPool(D, cfg.attention_dim) if cfg.init_state == "attend" else None
        self.init_h = Linear(D, H) if cfg.init_state != "zeros" else None
        self.init_c = Linear(D, H) if cfg.init_state != "zeros" else None
        gates = {"scalar": lambda: Linear(H, 1), "vector": lambda: Linear(H, D), "none": lambda: None}
        if cfg.gate not in gates:
            raise ConfigError(f"model.gate must be one of {', '.join(gates)}, got '{cfg.gate}'")
        self.gate = gates[cfg.gate]()
        self.lstm_word = Linear(E, 4 * H)  # LSTM gates from the previous word
        self.lstm_rec = DeferredLinear(D + H, 4 * H, bias=False)  # ... from [context; h_{t-1}]
        self.dropout = nn.Dropout(cfg.dropout)
        self.deep_output = cfg.deep_output
        if cfg.deep_output:  # L_o(E y_{t-1} + L_h h_t + L_z z_t)
            self.out_h = Linear(H, E)
            self.out_z = Linear(D, E)
            self.out = Linear(E, vocab_size)
        else:
            self.out = Linear(H, vocab_size)

    def prepare(self, features: torch.Tensor, mask: torch.Tensor | None = None, blend: str | None = None) -> Memory:
        """features (B, L, D) -> Memory; the keys (and the attention pool, if any) once per image.

        ``blend`` is how a hard-attention decoder (``model.blend=hard``) reads the cells: "sample"
        (training), "argmax" or "expect" (None); a soft one always blends them ("expect").
        """
        memory = self.attention.prepare(features, mask, blend=(blend or "expect") if self.hard else "expect")
        if self.pool is None:
            return memory
        pooled, alpha = self.pool(features, mask)  # (B, D), (B, L)
        return dataclasses.replace(memory, pooled=pooled, pool_alpha=alpha)

    def init_state(self, memory: Memory, beams: int = 1) -> DecoderState:
        """h0, c0 from the mean feature, the attention pool's summary or zeros (``model.init_state``);
        ``beams`` consecutive copies per image -> (B*K, H)."""
        if self.init_h is None:
            zeros = memory.mean.new_zeros(memory.mean.shape[0] * beams, self.hidden_dim)  # (B*K, H)
            return DecoderState(zeros, zeros)
        summary = memory.mean if self.pool is None else memory.pooled  # (B, D)
        h, c = self.init_h(summary), self.init_c(summary)  # (B, H)
        if beams > 1:
            h, c = h.repeat_interleave(beams, 0), c.repeat_interleave(beams, 0)  # (B*K, H)
        return DecoderState(h, c)

    def word_input(self, words: torch.Tensor) -> WordInput:
        """words (...) -> embedding (..., E) and gate contribution (..., 4H)."""
        emb = self.embed(words)
        return WordInput(emb, self.lstm_word(emb))

    def _advance(self, word: WordInput, state: DecoderState, memory: Memory):
        """Attend with h_{t-1}, gate the context with β, run the LSTM cell on N rows.

        word (N, E), (N, 4H); state (N, H) each -> new state, context (N, D), alpha (N, L), and
        the cell read (N,) (hard attention) or None.
        """
        context, alpha, cell = self.attention(state.h, memory)  # (N, D), (N, L), (N,) or None
        if self.gate is not None:
            context = torch.sigmoid(self.gate(state.h)) * context  # β: (N, 1) or (N, D)
        gates = word.gates + self.lstm_rec(torch.cat([context, state.h], dim=1))  # (N, 4H)
        i, f, g, o = gates.chunk(4, dim=1)  # (N, H) each
        c = torch.sigmoid(f) * state.c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return DecoderState(h, c), context, alpha, cell

    def readout(self, emb: torch.Tensor, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Vocabulary scores (..., V) from y_{t-1} (..., E), h_t (..., H), z_t (..., D)."""
        if self.deep_output:
            return self.out(self.dropout(emb + self.out_h(h) + self.out_z(context)))
        return self.out(self.dropout(h))

    def step(self, prev_word: torch.Tensor, state: DecoderState, memory: Memory) -> StepOutput:
        """One word for N = B*K rows: prev_word (N,) -> logits (N, V), new state, and the map the word
        used (N, L): alpha, or the one-hot map of the cell a hard-attention decoder read."""
        word = self.word_input(prev_word)
        state, context, alpha, cell = self._advance(word, state, memory)
        if cell is not None:
            alpha = F.one_hot(cell, alpha.shape[1]).to(alpha.dtype)  # (N, L)
        return StepOutput(self.readout(word.emb, state.h, context), state, alpha)

    def forward(
        self, features: torch.Tensor, captions: torch.Tensor, feature_mask: torch.Tensor | None = None,
        blend: str | None = None,
    ) -> DecoderOutput:
        """Teacher forcing: captions (B, T+1) = <start> w1 .. <end> <pad>..; padding trails.
        ``blend`` as in :meth:`prepare` (a hard-attention decoder's cells: "sample", "argmax", "expect").

        Calls ``word_input`` once on all B x T input words, ``_advance`` once per word position t
        on the captions that still have word t (rows sorted longest first, so those are a prefix:
        ``_pack``), and ``readout`` once on the real (non-padding) words, gathered back into the
        caller's order (``targets[mask]``). The attention maps come back as (B, T, L) with zeros
        at padding. tests/test_decoder.py checks logits, maps and gradients against a word-by-word
        loop over ``step``.
        """
        inputs, targets = captions[:, :-1], captions[:, 1:]  # (B, T)
        mask = targets != PAD_ID  # (B, T)
        pack = _pack(mask)
        if not pack.running:
            raise ValueError("teacher forcing needs at least one word to predict (captions hold only <start>/<pad>)")
        if pack.reordered:  # a batch already longest first is not copied
            features = features[pack.order]  # (B, L, D)
            feature_mask = None if feature_mask is None else feature_mask[pack.order]  # (B, L)
        memory = self.prepare(features, feature_mask, blend)
        words = self.word_input(inputs[pack.order])  # (B, T, E), (B, T, 4H): all words at once, sorted rows
        hs, contexts, alphas, cells = self._unroll(words, self.init_state(memory), memory, pack.running)  # time-major
        rows, src = pack.sorted_rows(), pack.stacked_rows()  # (N,), (N,)
        word_logits = self.readout(words.emb[rows, pack.t], hs[src], contexts[src])  # (N, V)
        alpha = alphas[src]  # (N, L)
        alphas_out = alpha.new_zeros(*mask.shape, alpha.shape[1]).index_put((pack.b, pack.t), alpha)  # (B, T, L)
        if cells is not None:
            cells = cells.new_zeros(mask.shape).index_put((pack.b, pack.t), cells[src])  # (B, T)
        return DecoderOutput(word_logits, alphas_out, targets, mask, cells)

    def _unroll(self, words: WordInput, state: DecoderState, memory: Memory, running: list[int]):
        """``_advance`` word by word on the first running[t] rows -> h, context, alpha stacked time-major.

        words (B, T, E), (B, T, 4H) in sorted row order -> h (N', H), context (N', D), alpha (N', L)
        and the cells read (N',) (hard attention) or None, with N' = sum(running); the recurrent
        weight's gradient is formed once for all words (``DeferredLinear``).
        """
        hs, contexts, alphas, cells = [], [], [], []
        with self.lstm_rec.deferred():
            # unbind, then slice each word: indexing [:n, t] would zero-fill a (B, T, 4H) gradient per word
            for n, emb, gates in zip(running, words.emb.unbind(1), words.gates.unbind(1)):  # (B, E), (B, 4H)
                if n < len(state.h):  # captions that ended drop out of the batch
                    state, memory = state.index(slice(0, n)), memory.index(slice(0, n))  # (n, ...) rows
                word = WordInput(emb[:n], gates[:n])  # (n, E), (n, 4H)
                state, context, alpha, cell = self._advance(word, state, memory)
                hs.append(state.h)  # (n, H)
                contexts.append(context)  # (n, D)
                alphas.append(alpha)  # (n, L)
                cells.append(cell)  # (n,) or None
        read = torch.cat(cells) if cells[0] is not None else None  # (N',)
        return torch.cat(hs), torch.cat(contexts), torch.cat(alphas), read  # (N', H), (N', D), (N', L)


class _Packing(NamedTuple):
    """Teacher forcing's row layout: captions sorted longest first, words stacked time-major.

    Sorted row r holds caption order[r], and caption b sits at sorted row rank[b]. Word t runs on
    the first running[t] sorted rows, so in the time-major stacks of all words the real word
    (b, t) is row offset[t] + rank[b], offset[t] = running[0] + .. + running[t-1].
    """

    order: torch.Tensor  # (B,) caption at each sorted row, longest first
    rank: torch.Tensor  # (B,) sorted row of each caption (the inverse of order)
    reordered: bool  # False when the batch is already longest first (order is the identity)
    running: list[int]  # (T',) captions that still have word t, for each t with any
    b: torch.Tensor  # (N,) caption of each real word, in targets[mask] order
    t: torch.Tensor  # (N,) position of each real word, in targets[mask] order

    def sorted_rows(self) -> torch.Tensor:
        """(N,) sorted row of each real word's caption."""
        return self.rank[self.b]  # (N,)

    def stacked_rows(self) -> torch.Tensor:
        """(N,) row of each real word in the time-major stacks that ``_unroll`` returns."""
        offset = torch.tensor([0] + self.running[:-1], device=self.rank.device).cumsum(0)  # (T',)
        return offset[self.t] + self.rank[self.b]  # (N,)


def _pack(mask: torch.Tensor) -> _Packing:
    """The row layout for a (B, T) mask of real targets whose padding trails."""
    lengths = mask.sum(1)  # (B,)
    order = lengths.argsort(descending=True, stable=True)  # (B,) longest caption first
    rows = torch.arange(len(order), device=order.device)  # (B,)
    rank = torch.empty_like(order).scatter_(0, order, rows)  # (B,) inverse of order
    running = [n for n in mask.sum(0).tolist() if n > 0]  # (T',)
    b, t = mask.nonzero(as_tuple=True)  # (N,) each, in targets[mask] order
    return _Packing(order, rank, bool((lengths[1:] > lengths[:-1]).any()), running, b, t)
