"""Greedy and batched beam search: equivalences, edge cases, and an overfitting model."""

import pytest
import torch
from conftest import tiny_model_config

from caption.decoding import DecodeConfig, beam_search, decode, greedy_search
from caption.model import SCORERS, AttentionDecoder
from caption.training.losses import caption_loss
from caption.vocab import END, END_ID, START_ID

SCORER_NAMES = sorted(SCORERS)


def _random_decoder(name="additive", vocab=20):
    return AttentionDecoder(vocab, 16, tiny_model_config(name)).eval()


@pytest.mark.parametrize("name", SCORER_NAMES)
def test_beam_of_one_equals_greedy(name):
    decoder, feats = _random_decoder(name), torch.randn(6, 9, 16)
    with torch.no_grad():
        for opts in (DecodeConfig(1, 12), DecodeConfig(1, 12, min_len=3), DecodeConfig(1, 12, no_repeat_ngram=2)):
            greedy, beam = greedy_search(decoder, feats, opts), beam_search(decoder, feats, opts)
            for g, b in zip(greedy, beam):
                assert g.tokens == b.tokens
                assert g.log_prob == pytest.approx(b.log_prob, abs=1e-4)
                torch.testing.assert_close(g.alphas, b.alphas)


def test_beam_of_one_equals_greedy_when_every_word_of_a_row_is_banned():
    """Words 4, 5, 6 said once each (no_repeat_ngram=1) and <end> held back by min_len: the fourth
    step rules out every word. Both searches then let the caption end (one ban function), so K = 1
    beam search is still greedy search, and wider beams still return a caption."""
    torch.manual_seed(0)
    decoder, feats = _random_decoder(vocab=7), torch.randn(4, 9, 16)
    cases = (DecodeConfig(1, 6, min_len=5, no_repeat_ngram=1), DecodeConfig(1, 8, min_len=5, no_repeat_ngram=1, length_penalty=0.5),
             DecodeConfig(1, 8, min_len=6, no_repeat_ngram=1, suppress_unk=False, length_penalty=1.0))
    with torch.no_grad():
        for opts in cases:
            greedy, beam = greedy_search(decoder, feats, opts), beam_search(decoder, feats, opts)
            assert any(g.finished and len(g.tokens) < opts.min_len for g in greedy)  # the rule had work to do
            for g, b in zip(greedy, beam):
                assert g.tokens == b.tokens and g.finished == b.finished
                assert g.log_prob == pytest.approx(b.log_prob, abs=1e-4)
                assert torch.equal(g.alphas, b.alphas)
            wide = decode(decoder, feats, DecodeConfig(3, opts.max_len, min_len=opts.min_len, no_repeat_ngram=1))
            assert all(r.finished and len(set(r.tokens)) == len(r.tokens) for r in wide)


@pytest.mark.parametrize("name", SCORER_NAMES)
def test_batched_beam_equals_single_image_beams(name):
    decoder, feats = _random_decoder(name), torch.randn(5, 9, 16)
    opts = DecodeConfig(beam_size=4, max_len=10)
    batched = decode(decoder, feats, opts)
    for i in range(5):
        single = decode(decoder, feats[i : i + 1], opts)[0]
        assert single.tokens == batched[i].tokens
        assert single.log_prob == pytest.approx(batched[i].log_prob, abs=1e-4)
        torch.testing.assert_close(single.alphas, batched[i].alphas)


def test_results_carry_tokens_words_scores_and_maps():
    decoder, feats = _random_decoder(), torch.randn(3, 9, 16)
    for beam in (1, 3):
        for r in decode(decoder, feats, DecodeConfig(beam, max_len=8, length_penalty=0.7)):
            T = len(r.tokens)
            assert 1 <= T <= 8 and len(r.words) == T
            assert r.alphas.shape == (T, 3, 3)
            torch.testing.assert_close(r.alphas.sum((1, 2)), torch.ones(T))
            assert r.score == pytest.approx(r.log_prob / T**0.7)
            assert r.finished == (r.tokens[-1] == END_ID)
            assert START_ID not in r.tokens and END not in r.caption


def test_no_end_before_the_cap_returns_live_hypotheses():
    decoder, feats = _random_decoder(), torch.randn(2, 9, 16)
    for beam in (1, 4):
        results = decode(decoder, feats, DecodeConfig(beam, max_len=6, min_len=6))
        assert all(len(r.tokens) == 6 and not r.finished and END_ID not in r.tokens for r in results)


def test_beam_larger_than_vocabulary_is_exhaustive():
    """K = 12 beams over 2 words: every prefix stays live, so the pick is the brute-force best."""
    torch.manual_seed(0)
    decoder = _random_decoder(vocab=6)  # 4 specials + words 4, 5
    feats = torch.randn(3, 9, 16)
    results = decode(decoder, feats, DecodeConfig(beam_size=12, max_len=4))
    assert len(results) == 3
    for i, r in enumerate(results):
        _, log_prob, seq = _exhaustive_best(decoder, feats[i : i + 1], (4, 5), 4)
        assert r.tokens == seq and set(r.tokens) <= {4, 5, END_ID}
        assert r.log_prob == pytest.approx(log_prob, abs=1e-4)


def _repeats_an_ngram(seq, n):
    grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)] if n else []
    return len(grams) != len(set(grams))


def _exhaustive_best(decoder, feats, words, max_len, length_penalty=0.0, no_repeat_ngram=0):
    """Best caption of at most max_len tokens by log_prob / len**length_penalty, by brute force
    (over the captions that repeat no n-gram of size ``no_repeat_ngram``, when set)."""
    import itertools

    best = (float("-inf"), float("-inf"), None)  # (normalised score, log-probability, tokens)
    with torch.no_grad():
        memory = decoder.prepare(feats)
        for n in range(1, max_len + 1):
            for body in itertools.product(words, repeat=n - 1):
                for last in ([END_ID] + list(words)) if n == max_len else [END_ID]:
                    seq, state, prev, total = list(body) + [last], decoder.init_state(memory), START_ID, 0.0
                    if _repeats_an_ngram(seq, no_repeat_ngram):
                        continue
                    for w in seq:
                        out = decoder.step(torch.tensor([prev]), state, memory)
                        total += float(torch.log_softmax(out.logits, -1)[0, w])
                        state, prev = out.state, w
                    best = max(best, (total / n**length_penalty, total, seq))
    return best


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_wide_beam_finds_the_exact_best_caption(length_penalty):
    """With K >= every live prefix, beam search is exhaustive: same caption as brute force.

    K exceeds the 3 real words, so some kept candidates are <end>: they must finish, never go on
    as live beams (with a length penalty, "<end> <end>" would then beat "<end>"). A few
    <end>-prone random decoders make that case common.
    """
    for seed in range(4):
        torch.manual_seed(seed)
        decoder = _random_decoder(vocab=7)  # 4 specials + words 4, 5, 6
        with torch.no_grad():
            decoder.out.bias[END_ID] += 1.0
        feats = torch.randn(6, 9, 16)
        results = decode(decoder, feats, DecodeConfig(beam_size=9, max_len=3, length_penalty=length_penalty))
        for i, r in enumerate(results):
            score, log_prob, seq = _exhaustive_best(decoder, feats[i : i + 1], (4, 5, 6), 3, length_penalty)
            assert END_ID not in r.tokens[:-1]
            assert r.tokens == seq
            assert r.log_prob == pytest.approx(log_prob, abs=1e-4)
            assert r.score == pytest.approx(score, abs=1e-4)


def test_grid_reshape_and_mode_restored():
    decoder = AttentionDecoder(20, 16, tiny_model_config()).train()
    feats = torch.randn(2, 6, 16)
    r = decode(decoder, feats, DecodeConfig(2, 5), grid=(2, 3))[0]
    assert r.alphas.shape[1:] == (2, 3)
    assert decoder.training  # decoding ran in eval mode and restored the caller's mode


def _overfit(name, steps=300):
    """4 images (random features) -> 4 distinct 5-word captions; train until memorised."""
    torch.manual_seed(0)
    decoder = AttentionDecoder(24, 16, tiny_model_config(name, dropout=0.1))
    feats = torch.randn(4, 9, 16)
    words = torch.tensor([[4, 5, 6, 7, 8], [9, 10, 11, 4, 5], [12, 13, 14, 15, 16], [17, 4, 18, 19, 20]])
    caps = torch.cat([torch.full((4, 1), START_ID), words, torch.full((4, 1), END_ID)], 1)
    optim = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    for _ in range(steps):
        optim.zero_grad()
        caption_loss(decoder(feats, caps), alpha_c=0.1).total.backward()
        optim.step()
    return decoder, feats, caps[:, 1:].tolist()


@pytest.mark.parametrize("name", SCORER_NAMES)
@pytest.mark.slow
def test_tiny_model_overfits_and_decodes_exactly(name):
    decoder, feats, expected = _overfit(name)
    greedy = decode(decoder, feats, DecodeConfig(1, max_len=10))
    beam = decode(decoder, feats, DecodeConfig(3, max_len=10))
    assert [r.tokens for r in greedy] == expected
    assert [r.tokens for r in beam] == expected
    for g, b in zip(greedy, beam):
        assert b.log_prob >= g.log_prob - 1e-5


def test_beam_log_prob_at_least_greedy_on_a_partly_trained_model():
    decoder, _, _ = _overfit("additive", steps=40)
    feats = torch.randn(16, 9, 16)
    greedy = decode(decoder, feats, DecodeConfig(1, max_len=10))
    beam = decode(decoder, feats, DecodeConfig(5, max_len=10))
    assert all(b.log_prob >= g.log_prob - 1e-5 for g, b in zip(greedy, beam))


def test_unk_is_never_emitted_unless_asked():
    from caption.vocab import UNK_ID

    decoder, feats = _random_decoder(), torch.randn(4, 9, 16)
    with torch.no_grad():
        decoder.out.bias[UNK_ID] = 50.0  # the model now prefers <unk> everywhere
    for beam in (1, 3):
        assert all(UNK_ID not in r.tokens for r in decode(decoder, feats, DecodeConfig(beam, max_len=6)))
        allowed = decode(decoder, feats, DecodeConfig(beam, max_len=6, suppress_unk=False))
        assert all(UNK_ID in r.tokens for r in allowed)


@pytest.mark.parametrize("n", [1, 2])
def test_no_repeat_ngram_wide_beam_finds_the_exact_best_caption(n):
    """With repetition control, the widest beam still finds the best caption that repeats no n-gram."""
    for seed in range(3):
        torch.manual_seed(seed)
        decoder = _random_decoder(vocab=7)  # words 4, 5, 6
        with torch.no_grad():
            decoder.out.bias[4] += 2.0  # a decoder that loves one word: repeats are its best captions
        feats = torch.randn(4, 9, 16)
        results = decode(decoder, feats, DecodeConfig(beam_size=30, max_len=4, no_repeat_ngram=n))
        plain = decode(decoder, feats, DecodeConfig(beam_size=30, max_len=4))
        assert any(_repeats_an_ngram(r.tokens, n) for r in plain)  # the control has something to do
        for i, r in enumerate(results):
            score, log_prob, seq = _exhaustive_best(decoder, feats[i : i + 1], (4, 5, 6), 4, no_repeat_ngram=n)
            assert not _repeats_an_ngram(r.tokens, n)
            assert r.tokens == seq and r.log_prob == pytest.approx(log_prob, abs=1e-4)


def test_no_repeat_ngram_in_greedy_search():
    torch.manual_seed(0)
    decoder = _random_decoder(vocab=9)
    with torch.no_grad():
        decoder.out.bias[4] += 3.0
    feats = torch.randn(5, 9, 16)
    assert any(_repeats_an_ngram(r.tokens, 2) for r in decode(decoder, feats, DecodeConfig(1, 10)))
    for r in decode(decoder, feats, DecodeConfig(1, 10, no_repeat_ngram=2)):
        assert not _repeats_an_ngram(r.tokens, 2)


def test_a_negative_length_penalty_is_refused():
    from caption.config import ConfigError

    with pytest.raises(ConfigError, match="decode.length_penalty"):
        DecodeConfig(beam_size=3, length_penalty=-0.5)
