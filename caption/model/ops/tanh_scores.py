"""The additive and concat scorers' v^T tanh(k_i + q) over every (query, cell) pair: a chunked CPU
kernel with a recomputing backward, beside the plain formula it computes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ChunkedTanhScores(torch.autograd.Function):
    """v . tanh(k_l + q_k) for keys k (B, L, A), queries q (B, K, A), v (A,) -> (B, K, L).

    The CPU kernel of the tanh-MLP scorers (:func:`plain_tanh_scores` is the plain formula). The
    (B, K, L, A) intermediate is the largest tensor of a decoding step, and each pass over it is
    memory-bound, so it is formed a few images at a time in one reused cache-sized buffer, and
    the backward pass recomputes it instead of storing one per word. tanh goes through
    tanh(y) = 2 sigmoid(2y) - 1 because PyTorch's CPU sigmoid is faster than its tanh; the 2 lands
    on the small query (2q) and on the keys through ``add``'s ``alpha``, so sigmoid's input
    2k + 2q takes one pass over the buffer (benchmarks/README.md).
    """

    @staticmethod
    def _chunk(B: int, K: int, L: int, A: int) -> int:
        return max(1, min(B, (1 << 19) // max(1, K * L * A)))  # ~2 MB of fp32 per chunk

    @staticmethod
    def _sigmoid(keys: torch.Tensor, query2: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """sigmoid(2k + 2q) for keys k (b, L, A) and query2 = 2q (b, K, A), into out (b, K, L, A)."""
        return torch.add(query2.unsqueeze(2), keys.unsqueeze(1), alpha=2, out=out).sigmoid_()

    @staticmethod
    def forward(ctx, keys: torch.Tensor, query: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        (B, L, A), K = keys.shape, query.shape[1]
        query2, v_ = query.to(keys.dtype) * 2, v.to(keys.dtype)  # (B, K, A), (A,): one dtype under autocast
        out = keys.new_empty(B, K, L)
        step = ChunkedTanhScores._chunk(B, K, L, A)
        buf = keys.new_empty(min(step, B), K, L, A)
        for i in range(0, B, step):
            s = ChunkedTanhScores._sigmoid(keys[i : i + step], query2[i : i + step], buf[: min(step, B - i)])
            torch.matmul(s, v_, out=out[i : i + step])  # (b, K, L)
        ctx.save_for_backward(keys, query2, v)
        return out.mul_(2).sub_(v_.sum())  # v . (2 s - 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keys, query2, v = ctx.saved_tensors
        (B, L, A), K = keys.shape, query2.shape[1]
        g_keys, g_query = torch.empty_like(keys), torch.empty_like(query2)
        g_v = torch.zeros_like(v)
        v4 = 4 * v
        step = ChunkedTanhScores._chunk(B, K, L, A)
        buf = keys.new_empty(min(step, B), K, L, A)
        for i in range(0, B, step):
            s = ChunkedTanhScores._sigmoid(keys[i : i + step], query2[i : i + step], buf[: min(step, B - i)])
            g = grad[i : i + step]  # (b, K, L)
            g_v += 2 * (g.reshape(1, -1) @ s.view(-1, A)).view(-1) - g.sum()  # d/dv of v . (2s - 1)
            # dL/dk = dL/dq = g v (1 - tanh^2) = g 4v s (1 - s); with K == 1 it lands in g_keys directly
            pre = s if K > 1 else g_keys[i : i + step].unsqueeze(1)  # (b, K, L, A)
            torch.addcmul(s, s, s, value=-1, out=pre).mul_(g.unsqueeze(-1)).mul_(v4)
            if K > 1:
                torch.sum(pre, 1, out=g_keys[i : i + step])  # (b, L, A)
            torch.sum(pre, 2, out=g_query[i : i + step])  # (b, K, A)
        return g_keys, g_query, g_v


def chunked_pays(keys: torch.Tensor) -> bool:
    """Whether :class:`ChunkedTanhScores` pays: on a CPU, in fp32 and in bf16 alike, where it was
    measured faster than the plain formula (benchmarks/README.md); CUDA takes the plain formula."""
    return keys.device.type == "cpu"


def tanh_scores(keys: torch.Tensor, query: torch.Tensor, v: nn.Linear) -> torch.Tensor:
    """v^T tanh(k_i + q) + b from keys (B, L, A) and queries (B, K, A) -> (B, K, L): the chunked
    kernel on a CPU, :func:`plain_tanh_scores` elsewhere."""
    if not chunked_pays(keys):
        return plain_tanh_scores(keys, query.to(keys.dtype), v)  # (B, K, L)
    scores = ChunkedTanhScores.apply(keys, query, v.weight.view(-1))  # (B, K, L)
    return scores if v.bias is None else scores + v.bias


def plain_tanh_scores(keys: torch.Tensor, query: torch.Tensor, v: nn.Linear) -> torch.Tensor:
    """The formula with plain torch ops (the CUDA path, and what the chunked kernel must equal):
    keys (B, L, A), queries (B, K, A) -> (B, K, L)."""
    return F.linear(torch.tanh(keys.unsqueeze(1) + query.unsqueeze(2)), v.weight, v.bias).squeeze(-1)
