"""Beam search's runners-up (DecodeConfig.alternatives): each is a real hypothesis of the model,
with its own log-probability and maps, best first; asking for them never changes the winner."""

import pytest
import torch
from conftest import tiny_model_config

from caption.decoding import DecodeConfig, decode
from caption.model import SCORERS, AttentionDecoder
from caption.vocab import END_ID, START_ID


def _decoder(name: str = "additive", vocab: int = 20) -> AttentionDecoder:
    return AttentionDecoder(vocab, 16, tiny_model_config(name)).eval()


@torch.no_grad()
def _teacher_forced(decoder: AttentionDecoder, features: torch.Tensor, tokens: list[int]):
    """Sum of the tokens' log-probabilities and their maps (T, L), fed one word at a time."""
    memory = decoder.prepare(features.unsqueeze(0))  # (1, L, D) in
    state = decoder.init_state(memory)
    prev, total, maps = torch.tensor([START_ID]), 0.0, []
    for token in tokens:
        out = decoder.step(prev, state, memory)
        total += float(torch.log_softmax(out.logits.float(), -1)[0, token])
        maps.append(out.alpha[0])
        prev, state = torch.tensor([token]), out.state
    return total, torch.stack(maps)  # (T, L)


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_each_alternative_is_the_teacher_forced_hypothesis(name):
    decoder, feats = _decoder(name), torch.randn(4, 9, 16)
    K = 4
    opts = DecodeConfig(beam_size=K, max_len=7, length_penalty=0.5, alternatives=True)
    seen = 0
    for b, result in enumerate(decode(decoder, feats, opts)):
        assert len(result.alternatives) <= K - 1
        hyps = [result, *result.alternatives]
        assert len({tuple(h.tokens) for h in hyps}) == len(hyps), "the hypotheses are distinct"
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True), "winner first, then best first"
        for h in result.alternatives:
            seen += 1
            log_prob, maps = _teacher_forced(decoder, feats[b], h.tokens)
            assert h.log_prob == pytest.approx(log_prob, abs=1e-4)
            torch.testing.assert_close(h.alphas.reshape(len(h.tokens), -1), maps, atol=1e-5, rtol=0)
            assert h.alphas.shape == (len(h.tokens), 3, 3) and len(h.words) == len(h.tokens)
            assert h.finished == (h.tokens[-1] == END_ID)
            assert h.finished or len(h.tokens) == opts.max_len, "finished, or cut at the cap"
            assert h.score == pytest.approx(h.log_prob / len(h.tokens) ** 0.5)
            assert h.alternatives == ()
    assert seen >= 4, "the random decoders must yield some runners-up for this test to mean anything"


@pytest.mark.parametrize("penalty", [0.0, 1.0])
def test_asking_for_alternatives_keeps_the_winner(penalty):
    decoder, feats = _decoder(), torch.randn(5, 9, 16)
    plain = decode(decoder, feats, DecodeConfig(beam_size=3, max_len=8, length_penalty=penalty))
    rich = decode(decoder, feats, DecodeConfig(beam_size=3, max_len=8, length_penalty=penalty, alternatives=True))
    for p, r in zip(plain, rich):
        assert p.tokens == r.tokens and p.log_prob == pytest.approx(r.log_prob, abs=1e-5)
        assert p.alternatives == ()
    assert any(r.alternatives for r in rich)


def test_batched_alternatives_equal_single_image_ones():
    decoder, feats = _decoder("general"), torch.randn(3, 9, 16)
    opts = DecodeConfig(beam_size=3, max_len=6, alternatives=True)
    batched = decode(decoder, feats, opts)
    for i in range(3):
        (single,) = decode(decoder, feats[i : i + 1], opts)
        assert [a.tokens for a in single.alternatives] == [a.tokens for a in batched[i].alternatives]


def test_no_alternatives_with_one_beam():
    decoder, feats = _decoder(), torch.randn(3, 9, 16)
    for result in decode(decoder, feats, DecodeConfig(beam_size=1, max_len=6, alternatives=True)):
        assert result.alternatives == ()


def test_alternatives_at_the_length_cap():
    """No <end> before the cap: the runners-up are the live beams cut at max_len."""
    decoder, feats = _decoder(), torch.randn(2, 9, 16)
    for r in decode(decoder, feats, DecodeConfig(beam_size=3, max_len=5, min_len=5, alternatives=True)):
        assert len(r.alternatives) == 2
        assert all(len(a.tokens) == 5 and not a.finished for a in r.alternatives)
