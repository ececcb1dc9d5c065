"""bf16 on any CPU: log-probabilities, losses, beam scores and attention maps stay fp32, and the
fast paths (chunked tanh scores, the deferred recurrent gradient) match their plain formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model_config

from caption.decoding import DecodeConfig, decode
from caption.decoding.rules import log_probs
from caption.model import SCORERS, AttentionDecoder
from caption.model.ops.tanh_scores import chunked_pays, plain_tanh_scores, tanh_scores
from caption.model.ops.deferred import DeferredLinear
from caption.training.losses import caption_loss
from caption.vocab import END_ID, START_ID

BF16 = torch.autocast("cpu", dtype=torch.bfloat16)



# ----------------------------------------------------------------------------- bf16 paths on any CPU


def _captions(B: int = 3, T: int = 6, V: int = 20) -> torch.Tensor:
    caps = torch.randint(4, V, (B, T + 1))
    caps[:, 0], caps[:, -1] = START_ID, END_ID
    return caps


def test_tanh_scores_are_chunked_on_a_cpu_in_fp32_and_bf16_and_match_the_formula():
    keys, query, v = torch.randn(4, 9, 12), torch.randn(4, 3, 12), torch.nn.Linear(12, 1)
    assert chunked_pays(keys) and chunked_pays(keys.bfloat16()) and not chunked_pays(keys.to("meta"))
    with BF16:
        low = tanh_scores(keys.bfloat16(), query.bfloat16(), v)  # (B, K, L)
    assert low.shape == (4, 3, 9)
    torch.testing.assert_close(low.float(), plain_tanh_scores(keys, query, v), atol=0.05, rtol=0.02)
    torch.testing.assert_close(tanh_scores(keys, query, v), plain_tanh_scores(keys, query, v))


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_bf16_decoding_keeps_log_probs_scores_and_maps_in_fp32(name):
    decoder = AttentionDecoder(20, 16, tiny_model_config(name)).eval()
    feats = torch.randn(3, 9, 16)
    with torch.no_grad(), BF16:
        memory = decoder.prepare(feats)
        assert memory.values.dtype == torch.bfloat16  # cast once per image, not per word
        out = decoder.step(torch.full((3,), START_ID), decoder.init_state(memory), memory)
        assert out.alpha.dtype == torch.float32
        assert log_probs(out.logits, 0, DecodeConfig(), torch.empty(3, 0, dtype=torch.long)).dtype == torch.float32
        results = decode(decoder, feats, DecodeConfig(beam_size=3, max_len=6))
    for r in results:
        assert np.isfinite(r.log_prob) and r.alphas.dtype == torch.float32
        torch.testing.assert_close(r.alphas.sum((1, 2)), torch.ones(len(r.tokens)))


def test_bf16_training_step_close_to_fp32_with_fp32_loss_and_gradients():
    decoder = AttentionDecoder(20, 16, tiny_model_config("additive"))
    feats, caps = torch.randn(3, 9, 16), _captions()
    full = caption_loss(decoder(feats, caps))
    with BF16:
        low = caption_loss(decoder(feats, caps))
    assert low.total.dtype == low.xent.dtype == torch.float32
    torch.testing.assert_close(low.total, full.total, atol=0.05, rtol=0.02)
    low.total.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in decoder.parameters())


def test_deferred_weight_gradient_under_bf16_matches_the_per_word_one():
    layer = DeferredLinear(8, 6, bias=False)
    xs = [torch.randn(4, 8) for _ in range(3)]

    def grad(deferred: bool) -> torch.Tensor:
        layer.zero_grad()
        with BF16:
            if deferred:
                with layer.deferred():
                    loss = sum((layer(x).float() ** 2).sum() for x in xs)
            else:
                loss = sum((layer(x).float() ** 2).sum() for x in xs)
        loss.backward()
        return layer.weight.grad.clone()

    a, b = grad(True), grad(False)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=0.05 * b.abs().max().item(), rtol=0.02)
