"""A linear map applied once per word whose weight gradient is computed once per sequence.

In teacher forcing the recurrent weight W (4H x (D+H)) is used at every one of T words with
only B rows each. Autograd would compute T separate weight gradients g_t^T x_t, each a GEMM with
inner dimension B (memory-bound on a CPU) followed by an accumulation into a W-sized buffer.
``DeferredLinear`` instead records (g_t, x_t) during backward and forms sum_t g_t^T x_t as one
GEMM with inner dimension B*T when the gradient reaches W. Same numbers, far less memory traffic.
"""

from __future__ import annotations

import torch

from caption.model.linear import linear, mm_t


class _Gather(torch.autograd.Function):
    """W -> W (an alias); its backward turns the recorded (g_t, x_t) pairs into dW."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, records: list) -> torch.Tensor:
        ctx.records, ctx.dtype = records, weight.dtype
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, _unused: torch.Tensor):
        records, ctx.records = ctx.records, None
        if not records:
            return None, None
        grads = torch.cat([g for g, _ in records])  # (T*B, out)
        inputs = torch.cat([x for _, x in records])  # (T*B, in)
        records.clear()
        # in fp32 even under autocast: one GEMM with inner dimension T*B
        return mm_t(grads.float().t(), inputs.float().t()).to(ctx.dtype), None  # (out, in)


class _Apply(torch.autograd.Function):
    """x @ W^T whose backward returns dx and only records (g, x) for W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, records: list) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.records = records
        return mm_t(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        ctx.records.append((grad, x))
        return mm_t(grad, weight.to(grad.dtype).t()).to(x.dtype), None, None  # g W; autocast-safe


class DeferredLinear:
    """``F.linear(x, weight)`` for many calls in one graph, with one weight-gradient GEMM."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.deferred = torch.is_grad_enabled() and weight.requires_grad
        self._records: list = []
        self._alias = _Gather.apply(weight, self._records) if self.deferred else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.deferred:
            return linear(x, self.weight)
        return _Apply.apply(x, self._alias, self._records)
