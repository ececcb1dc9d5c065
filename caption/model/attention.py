"""Soft attention over the image grid: four scorers behind one registry, one ``SoftAttention``.

Every scorer has the same two halves:

* ``project_keys(features (B, L, D)) -> keys (B, L, A)`` runs once per image (``prepare``),
* ``forward(query (B, H) or (B, K, H), keys (B, L, A)) -> scores (B, L) or (B, K, L)`` runs
  once per word; K is the number of beams per image, so beam search never copies the keys.

and ``reference_score(query, features)``, the same scores written as the textbook formula with
plain torch ops, next to the fast path it specifies (tests keep them equal). The additive and
concat scorers' v^T tanh(k_i + q) is :func:`caption.model.ops.tanh_scores.tanh_scores`.

``SoftAttention`` owns what is common: masking padded cells, the softmax over L, and blending
the cells with those weights into the context vector (B, D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from caption.config import ConfigError
from caption.model.ops.linear import Linear, linear
from caption.model.ops.tanh_scores import plain_tanh_scores, tanh_scores

SCORERS: dict[str, type["Scorer"]] = {}


def register_scorer(name: str) -> Callable[[type["Scorer"]], type["Scorer"]]:
    """Class decorator adding a scorer to ``SCORERS`` under ``name`` (``model.attention=name``)."""

    def add(cls: type["Scorer"]) -> type["Scorer"]:
        SCORERS[name] = cls
        return cls

    return add


class Scorer(nn.Module):
    """Base: subclasses implement ``project_keys``, ``score`` and ``reference_score``.

    ``score(query, project_keys(features))`` is the fast path; ``reference_score(query, features)``
    is the scorer's formula written with plain torch ops (tests keep the two equal, values and
    gradients).
    """

    def __init__(self, query_dim: int, key_dim: int, attention_dim: int):
        super().__init__()

    def project_keys(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, L, D) -> keys (B, L, A): the part of the score that depends on the image only."""
        raise NotImplementedError

    def score(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """query (B, K, H), keys (B, L, A) -> (B, K, L)."""
        raise NotImplementedError

    def reference_score(self, query: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """query (B, K, H), features (B, L, D) -> (B, K, L): the plain formula, for tests and reading."""
        raise NotImplementedError

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        if query.dim() == 2:
            return self.score(query.unsqueeze(1), keys).squeeze(1)  # (B, L)
        return self.score(query, keys)  # (B, K, L)


@register_scorer("additive")
class AdditiveScorer(Scorer):
    """Bahdanau: v^T tanh(W_q q + W_k a_i); keys k_i = W_k a_i + b_k."""

    def __init__(self, query_dim: int, key_dim: int, attention_dim: int):
        super().__init__(query_dim, key_dim, attention_dim)
        self.w_k = Linear(key_dim, attention_dim)
        self.w_q = Linear(query_dim, attention_dim)
        self.v = nn.Linear(attention_dim, 1, bias=False)  # a bias would cancel in the softmax

    def project_keys(self, features: torch.Tensor) -> torch.Tensor:
        return self.w_k(features)  # (B, L, A)

    def score(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return tanh_scores(keys, self.w_q(query), self.v)  # (B, K, L)

    def reference_score(self, query: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        q = F.linear(query, self.w_q.weight, self.w_q.bias)  # (B, K, A)
        k = F.linear(features, self.w_k.weight, self.w_k.bias)  # (B, L, A)
        return plain_tanh_scores(k, q, self.v)  # (B, K, L)


@register_scorer("concat")
class ConcatScorer(Scorer):
    """Luong concat: v^T tanh(W [a_i; q]), one matrix W split so its key half runs once per image.

    Keys k_i = W[:, :D] a_i; the bias goes with the query half.
    """

    def __init__(self, query_dim: int, key_dim: int, attention_dim: int):
        super().__init__(query_dim, key_dim, attention_dim)
        self.key_dim = key_dim
        self.w = nn.Linear(key_dim + query_dim, attention_dim)
        self.v = nn.Linear(attention_dim, 1, bias=False)

    def project_keys(self, features: torch.Tensor) -> torch.Tensor:
        return linear(features, self.w.weight[:, : self.key_dim])  # (B, L, A)

    def score(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        q = linear(query, self.w.weight[:, self.key_dim :], self.w.bias)  # (B, K, A)
        return tanh_scores(keys, q, self.v)  # (B, K, L)

    def reference_score(self, query: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        (B, K, H), L = query.shape, features.shape[1]
        a = features.unsqueeze(1).expand(B, K, L, -1)  # (B, K, L, D)
        q = query.unsqueeze(2).expand(B, K, L, H)  # (B, K, L, H)
        hidden = torch.tanh(F.linear(torch.cat([a, q], -1), self.w.weight, self.w.bias))  # (B, K, L, A)
        return F.linear(hidden, self.v.weight).squeeze(-1)  # (B, K, L)


@register_scorer("general")
class GeneralScorer(Scorer):
    """Luong general: q^T W a_i; keys k_i = W a_i (B, L, H), so dim(q) may differ from dim(a)."""

    def __init__(self, query_dim: int, key_dim: int, attention_dim: int):
        super().__init__(query_dim, key_dim, attention_dim)
        self.w = Linear(key_dim, query_dim, bias=False)

    def project_keys(self, features: torch.Tensor) -> torch.Tensor:
        return self.w(features)  # (B, L, H)

    def score(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return torch.bmm(query, keys.transpose(1, 2))  # (B, K, L)

    def reference_score(self, query: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bkh,hd,bld->bkl", query, self.w.weight, features)  # (B, K, L)


@register_scorer("dot")
class DotScorer(Scorer):
    """Luong dot: q . a_i / sqrt(D), parameter-free; the keys are the features themselves.

    The 1/sqrt(D) (which keeps the softmax soft) goes on the query, per word, not on the
    (B, L, D) keys. Needs dim(q) == dim(a); use ``general`` when they differ.
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
        return features  # (B, L, D)

    def score(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return torch.bmm(query * self.scale, keys.transpose(1, 2))  # (B, K, L)

    def reference_score(self, query: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return query @ features.transpose(1, 2) / math.sqrt(features.shape[-1])  # (B, K, L)


def build_scorer(name: str, query_dim: int, key_dim: int, attention_dim: int) -> Scorer:
    if name not in SCORERS:
        raise ConfigError(f"model.attention: unknown scorer '{name}' (choose from {', '.join(sorted(SCORERS))})")
    return SCORERS[name](query_dim, key_dim, attention_dim)


@dataclass(frozen=True)
class Memory:
    """What the decoder attends over, prepared once per image.

    values (B, L, D): the feature grid; keys (B, L, A): the scorer's keys k_i, projected once
    (``project_keys``: W_k a_i + b_k for additive, the key half of W times a_i for concat,
    W a_i (B, L, H) for general, the features a_i themselves for dot); mask (B, L) bool, True
    for real cells (None: all real); mean (B, D): masked mean feature (initialises the LSTM);
    pooled (B, D) and pool_alpha (B, L): the query-free :class:`AttentionPool`'s summary and its
    weights, when the decoder has one (``model.init_state=attend``: the LSTM starts from pooled).
    """

    values: torch.Tensor
    keys: torch.Tensor
    mask: torch.Tensor | None
    mean: torch.Tensor
    pooled: torch.Tensor | None = None
    pool_alpha: torch.Tensor | None = None
    blend: str = "expect"  # how the cells become the context: "expect" (soft), "sample" or "argmax" (hard)

    def index(self, idx: torch.Tensor | slice) -> "Memory":
        """Memory of the images ``idx`` (B',) picks, e.g. to drop finished images (a slice gives views)."""
        mask = None if self.mask is None else self.mask[idx]
        pooled = None if self.pooled is None else self.pooled[idx]
        pool_alpha = None if self.pool_alpha is None else self.pool_alpha[idx]
        return Memory(self.values[idx], self.keys[idx], mask, self.mean[idx], pooled, pool_alpha, self.blend)


BLENDS = ("expect", "sample", "argmax")  # Memory.blend


class AttentionOutput(NamedTuple):
    context: torch.Tensor  # (N, D)
    alpha: torch.Tensor  # (N, L), sums to 1 over real cells, 0 on padded cells
    cell: torch.Tensor | None = None  # (N,) the one cell read (blend "sample" or "argmax"), None when blended


class SoftAttention(nn.Module):
    """Key projection (``prepare``), masking, softmax and blending, for any registered scorer."""

    def __init__(self, scorer: str, query_dim: int, key_dim: int, attention_dim: int):
        super().__init__()
        self.scorer = build_scorer(scorer, query_dim, key_dim, attention_dim)

    def prepare(self, features: torch.Tensor, mask: torch.Tensor | None = None, blend: str = "expect") -> Memory:
        """features (B, L, D), mask (B, L) -> Memory with keys projected once; ``blend`` says how
        each word reads the cells (:data:`BLENDS`).

        Under autocast the values are cast to its dtype here, once, not by every word's product.
        """
        if blend not in BLENDS:
            raise ValueError(f"blend must be one of {', '.join(BLENDS)}, got '{blend}'")
        if mask is None:
            mean = features.mean(dim=1)  # (B, D)
        else:
            weights = mask.to(features.dtype).unsqueeze(-1)  # (B, L, 1)
            mean = (features * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, D)
        keys = self.scorer.project_keys(features)  # (B, L, A)
        kind = features.device.type
        if torch.is_autocast_enabled(kind) and features.is_floating_point():
            features = features.to(torch.get_autocast_dtype(kind))  # (B, L, D)
        return Memory(features, keys, mask, mean, blend=blend)

    def forward(self, query: torch.Tensor, memory: Memory) -> AttentionOutput:
        """query (N, H) with N = B*K rows, K consecutive rows per image -> context, alpha (and the cell).

        ``memory.blend`` "expect" blends the cells with alpha (soft attention); "sample" reads one
        cell drawn from alpha, "argmax" its most likely cell (hard attention). alpha is returned
        whole either way: hard attention's training needs its gradient.
        """
        B, L, D = memory.values.shape
        K = query.shape[0] // B
        scores = self.scorer(query.view(B, K, -1), memory.keys)  # (B, K, L)
        if memory.mask is not None:
            scores = scores.masked_fill(~memory.mask.unsqueeze(1), float("-inf"))
        wide = torch.promote_types(memory.values.dtype, torch.float32)  # the maps stay fp32 under bf16
        alpha = torch.softmax(scores.float(), dim=-1).to(wide).view(B * K, L)  # (N, L)
        if memory.blend == "expect":
            context = torch.bmm(alpha.view(B, K, L).to(memory.values.dtype), memory.values)  # (B, K, D)
            return AttentionOutput(context.view(B * K, D), alpha)
        if memory.blend == "sample":
            cell = torch.multinomial(alpha.detach().float(), 1).squeeze(1)  # (N,)
        else:
            cell = alpha.detach().argmax(dim=1)  # (N,)
        image = torch.arange(B * K, device=cell.device) // K  # (N,) each row's image
        return AttentionOutput(memory.values[image, cell], alpha, cell)  # (N, D)


class PoolOutput(NamedTuple):
    pooled: torch.Tensor  # (B, D)
    alpha: torch.Tensor  # (B, L), sums to 1 over real cells, 0 on padded cells


class AttentionPool(nn.Module):
    """Attention without a query: each cell scored by a learned vector alone, the cells blended.

    s_i = v^T tanh(W a_i + b), alpha = softmax(s) over the real cells, pooled = sum_i alpha_i a_i.
    The summary depends on the image only, so it is computed once per image (``prepare``);
    ``model.init_state=attend`` starts the LSTM from it instead of the plain mean.
    """

    def __init__(self, feature_dim: int, attention_dim: int):
        super().__init__()
        self.w = Linear(feature_dim, attention_dim)
        self.v = nn.Linear(attention_dim, 1, bias=False)  # a bias would cancel in the softmax

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> "PoolOutput":
        """features (B, L, D), mask (B, L) -> pooled (B, D), alpha (B, L) (0 on padded cells)."""
        scores = self.v(torch.tanh(self.w(features))).squeeze(-1)  # (B, L)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        alpha = torch.softmax(scores.float(), dim=-1).to(features.dtype)  # (B, L)
        pooled = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)  # (B, D)
        return PoolOutput(pooled, alpha)
