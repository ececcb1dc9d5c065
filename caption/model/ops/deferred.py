"""A linear map applied once per word whose weight gradient is computed once per sequence.

In teacher forcing the recurrent weight W (4H x (D+H)) is used at every one of T words with
only B rows each. Autograd would compute T separate weight gradients g_t^T x_t, each a GEMM with
inner dimension B (memory-bound on a CPU) followed by an accumulation into a W-sized buffer.
Inside ``with layer.deferred():`` a ``DeferredLinear`` instead records (g_t, x_t) during backward
and forms sum_t g_t^T x_t as one GEMM with inner dimension B*T when the gradient reaches W.
Same numbers, far less memory traffic. Outside that block it is a plain ``Linear``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from caption.model.ops.linear import Linear, mm_t


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


class DeferredLinear(Linear):
    """``Linear`` (same parameters and state dict) that can defer its weight gradient.

    ``with layer.deferred():`` makes every call inside the block share one weight-gradient GEMM,
    formed when backward reaches the weight; dx (and the bias gradient) stay per call.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kwargs):
        super().__init__(in_features, out_features, bias, **kwargs)
        self._records: list | None = None  # the (g, x) pairs of the open ``deferred`` block
        self._alias: torch.Tensor | None = None  # the weight, through _Gather, inside that block

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Defer the weight gradient of the calls in this block (no-op without autograd on the weight)."""
        outer = self._records, self._alias
        if torch.is_grad_enabled() and self.weight.requires_grad:
            self._records = []
            self._alias = _Gather.apply(self.weight, self._records)
            kind = self.weight.device.type
            if torch.is_autocast_enabled(kind):  # cast once per sequence, not by every word's product
                self._alias = self._alias.to(torch.get_autocast_dtype(kind))
        try:
            yield
        finally:
            self._records, self._alias = outer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._records is None or not torch.is_grad_enabled():
            return super().forward(x)
        out = _Apply.apply(x.reshape(-1, x.shape[-1]), self._alias, self._records)  # (M, out)
        out = out.view(*x.shape[:-1], self.out_features)  # (..., out)
        return out if self.bias is None else out + self.bias
