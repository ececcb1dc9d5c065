"""Soft attention over the image grid: four scorers behind one registry, one ``SoftAttention``.

Every scorer has the same two halves:

* ``project_keys(features (B, L, D)) -> keys (B, L, A)`` runs once per image (``prepare``),
* ``forward(query (B, H) or (B, K, H), keys (B, L, A)) -> scores (B, L) or (B, K, L)`` runs
  once per word; K is the number of beams per image, so beam search never copies the keys.

``SoftAttention`` owns what is common: masking padded cells, the softmax over L, and blending
the cells with those weights into the context vector (B, D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import nn

from caption.config import ConfigError
from caption.model.linear import Linear, linear

SCORERS: dict[str, type["Scorer"]] = {}


def register_scorer(name: str) -> Callable[[type["Scorer"]], type["Scorer"]]:
    """Class decorator adding a scorer to ``SCORERS`` under ``name`` (``model.attention=name``)."""

    def add(cls: type["Scorer"]) -> type["Scorer"]:
        SCORERS[name] = cls
        return cls

    return add


class Scorer(nn.Module):
    """Base: subclasses implement ``project_keys`` and ``score`` on (B, K, H) queries."""

    def __init__(self, query_dim: int, key_dim: int, attention_dim: int):
        super().__init__()

    def project_keys(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """query (B, K, H), keys (B, L, A) -> (B, K, L)."""
        raise NotImplementedError

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        if query.dim() == 2:
            return self.score(query.unsqueeze(1), keys).squeeze(1)  # (B, L)
        return self.score(query, keys)  # (B, K, L)


class _TanhScores(torch.autograd.Function):
    """v . tanh(k_l + q_k) from doubled keys 2k (B, L, A) and queries 2q (B, K, A), v (A,) -> (B, K, L).

    The (B, K, L, A) intermediate is the largest tensor of a decoding step, and each pass over
    it is memory-bound. Computing it a few images at a time, in one reused buffer, keeps each
    chunk in cache; the backward pass recomputes it instead of storing one per word.
    tanh(y) = 2 sigmoid(2y) - 1, and PyTorch's CPU sigmoid is several times faster than its tanh.
    The tanh-MLP scorers therefore hand over keys and queries already doubled (the keys through
    their weight, once per image), so one plain broadcast ``add`` forms sigmoid's input: the same
    add with ``alpha=2`` was 1.5x slower and, on the benchmark CPU, at times 8x slower.
    """

    @staticmethod
    def _chunk(B: int, K: int, L: int, A: int) -> int:
        return max(1, min(B, (1 << 19) // max(1, K * L * A)))  # ~2 MB of fp32 per chunk

    @staticmethod
    def _sigmoid(keys2: torch.Tensor, query2: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """sigmoid(2k + 2q) for keys2 = 2k (b, L, A), query2 = 2q (b, K, A), into out (b, K, L, A)."""
        return torch.add(keys2.unsqueeze(1), query2.unsqueeze(2), out=out).sigmoid_()

    @staticmethod
    def forward(ctx, keys: torch.Tensor, query2: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        (B, L, A), K = keys.shape, query2.shape[1]
        query2, v_ = query2.to(keys.dtype), v.to(keys.dtype)  # (B, K, A), (A,): one dtype under autocast
        out = keys.new_empty(B, K, L)
        step = _TanhScores._chunk(B, K, L, A)
        buf = keys.new_empty(min(step, B), K, L, A)
        for i in range(0, B, step):
            s = _TanhScores._sigmoid(keys[i : i + step], query2[i : i + step], buf[: min(step, B - i)])
            torch.matmul(s, v_, out=out[i : i + step])  # (b, K, L)
        ctx.save_for_backward(keys, query2, v)
        return out.mul_(2).sub_(v_.sum())  # v . (2 s - 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keys, query2, v = ctx.saved_tensors
        (B, L, A), K = keys.shape, query2.shape[1]
        g_keys, g_query = torch.empty_like(keys), torch.empty_like(query2)
        g_v = torch.zeros_like(v)
        v2 = 2 * v
        step = _TanhScores._chunk(B, K, L, A)
        buf = keys.new_empty(min(step, B), K, L, A)
        for i in range(0, B, step):
            s = _TanhScores._sigmoid(keys[i : i + step], query2[i : i + step], buf[: min(step, B - i)])
            g = grad[i : i + step]  # (b, K, L)
            g_v += 2 * (g.reshape(1, -1) @ s.view(-1, A)).view(-1) - g.sum()  # d/dv of v . (2s - 1)
            # dL/d(2k + 2q) = g v (1 - tanh^2) / 2 = g 2v s (1 - s); with K == 1 it lands in g_keys directly
            pre = s if K > 1 else g_keys[i : i + step].unsqueeze(1)  # (b, K, L, A)
            torch.addcmul(s, s, s, value=-1, out=pre).mul_(g.unsqueeze(-1)).mul_(v2)
            if K > 1:
                torch.sum(pre, 1, out=g_keys[i : i + step])  # (b, L, A)
            torch.sum(pre, 2, out=g_query[i : i + step])  # (b, K, A)
        return g_keys, g_query, g_v


def _doubled(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """2 (x W^T + b), the form ``_TanhScores`` takes; the 2 goes on the weight, not on the (B, L, A) keys."""
    return linear(x, 2 * weight, None if bias is None else 2 * bias)


def _tanh_mlp(keys2: torch.Tensor, query2: torch.Tensor, v: nn.Linear) -> torch.Tensor:
    """v^T tanh(k_i + q) + b from keys2 = 2k (B, L, A), query2 = 2q (B, K, A) -> (B, K, L)."""
    scores = _TanhScores.apply(keys2, query2, v.weight.view(-1))  # (B, K, L)
    return scores if v.bias is None else scores + v.bias


@register_scorer("additive")
class AdditiveScorer(Scorer):
    """Bahdanau: v^T tanh(W_q q + W_k a_i)."""

    def __init__(self, query_dim: int, key_dim: int, attention_dim: int):
        super().__init__(query_dim, key_dim, attention_dim)
        self.w_k = nn.Linear(key_dim, attention_dim)
        self.w_q = nn.Linear(query_dim, attention_dim)
        self.v = nn.Linear(attention_dim, 1, bias=False)  # a bias would cancel in the softmax

    def project_keys(self, features: torch.Tensor) -> torch.Tensor:
        return _doubled(features, self.w_k.weight, self.w_k.bias)  # (B, L, A), doubled for _TanhScores

    def score(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return _tanh_mlp(keys, _doubled(query, self.w_q.weight, self.w_q.bias), self.v)


@register_scorer("concat")
class ConcatScorer(Scorer):
    """Luong concat: v^T tanh(W [a_i; q]), one matrix W split so its key half runs once per image."""

    def __init__(self, query_dim: int, key_dim: int, attention_dim: int):
        super().__init__(query_dim, key_dim, attention_dim)
        self.key_dim = key_dim
        self.w = nn.Linear(key_dim + query_dim, attention_dim)
        self.v = nn.Linear(attention_dim, 1, bias=False)

    def project_keys(self, features: torch.Tensor) -> torch.Tensor:
        return _doubled(features, self.w.weight[:, : self.key_dim])  # (B, L, A), doubled for _TanhScores

    def score(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        q = _doubled(query, self.w.weight[:, self.key_dim :], self.w.bias)  # (B, K, A)
        return _tanh_mlp(keys, q, self.v)


@register_scorer("general")
class GeneralScorer(Scorer):
    """Luong general: q^T W a_i; W maps D -> H, so dim(q) may differ from dim(a)."""

    def __init__(self, query_dim: int, key_dim: int, attention_dim: int):
        super().__init__(query_dim, key_dim, attention_dim)
        self.w = Linear(key_dim, query_dim, bias=False)

    def project_keys(self, features: torch.Tensor) -> torch.Tensor:
        return self.w(features)  # (B, L, H)

    def score(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return torch.bmm(query, keys.transpose(1, 2))  # (B, K, L)


@register_scorer("dot")
class DotScorer(Scorer):
    """Luong dot: q . a_i, parameter-free, scaled by 1/sqrt(D) to keep the softmax soft.

    Needs dim(q) == dim(a); use ``general`` when they differ.
    """

    def __init__(self, query_dim: int, key_dim: int, attention_dim: int):
        super().__init__(query_dim, key_dim, attention_dim)
        if query_dim != key_dim:
            raise ConfigError(
                f"model.attention=dot needs hidden_dim == feature dim (got {query_dim} vs {key_dim}); "
                "set model.hidden_dim to the feature dim or use model.attention=general"
            )
        self.scale = 1.0 / math.sqrt(key_dim)

    def project_keys(self, features: torch.Tensor) -> torch.Tensor:
        return features * self.scale  # (B, L, D)

    def score(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return torch.bmm(query, keys.transpose(1, 2))  # (B, K, L)


def build_scorer(name: str, query_dim: int, key_dim: int, attention_dim: int) -> Scorer:
    if name not in SCORERS:
        raise ConfigError(f"model.attention: unknown scorer '{name}' (choose from {', '.join(sorted(SCORERS))})")
    return SCORERS[name](query_dim, key_dim, attention_dim)


@dataclass(frozen=True)
class Memory:
    """What the decoder attends over, prepared once per image.

    values (B, L, D): the feature grid; keys (B, L, A): projected keys, in the scorer's own form
    (scaled for dot, doubled for the tanh scorers); mask (B, L) bool, True
    for real cells (None: all real); mean (B, D): masked mean feature (initialises the LSTM).
    """

    values: torch.Tensor
    keys: torch.Tensor
    mask: torch.Tensor | None
    mean: torch.Tensor

    def index(self, idx: torch.Tensor | slice) -> "Memory":
        """Memory of the images ``idx`` (B',) picks, e.g. to drop finished images (a slice gives views)."""
        mask = None if self.mask is None else self.mask[idx]
        return Memory(self.values[idx], self.keys[idx], mask, self.mean[idx])


class AttentionOutput(NamedTuple):
    context: torch.Tensor  # (N, D)
    alpha: torch.Tensor  # (N, L), sums to 1 over real cells, 0 on padded cells


class SoftAttention(nn.Module):
    """Key projection (``prepare``), masking, softmax and blending, for any registered scorer."""

    def __init__(self, scorer: str, query_dim: int, key_dim: int, attention_dim: int):
        super().__init__()
        self.scorer = build_scorer(scorer, query_dim, key_dim, attention_dim)

    def prepare(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> Memory:
        """features (B, L, D), mask (B, L) -> Memory with keys projected once."""
        if mask is None:
            mean = features.mean(dim=1)  # (B, D)
        else:
            weights = mask.to(features.dtype).unsqueeze(-1)  # (B, L, 1)
            mean = (features * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, D)
        return Memory(features, self.scorer.project_keys(features), mask, mean)

    def forward(self, query: torch.Tensor, memory: Memory) -> AttentionOutput:
        """query (N, H) with N = B*K rows, K consecutive rows per image -> context, alpha."""
        B, L, D = memory.values.shape
        K = query.shape[0] // B
        scores = self.scorer(query.view(B, K, -1), memory.keys)  # (B, K, L)
        if memory.mask is not None:
            scores = scores.masked_fill(~memory.mask.unsqueeze(1), float("-inf"))
        alpha = torch.softmax(scores.float(), dim=-1).to(memory.values.dtype)  # (B, K, L)
        context = torch.bmm(alpha, memory.values)  # (B, K, D)
        return AttentionOutput(context.view(B * K, D), alpha.view(B * K, L))
