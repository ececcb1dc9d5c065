"""oneDNN-backed linear maps: same numbers and gradients as F.linear, F.linear wherever they do not apply."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import caption.model.ops.linear as lin
from caption.model.ops.deferred import DeferredLinear
from caption.training.loop import adamw


def _grads(fn, *tensors):
    for t in tensors:
        t.grad = None
    out = fn()
    out.backward(torch.randn_like(out, generator=torch.Generator().manual_seed(1)))
    return out.detach(), [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("shape", [(6, 10), (2, 3, 10), (0, 10)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_f_linear_values_and_gradients(shape, bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen, requires_grad=True)
    w = torch.randn(7, 10, generator=gen, requires_grad=True)
    b = torch.randn(7, generator=gen, requires_grad=True) if bias else None
    leaves = [x, w] + ([b] if bias else [])
    out, grads = _grads(lambda: lin.linear(x, w, b), *leaves)
    ref, ref_grads = _grads(lambda: F.linear(x, w, b), *leaves)
    assert out.shape == (*shape[:-1], 7)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_strided_weight_slices_and_frozen_inputs():
    """The concat scorer multiplies by column slices of one weight; frozen inputs get no gradient."""
    w = torch.randn(5, 12, requires_grad=True)
    x = torch.randn(4, 8)  # no gradient wanted
    out, (gw,) = _grads(lambda: lin.linear(x, w[:, :8]) + lin.linear(torch.ones(4, 4), w[:, 8:]), w)
    ref, (rw,) = _grads(lambda: x @ w[:, :8].t() + torch.ones(4, 4) @ w[:, 8:].t(), w)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gw, rw)
    assert x.grad is None


def test_gapped_views_are_copied_for_onednn_and_dense_ones_are_not():
    """oneDNN's reference kernel would run a column slice of a weight; it gets a dense copy instead."""
    w = torch.randn(5, 12)
    wt = w.t()
    assert lin._dense(w) is w and lin._dense(wt) is wt  # row- and column-major: read in place
    sliced = w[:, :8]  # (5, 8) with row stride 12
    assert lin._dense(sliced).is_contiguous() and lin._dense(sliced.t()).t().is_contiguous()  # same order
    for view in (sliced, sliced.t()):
        assert torch.equal(lin._dense(view), view)
    x = torch.randn(6, 12)
    torch.testing.assert_close(lin.mm_t(x[:, :8], sliced), x[:, :8] @ sliced.t())


def test_onednn_runs_cpu_fp32_and_nothing_else(monkeypatch):
    calls = []
    original = lin._mm_t
    monkeypatch.setattr(lin, "_mm_t", lambda *a: calls.append(a[0].dtype) or original(*a))
    layer = lin.Linear(10, 3)
    layer(torch.randn(2, 10))
    assert calls == ([torch.float32] if lin.onednn_available() else [])
    calls.clear()
    layer.double()(torch.randn(2, 10, dtype=torch.float64))  # not fp32: F.linear
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin.Linear(10, 3)(torch.randn(2, 10)).dtype == torch.bfloat16  # autocast: F.linear, in bf16
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # oneDNN switched off by the caller
    lin.Linear(10, 3)(torch.randn(2, 10))
    assert calls == []


def test_fallback_without_onednn_gives_the_same_numbers(monkeypatch):
    x, w = torch.randn(3, 6), torch.randn(4, 6)
    fast = lin.linear(x, w)
    monkeypatch.setattr(lin, "onednn_available", lambda: False)
    torch.testing.assert_close(lin.linear(x, w), fast)
    torch.testing.assert_close(lin.mm_t(x, w), x @ w.t())


@pytest.mark.parametrize("broken", ["missing", "schema"])
def test_a_torch_without_the_private_op_falls_back_to_f_linear(monkeypatch, broken):
    """Another torch version may lack torch.ops.mkldnn._linear_pointwise or change its arguments:
    oneDNN is then reported unavailable and every product (and its gradient) is F.linear's."""
    def gone(*args):
        raise AttributeError("no such op") if broken == "missing" else TypeError("schema changed")

    monkeypatch.setattr(lin, "_linear_pointwise", gone)
    lin.onednn_available.cache_clear()
    try:
        assert not lin.onednn_available()
        layer, x = lin.Linear(6, 4), torch.randn(3, 6, requires_grad=True)
        out = layer(x)
        torch.testing.assert_close(out, torch.nn.functional.linear(x, layer.weight, layer.bias))
        out.sum().backward()
        torch.testing.assert_close(layer.weight.grad, torch.ones(3, 4).t() @ x.detach())
    finally:
        lin.onednn_available.cache_clear()


def test_linear_module_is_a_drop_in_for_nn_linear():
    """Same parameters and state dict: checkpoints saved with nn.Linear load unchanged."""
    ref = nn.Linear(6, 4)
    layer = lin.Linear(6, 4)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(5, 6)
    torch.testing.assert_close(layer(x), ref(x))


@pytest.mark.parametrize("bias", [False, True])
def test_deferred_linear_gradients_match_autograd(bias):
    """Inside ``deferred()`` the weight gradient is one GEMM; outside it is a plain Linear."""
    layer = DeferredLinear(5, 6, bias=bias)
    ref = nn.Linear(5, 6, bias=bias)
    ref.load_state_dict(layer.state_dict())  # same parameters, same state dict keys
    xs = [torch.randn(3, 5, requires_grad=True) for _ in range(4)]

    def run(module):
        return torch.stack([module(x) for x in xs]).tanh().sum()

    def deferred():
        with layer.deferred():
            return run(layer)

    params, ref_params = list(layer.parameters()), list(ref.parameters())
    _, grads = _grads(deferred, *params, *xs)
    _, ref_grads = _grads(lambda: run(ref), *ref_params, *xs)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    _, plain = _grads(lambda: run(layer), *params, *xs)  # outside the block: plain Linear
    for g, r in zip(plain, ref_grads):
        torch.testing.assert_close(g, r)


def test_deferred_linear_records_only_inside_the_block():
    layer = DeferredLinear(4, 3, bias=False)
    with layer.deferred():
        assert layer._records == []
        layer(torch.randn(2, 4)).sum().backward()
        with torch.no_grad(), layer.deferred():  # no autograd: nothing to defer
            layer(torch.randn(2, 4))
    assert layer._records is None and layer._alias is None
    assert layer.weight.grad is not None and layer.weight.grad.shape == (3, 4)


def test_adamw_is_fused_on_cpu_and_steps_like_the_default():
    torch.manual_seed(0)
    a, b = nn.Linear(8, 3), nn.Linear(8, 3)
    b.load_state_dict(a.state_dict())
    fused = adamw(a.parameters(), lr=0.1, weight_decay=0.01)
    plain = torch.optim.AdamW(b.parameters(), lr=0.1, weight_decay=0.01)
    assert fused.defaults["fused"] is True
    for _ in range(3):
        x = torch.randn(4, 8)
        for model, optim in ((a, fused), (b, plain)):
            optim.zero_grad()
            model(x).square().sum().backward()
            optim.step()
    torch.testing.assert_close(a.weight, b.weight)
    torch.testing.assert_close(a.bias, b.bias)
