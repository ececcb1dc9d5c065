"""Attention without a query (model.init_state=attend): the pool, the LSTM's start from it, its map in every result."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model_config

from caption.config import ConfigError
from caption.decoding import DecodeConfig, decode, sample
from caption.model import AttentionDecoder
from caption.model.attention import AttentionPool
from caption.model.check import check_model_config
from caption.vocab import START_ID


def _decoder(init_state="attend", vocab=20):
    return AttentionDecoder(vocab, 16, tiny_model_config(init_state=init_state))


def test_pool_is_the_softmax_of_a_learned_vector_over_the_cells():
    pool, feats = AttentionPool(16, 12), torch.randn(3, 9, 16)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False
    pooled, alpha = pool(feats, mask)
    scores = F.linear(torch.tanh(F.linear(feats, pool.w.weight, pool.w.bias)), pool.v.weight).squeeze(-1)  # (B, L)
    expected = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    torch.testing.assert_close(alpha, expected)
    assert (alpha[1, 6:] == 0).all() and torch.allclose(alpha.sum(1), torch.ones(3))
    torch.testing.assert_close(pooled, torch.einsum("bl,bld->bd", alpha, feats))
    # no query: the map of an image does not depend on anything but its cells
    torch.testing.assert_close(pool(feats[:1])[1], pool(feats)[1][:1])


def test_the_lstm_starts_from_the_pooled_feature():
    decoder, feats = _decoder().eval(), torch.randn(2, 9, 16)
    memory = decoder.prepare(feats)
    pooled, alpha = decoder.pool(feats)
    torch.testing.assert_close(memory.pool_alpha, alpha)
    state = decoder.init_state(memory, beams=3)
    torch.testing.assert_close(state.h, decoder.init_h(pooled).repeat_interleave(3, 0))
    assert decoder.init_h(memory.mean).sub(state.h[::3]).abs().max() > 1e-4  # not the mean
    mean = _decoder("mean")
    assert mean.pool is None and mean.prepare(feats).pool_alpha is None


def test_teacher_forcing_equals_the_step_loop_and_trains_the_pool():
    decoder, feats = _decoder().eval(), torch.randn(4, 9, 16)
    captions = torch.randint(4, 20, (4, 6))
    captions[:, 0] = START_ID
    captions[2, 4:] = 0  # padding
    out = decoder(feats, captions)
    memory = decoder.prepare(feats)
    state, logits = decoder.init_state(memory), []
    for t in range(5):
        step = decoder.step(captions[:, t], state, memory)
        logits.append(step.logits)
        state = step.state
    loop = torch.stack(logits, 1)  # (B, T, V)
    torch.testing.assert_close(out.logits[out.mask], loop[out.mask], atol=1e-5, rtol=1e-5)
    out.word_logits.sum().backward()
    assert decoder.pool.w.weight.grad is not None and decoder.pool.v.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("beam", [1, 3])
def test_every_caption_carries_the_pool_map(beam):
    decoder, feats = _decoder(), torch.randn(3, 9, 16)
    options = DecodeConfig(beam_size=beam, max_len=6, alternatives=beam > 1)
    expected = decoder.prepare(feats).pool_alpha.detach().view(3, 3, 3)  # (B, gh, gw)
    for b, result in enumerate(decode(decoder, feats, options)):
        assert result.init_alphas.shape == (3, 3)
        torch.testing.assert_close(result.init_alphas, expected[b])
        assert all(torch.equal(alt.init_alphas, result.init_alphas) for alt in result.alternatives)
    samples = sample(decoder, feats, DecodeConfig(temperature=1.0, max_len=4, samples=2))
    torch.testing.assert_close(samples.init_alphas, expected.view(3, 9))
    assert all(torch.equal(r.init_alphas, expected[i // 2]) for i, r in enumerate(samples.results()))
    assert all(r.init_alphas is None for r in decode(_decoder("mean"), feats, options))


def test_init_state_is_checked():
    check_model_config(tiny_model_config(init_state="attend"))
    with pytest.raises(ConfigError, match="init_state"):
        check_model_config(tiny_model_config(init_state="pool"))
