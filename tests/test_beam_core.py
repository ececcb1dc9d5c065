"""The beam core's pieces: a bank's top candidates by tier then score, and the one ban function."""

import math

import torch

from caption.config import DecodeConfig
from caption.decoding.core import Beams
from caption.decoding.rules import ban
from caption.vocab import END_ID


def test_a_banks_top_orders_by_tier_then_score_and_keeps_the_best_that_do_not_end():
    torch.manual_seed(0)
    B, V, K = 4, 15, 3
    beams = Beams(B, DecodeConfig(beam_size=K, max_len=5), 9, torch.device("cpu"))
    cand = torch.randn(B, 1, V).masked_fill(torch.rand(B, 1, V) < 0.3, float("-inf"))  # (B, R, V), R = 1
    tier = torch.randint(0, 3, (B, 1, V))
    top = beams.top(cand, tier, tiers=3)
    for b in range(B):
        scores, tiers = cand[b, 0].tolist(), tier[b, 0].tolist()
        live = sorted((i for i in range(V) if math.isfinite(scores[i])), key=lambda i: (-tiers[i], -scores[i]))
        n = min(len(live), 2 * K)
        assert top.index[b, :n].tolist() == live[:n]  # tier first, then score
        assert top.scores[b, :n].tolist() == [scores[i] for i in live[:n]]
        assert all(s == float("-inf") for s in top.scores[b, n:].tolist())  # dead candidates last
        going = [i for i in live[: 2 * K] if i != END_ID][:K]  # the best that do not end go on
        assert top.kept[b, : len(going)].tolist() == going
        assert top.kept_scores[b, : len(going)].tolist() == [scores[i] for i in going]


def test_a_bank_without_tiers_is_the_plain_top_k():
    torch.manual_seed(1)
    beams = Beams(2, DecodeConfig(beam_size=2, max_len=5), 9, torch.device("cpu"))
    cand = torch.randn(2, 1, 8)
    top = beams.top(cand)
    expected = cand.view(2, 8).topk(4, dim=1)
    assert torch.equal(top.scores, expected.values) and torch.equal(top.index, expected.indices)


def test_one_ban_for_logits_and_log_probs_and_a_row_with_no_word_left_may_end():
    options = DecodeConfig(min_len=5, no_repeat_ngram=1)
    tokens = torch.tensor([[4, 5, 6], [4, 4, 5]])  # row 0 has said every word of V = 7, row 1 not word 6
    logits = torch.randn(2, 7)
    logp = ban(torch.log_softmax(logits, -1), 3, options, tokens)
    banned_logits = ban(logits.clone(), 3, options, tokens)
    assert torch.equal(torch.isinf(logp), torch.isinf(banned_logits))  # the same words, whatever the scores
    assert torch.isfinite(logp[0]).nonzero().flatten().tolist() == [END_ID]  # nothing left to say: it may end
    assert torch.isfinite(logp[1]).nonzero().flatten().tolist() == [6]  # <end> still held back by min_len
