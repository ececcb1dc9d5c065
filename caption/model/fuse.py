"""A frozen CNN made cheaper for inference: each BatchNorm folded into the convolution before it.

In eval mode a BatchNorm is a per-channel scale and shift, so it can be folded into the
preceding convolution's weights and bias; a symmetric "same" zero padding done by a separate
``ZeroPad2d`` (EfficientNet-Lite's static padding) can move into the convolution itself. Each
removes one pass over a large activation map: on EfficientNet-Lite0 (2 CPU threads,
benchmarks/README.md) that is about a quarter of the encoder's time. The result is a copy for no-grad
inference (feature caching, ``caption predict``); training and checkpoints keep the original.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def _parents(module: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    """id(child) -> (parent, attribute name) for every submodule."""
    return {id(child): (parent, name) for parent in module.modules() for name, child in parent.named_children()}


def _conv_bn_pairs(module: nn.Module, example: torch.Tensor) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """(conv, bn) pairs where the BatchNorm reads exactly the convolution's output, found by running
    ``example`` through ``module`` (so any architecture works, whatever its attribute names)."""
    calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
    kinds = (nn.Conv2d, nn.BatchNorm2d)
    hooks = [m.register_forward_hook(lambda m, i, o: calls.append((m, i[0], o)))
             for m in module.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for hook in hooks:
            hook.remove()
    made_by = {id(out): m for m, _, out in calls if isinstance(m, nn.Conv2d)}  # outputs stay alive in calls
    return [(made_by[id(inp)], m) for m, inp, _ in calls if isinstance(m, nn.BatchNorm2d) and id(inp) in made_by]


def _move_symmetric_padding(module: nn.Module) -> None:
    """A conv's own ``static_padding = ZeroPad2d(p, p, q, q)`` becomes its ``padding = (q, p)``."""
    for conv in module.modules():
        pad = getattr(conv, "static_padding", None)
        if isinstance(conv, nn.Conv2d) and isinstance(pad, nn.ZeroPad2d) and conv.padding == (0, 0):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom:
                conv.static_padding, conv.padding = nn.Identity(), (top, left)


def fused_for_inference(module: nn.Module, example: torch.Tensor) -> nn.Module:
    """An eval-mode, no-grad copy of ``module`` with BatchNorms folded into convolutions and symmetric
    static paddings moved into them; the copy's output on ``example`` is checked against the
    original's (else the unchanged copy comes back)."""
    original = module
    module = copy.deepcopy(module).eval().requires_grad_(False)
    example = example.to(next(module.parameters()).device)
    with torch.no_grad(), torch.autocast(example.device.type, enabled=False):  # the check runs in fp32
        expected = module(example)
        parents = _parents(module)
        for conv, bn in _conv_bn_pairs(module, example):
            folded = fuse_conv_bn_eval(conv, bn)
            conv.weight = nn.Parameter(folded.weight.detach().contiguous(memory_format=torch.channels_last),
                                       requires_grad=False)
            conv.bias = nn.Parameter(folded.bias.detach(), requires_grad=False)
            parent, name = parents[id(bn)]
            setattr(parent, name, nn.Identity())
        _move_symmetric_padding(module)
        got = module(example)
    same = torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()) + 1e-6)
    return module if same else copy.deepcopy(original).eval().requires_grad_(False)
