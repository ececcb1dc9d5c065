"""Batched multinomial sampling through the decoder's step: K samples per image, log-probabilities, attention."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model_config

from caption.decoding import DecodeConfig, decode, sample
from caption.model import AttentionDecoder
from caption.vocab import END_ID, PAD_ID, START_ID, UNK_ID


def _decoder(vocab=20, **overrides):
    return AttentionDecoder(vocab, 16, tiny_model_config(**overrides))


def _check_layout(s, B, K, max_len):
    N, T = s.tokens.shape
    assert N == B * K and T <= max_len and s.samples == K
    assert s.log_probs.shape == s.mask.shape == (N, T) and s.alphas.shape == (N, T, 9)
    for row, mask, logp, alpha in zip(s.tokens.tolist(), s.mask, s.log_probs, s.alphas):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # emitted tokens first, padding after
        assert all(t == PAD_ID for t in row[n:]) and all(t not in (PAD_ID, START_ID, UNK_ID) for t in row[:n])
        assert END_ID not in row[: n - 1] and (row[n - 1] == END_ID or n == max_len)  # stops at <end> or the cap
        assert (logp[:n] < 0).all() and (logp[n:] == 0).all()
        torch.testing.assert_close(alpha[:n].sum(1), torch.ones(n))
        assert (alpha[n:] == 0).all()


def test_k_samples_per_image_are_consecutive_rows_with_their_log_probs():
    decoder, feats = _decoder(), torch.randn(3, 9, 16)
    options = DecodeConfig(temperature=1.0, max_len=7, samples=4)
    s = sample(decoder, feats, options, generator=torch.Generator().manual_seed(0))
    _check_layout(s, 3, 4, 7)
    # teacher forcing each sample on its own image's features gives the same log-probabilities
    # (the sampled distribution: <pad>, <start> and <unk> ruled out, then renormalised) and maps
    captions = torch.cat([torch.full((12, 1), START_ID), s.tokens], 1)  # (N, T+1)
    with torch.no_grad():
        out = decoder.eval()(feats.repeat_interleave(4, 0), captions)  # (N, L, D)
    logits = out.logits.float()
    logits[..., [PAD_ID, START_ID, UNK_ID]] = float("-inf")
    expected = torch.log_softmax(logits, -1).gather(2, s.tokens.unsqueeze(2)).squeeze(2).masked_fill(~s.mask, 0.0)
    torch.testing.assert_close(s.log_probs, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.alphas, out.alphas * s.mask.unsqueeze(2), atol=1e-5, rtol=1e-5)


def test_first_words_follow_the_model_distribution_and_temperature():
    decoder, feats = _decoder(vocab=8), torch.randn(1, 9, 16)
    n = 4000
    s = sample(decoder, feats, DecodeConfig(temperature=1.0, max_len=1, samples=n), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = decoder.step(torch.tensor([START_ID]), decoder.init_state(decoder.prepare(feats)),
                              decoder.prepare(feats)).logits[0]
    logits[[PAD_ID, START_ID, UNK_ID]] = float("-inf")
    probs = torch.softmax(logits, 0)
    freq = torch.bincount(s.tokens[:, 0], minlength=8).float() / n
    assert (freq - probs).abs().max() < 0.03  # ~4 standard errors at n = 4000
    cold = sample(decoder, feats, DecodeConfig(temperature=1e-3, max_len=1, samples=50))
    assert (cold.tokens[:, 0] == probs.argmax()).all()  # temperature -> 0 is greedy


def test_low_temperature_sampling_is_greedy_search():
    decoder, feats = _decoder().eval(), torch.randn(4, 9, 16)
    greedy = decode(decoder, feats, DecodeConfig(beam_size=1, max_len=8))
    s = sample(decoder, feats, DecodeConfig(temperature=1e-4, max_len=8, samples=2))
    for i, tokens in enumerate(s.token_lists()):
        assert tokens == greedy[i // 2].tokens


def test_gradients_only_when_asked_and_no_dropout():
    decoder, feats = _decoder(dropout=0.5).train(), torch.randn(2, 9, 16)
    plain = sample(decoder, feats, DecodeConfig(temperature=1.0, max_len=16, samples=3))
    assert not plain.log_probs.requires_grad and decoder.training  # the caller's mode comes back
    a = sample(decoder, feats, DecodeConfig(temperature=1.0, max_len=16, samples=3), grad=True, generator=torch.Generator().manual_seed(5))
    b = sample(decoder, feats, DecodeConfig(temperature=1.0, max_len=16, samples=3), grad=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.log_probs, b.log_probs)  # dropout off while sampling
    a.log_probs.sum().backward()
    assert all(p.grad is not None for name, p in decoder.named_parameters() if not name.startswith("dropout"))


def test_rules_of_the_options_hold():
    decoder, feats = _decoder(vocab=12), torch.randn(3, 9, 16)
    s = sample(decoder, feats, DecodeConfig(temperature=1.0, max_len=6, samples=20, min_len=3, no_repeat_ngram=1),
               generator=torch.Generator().manual_seed(2))
    for tokens in s.token_lists():
        words = [t for t in tokens if t != END_ID]
        assert len(words) >= 3 and len(set(words)) == len(words)
    # two words and no word twice: once both are said, <end> is all that is left
    tiny = sample(_decoder(vocab=6), feats, DecodeConfig(temperature=1.0, max_len=6, samples=8, no_repeat_ngram=1))
    assert all(len(t) <= 3 and t[-1] == END_ID for t in tiny.token_lists())
    with pytest.raises(ValueError, match="temperature"):
        sample(decoder, feats, DecodeConfig(temperature=0.0, max_len=16))  # 0 means search, not sampling
    with pytest.raises(ValueError, match="decode.samples"):
        DecodeConfig(temperature=1.0, max_len=16, samples=0)


def test_results_for_the_library():
    decoder, feats = _decoder(), torch.randn(2, 9, 16)
    s = sample(decoder, feats, DecodeConfig(temperature=1.0, max_len=5, samples=3))
    results = s.results()
    assert len(results) == 6
    for r, tokens, logp in zip(results, s.token_lists(), s.log_probs.sum(1).tolist()):
        assert r.tokens == tokens and r.alphas.shape == (len(tokens), 3, 3) and r.init_alphas is None
        assert r.log_prob == pytest.approx(logp) and r.finished == (tokens[-1] == END_ID)
