"""fp32 linear maps on CPU through oneDNN, with the same numbers as ``F.linear``.

PyTorch sends a CPU fp32 ``F.linear`` to MKL's sgemm. At the decoder's shapes (a few dozen
rows per word against a 2560 x 2048 LSTM weight, or 160 beam rows against the 512 x 9490 output
layer) oneDNN, which PyTorch also ships, runs the same product faster (benchmarks/README.md;
``benchmarks/decoder.py``). ``linear`` sends CPU fp32 products to oneDNN's linear kernel
(``torch.ops.mkldnn._linear_pointwise``, the one TorchInductor uses) and everything else
(CUDA, bf16/fp16, autocast, a build without oneDNN, oneDNN switched off through
``torch.backends.mkldnn``) to ``F.linear``. The op has no autograd formula, so
``_OneDNNLinear`` gives it one, again through oneDNN: dx = g W, dW = g^T x.

``mm_t(x, w)`` is the bare ``x @ w.T`` for the custom autograd code in ``deferred``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def _linear_pointwise(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T + b by ``torch.ops.mkldnn._linear_pointwise``: the one call of that private op.

    It is the op TorchInductor uses for CPU linear layers; its schema (input, weight, bias,
    post-op name, post-op scalars, post-op algorithm) was checked on the CPU builds of torch 2.13.0
    and 2.14.1. :func:`onednn_available` tries it once on a small product; if it is missing, raises
    or disagrees with ``F.linear`` (another torch version), every product goes to ``F.linear``.
    """
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


@functools.lru_cache(maxsize=1)
def onednn_available() -> bool:
    """True when this PyTorch build runs :func:`_linear_pointwise` and it agrees with ``F.linear``."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*shape, generator=gen) for shape in ((5, 7), (3, 7), (3,)))
        return bool(torch.allclose(_linear_pointwise(x, w, b), F.linear(x, w, b), atol=1e-5))
    except (AttributeError, RuntimeError, TypeError):  # no such op, or its schema changed: use F.linear
        return False


def _use_onednn(x: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    """oneDNN for a non-empty CPU fp32 product outside autocast; ``F.linear`` / ``@`` otherwise."""
    real = [x] + [t for t in tensors if t is not None]
    return (
        x.numel() > 0
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in real)
        and not torch.is_autocast_enabled("cpu")
        and torch.backends.mkldnn.enabled  # a caller can switch oneDNN off: torch.backends.mkldnn.flags(enabled=False)
        and onednn_available()
    )


def _dense(m: torch.Tensor) -> torch.Tensor:
    """A 2-D operand in a layout oneDNN's matmul runs at speed: row- or column-major without gaps.

    A gapped view (e.g. a column slice W[:, :D] of a wider weight) sends oneDNN to its reference
    kernel, orders of magnitude slower; such a view is copied (keeping its row- or column-major
    order), anything else is read in place.
    """
    if m.is_contiguous() or m.t().is_contiguous():
        return m
    return m.t().contiguous().t() if m.stride(0) == 1 else m.contiguous()


def _mm_t(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, in) @ w (out, in)^T + b through oneDNN."""
    return _linear_pointwise(_dense(x), _dense(w), b)


def mm_t(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, in) @ w (out, in)^T -> (M, out), no autograd; oneDNN where it applies."""
    return _mm_t(x, w) if _use_onednn(x, w) else x @ w.t()


class _OneDNNLinear(torch.autograd.Function):
    """F.linear on 2-D input whose forward and backward products run in oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x, weight = _dense(x), _dense(weight)  # dense once, for the backward products too
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _mm_t(x, weight, bias)  # (M, out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = _mm_t(grad, weight.t()) if need_x else None  # (M, in) = g W
        grad_w = _mm_t(grad.t(), x.t()) if need_w else None  # (out, in) = g^T x
        grad_b = grad.sum(0) if need_b and ctx.has_bias else None  # (out,)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x (..., in) -> (..., out), through oneDNN for CPU fp32."""
    if not _use_onednn(x, weight, bias):
        return F.linear(x, weight, bias)
    out = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)  # (M, out)
    return out.view(*x.shape[:-1], weight.shape[0])  # (..., out)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) whose forward is ``linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
