"""Every scorer: shapes, normalisation, masking, gradients, formulas, keys projected once."""

import pytest
import torch

from caption.config import ConfigError
from caption.decoding import DecodingOptions, decode
from caption.model import SCORERS, AttentionDecoder, SoftAttention, build_scorer
from conftest import tiny_model_config

ALL = sorted(SCORERS)


def test_registry_has_the_four_scorers():
    assert set(ALL) == {"additive", "dot", "general", "concat"}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("query_dim", [16, 24])
def test_shapes_sum_to_one_and_gradients(name, query_dim):
    B, L, D = 3, 7, 16
    if name == "dot" and query_dim != D:
        with pytest.raises(ConfigError, match="general"):
            SoftAttention(name, query_dim, D, 12)
        return
    att = SoftAttention(name, query_dim, D, 12)
    feats = torch.randn(B, L, D, requires_grad=True)
    query = torch.randn(B, query_dim, requires_grad=True)
    memory = att.prepare(feats)
    assert att.scorer(query, memory.keys).shape == (B, L)
    assert att.scorer(query.view(B, 1, -1).expand(B, 4, -1), memory.keys).shape == (B, 4, L)
    context, alpha = att(query, memory)
    assert context.shape == (B, D) and alpha.shape == (B, L)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(B))
    (context.square().sum() + alpha[:, 0].sum()).backward()
    assert feats.grad.abs().sum() > 0 and query.grad.abs().sum() > 0
    for p in att.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ALL)
def test_padded_cells_get_zero_weight(name):
    B, L, D = 2, 6, 16
    att = SoftAttention(name, 16, D, 12)
    mask = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    feats = torch.randn(B, L, D)
    context, alpha = att(torch.randn(B, 16), att.prepare(feats, mask))
    assert torch.all(alpha[1, 3:] == 0)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(B))
    # the padded cells' values cannot leak into the context
    feats2 = feats.clone()
    feats2[1, 3:] = 1e3
    memory2 = att.prepare(feats2, mask)
    memory1 = att.prepare(feats, mask)
    q = torch.randn(B, 16)
    torch.testing.assert_close(att(q, memory1).context[1], att(q, memory2).context[1])


@pytest.mark.parametrize("name", ALL)
def test_beam_rows_match_single_rows(name):
    """A (B*K)-row query over per-image keys equals each row attended on its own."""
    att = SoftAttention(name, 16, 16, 12)
    memory = att.prepare(torch.randn(2, 5, 16))
    q = torch.randn(2 * 3, 16)
    context, alpha = att(q, memory)
    for row in range(6):
        image = row // 3
        c1, a1 = att(q[row : row + 1], memory.index(torch.tensor([image])))
        torch.testing.assert_close(context[row], c1[0])
        torch.testing.assert_close(alpha[row], a1[0])


def test_formulas():
    torch.manual_seed(1)
    q, a = torch.randn(2, 8, dtype=torch.double), torch.randn(2, 5, 6, dtype=torch.double)
    add = build_scorer("additive", 8, 6, 4).double()
    ref = add.v(torch.tanh(add.w_q(q).unsqueeze(1) + add.w_k(a))).squeeze(-1)
    torch.testing.assert_close(add(q, add.project_keys(a)), ref)
    cat = build_scorer("concat", 8, 6, 4).double()
    ref = cat.v(torch.tanh(cat.w(torch.cat([a, q.unsqueeze(1).expand(-1, 5, -1)], -1)))).squeeze(-1)
    torch.testing.assert_close(cat(q, cat.project_keys(a)), ref)
    gen = build_scorer("general", 8, 6, 4).double()
    torch.testing.assert_close(gen(q, gen.project_keys(a)), torch.einsum("bh,hd,bld->bl", q, gen.w.weight, a))
    dot = build_scorer("dot", 6, 6, 4).double()
    torch.testing.assert_close(dot(q[:, :6], dot.project_keys(a)), torch.einsum("bd,bld->bl", q[:, :6], a) / 6**0.5)


def test_additive_gradient_matches_autograd_of_tanh():
    from caption.model.attention import _TanhScores

    for K in (1, 3):
        keys = torch.randn(3, 5, 4, dtype=torch.double, requires_grad=True)
        query = torch.randn(3, K, 4, dtype=torch.double, requires_grad=True)
        v = torch.randn(4, dtype=torch.double, requires_grad=True)
        assert torch.autograd.gradcheck(_TanhScores.apply, (keys, query, v))


@pytest.mark.parametrize("name", ALL)
def test_keys_projected_once_per_image(name, monkeypatch):
    cfg = tiny_model_config(name)
    decoder = AttentionDecoder(20, 16, cfg)
    scorer = decoder.attention.scorer
    calls = []
    original = scorer.project_keys
    monkeypatch.setattr(scorer, "project_keys", lambda f: calls.append(f.shape) or original(f))
    feats = torch.randn(4, 9, 16)
    captions = torch.randint(4, 20, (4, 12))
    decoder(feats, captions)
    assert calls == [(4, 9, 16)]  # one call for 11 words
    calls.clear()
    decode(decoder, feats, DecodingOptions(beam_size=3, max_len=10, min_len=10))
    assert calls == [(4, 9, 16)]  # one call for 4 images x 3 beams x 10 words
