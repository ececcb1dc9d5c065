"""Every scorer: shapes, normalisation, masking, gradients, fast path == reference formula, keys projected once."""

import pytest
import torch
from conftest import tiny_model_config

from caption.config import ConfigError
from caption.decoding import DecodeConfig, decode
from caption.model import SCORERS, AttentionDecoder, SoftAttention

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
    context, alpha, _ = att(query, memory)
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
    context, alpha, _ = att(torch.randn(B, 16), att.prepare(feats, mask))
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
    context, alpha, _ = att(q, memory)
    for row in range(6):
        image = row // 3
        c1, a1, _ = att(q[row : row + 1], memory.index(torch.tensor([image])))
        torch.testing.assert_close(context[row], c1[0])
        torch.testing.assert_close(alpha[row], a1[0])


def _outputs_and_grads(fn, leaves):
    """fn() -> tensors; their values and the gradients of a fixed random weighting w.r.t. leaves."""
    for t in leaves:
        t.grad = None
    outs = fn()
    gen = torch.Generator().manual_seed(7)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs], [t.grad.clone() for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("name", ALL)
def test_fast_path_equals_reference_formula(name, K, dtype):
    """score(query, project_keys(a)) and SoftAttention equal the plain formula, values and gradients."""
    B, L, D = 3, 7, 16
    H = D if name == "dot" else 24
    att = SoftAttention(name, H, D, 12).to(dtype)
    scorer = att.scorer
    feats = torch.randn(B, L, D, dtype=dtype, requires_grad=True)
    query = torch.randn(B, K, H, dtype=dtype, requires_grad=True)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 4:] = False

    def fast():
        context, alpha, _ = att(query.reshape(B * K, H), att.prepare(feats, mask))  # (B*K, D), (B*K, L)
        return scorer(query, scorer.project_keys(feats)), context, alpha

    def reference():
        scores = scorer.reference_score(query, feats)  # (B, K, L)
        masked = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))  # (B, K, L)
        alpha = torch.softmax(masked.float(), -1).to(dtype)  # SoftAttention's softmax runs in fp32
        return scores, (alpha @ feats).view(B * K, D), alpha.view(B * K, L)

    leaves = [query, feats, *att.parameters()]
    outs, grads = _outputs_and_grads(fast, leaves)
    ref_outs, ref_grads = _outputs_and_grads(reference, leaves)
    for out, ref, what in zip(outs, ref_outs, ("scores", "context", "alpha")):
        torch.testing.assert_close(out, ref, msg=what)
    names = ["query", "features"] + [n for n, _ in att.named_parameters()]
    for g, r, what in zip(grads, ref_grads, names):
        torch.testing.assert_close(g, r, msg=what)
    if K == 1:  # a (B, H) query gives (B, L) scores
        torch.testing.assert_close(scorer(query[:, 0], scorer.project_keys(feats)), outs[0][:, 0])


def test_memory_keys_are_the_true_keys():
    feats = torch.randn(2, 5, 16)
    add = SoftAttention("additive", 24, 16, 12)
    torch.testing.assert_close(add.prepare(feats).keys, feats @ add.scorer.w_k.weight.t() + add.scorer.w_k.bias)
    cat = SoftAttention("concat", 24, 16, 12)
    torch.testing.assert_close(cat.prepare(feats).keys, feats @ cat.scorer.w.weight[:, :16].t())
    gen = SoftAttention("general", 24, 16, 12)
    torch.testing.assert_close(gen.prepare(feats).keys, feats @ gen.scorer.w.weight.t())
    assert SoftAttention("dot", 16, 16, 12).prepare(feats).keys is feats


def test_tanh_scores_gradient_matches_autograd_of_tanh():
    from caption.model.ops.tanh_scores import ChunkedTanhScores

    for K in (1, 3):
        keys = torch.randn(3, 5, 4, dtype=torch.double, requires_grad=True)
        query = torch.randn(3, K, 4, dtype=torch.double, requires_grad=True)
        v = torch.randn(4, dtype=torch.double, requires_grad=True)
        ref = torch.tanh(keys.unsqueeze(1) + query.unsqueeze(2)) @ v  # (B, K, L)
        torch.testing.assert_close(ChunkedTanhScores.apply(keys, query, v), ref)
        assert torch.autograd.gradcheck(ChunkedTanhScores.apply, (keys, query, v))


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
    decode(decoder, feats, DecodeConfig(beam_size=3, max_len=10, min_len=10))
    assert calls == [(4, 9, 16)]  # one call for 4 images x 3 beams x 10 words
