"""Decoder: teacher forcing equals a loop over step(); padding is masked; the loss."""

import pytest
import torch
from conftest import tiny_model_config

from caption.model import SCORERS, AttentionDecoder, build_model
from caption.model.decoder import DecoderOutput
from caption.training.losses import caption_loss
from caption.vocab import END_ID, PAD_ID, START_ID


def _captions():
    return torch.tensor([
        [START_ID, 5, 6, 7, 8, END_ID, PAD_ID, PAD_ID],
        [START_ID, 9, 10, END_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID],
        [START_ID, 4, 4, 4, 4, 4, 4, END_ID],
    ])


@pytest.mark.parametrize("name", sorted(SCORERS))
@pytest.mark.parametrize("extra", [{}, {"gate": "vector", "deep_output": True}, {"gate": "none"}])
def test_forward_equals_manual_step_loop(name, extra):
    decoder = AttentionDecoder(20, 16, tiny_model_config(name, **extra)).eval()
    feats, caps = torch.randn(3, 9, 16), _captions()
    out = decoder(feats, caps)
    memory = decoder.prepare(feats)
    state = decoder.init_state(memory)
    for t in range(caps.shape[1] - 1):
        step = decoder.step(caps[:, t], state, memory)
        state = step.state
        real = out.mask[:, t]  # captions that still have word t (rows 0 and 1 end early)
        torch.testing.assert_close(out.logits[real, t], step.logits[real])
        torch.testing.assert_close(out.alphas[real, t], step.alpha[real])
    assert out.logits.shape == (3, 7, 20) and out.alphas.shape == (3, 7, 9)
    assert out.mask.tolist()[1] == [True, True, True, False, False, False, False]
    # finished captions run no further words: nothing at their padded positions
    assert not out.logits[~out.mask].any() and not out.alphas[~out.mask].any()
    with pytest.raises(ValueError, match="at least one word"):
        decoder(feats, torch.full((3, 4), PAD_ID).index_fill_(1, torch.tensor([0]), START_ID))


@pytest.mark.parametrize("rows", [[0, 1, 2], [2, 0, 1]], ids=["unsorted", "longest-first"])
def test_gradients_equal_manual_step_loop(rows):
    """The packed, deferred teacher forcing gives the gradients of plain autograd through step()."""
    decoder = AttentionDecoder(20, 16, tiny_model_config("additive")).double()
    feats, caps = torch.randn(3, 9, 16, dtype=torch.double)[rows], _captions()[rows]
    caption_loss(decoder(feats, caps)).total.backward()
    fast = {n: p.grad.clone() for n, p in decoder.named_parameters()}
    decoder.zero_grad()
    memory, logits, alphas = decoder.prepare(feats), [], []
    state = decoder.init_state(memory)
    for t in range(caps.shape[1] - 1):
        step = decoder.step(caps[:, t], state, memory)
        state = step.state
        logits.append(step.logits)
        alphas.append(step.alpha)
    targets = caps[:, 1:]
    mask = targets != PAD_ID
    out = DecoderOutput(torch.stack(logits, 1)[mask], torch.stack(alphas, 1), targets, mask)
    caption_loss(out).total.backward()
    for n, p in decoder.named_parameters():
        torch.testing.assert_close(fast[n], p.grad, msg=n)


def test_packing_maps_each_real_word_to_its_stacked_row():
    from caption.model.decoder import _pack

    mask = torch.tensor([[True] * 5 + [False] * 2, [True] * 3 + [False] * 4, [True] * 7])  # lengths 5, 3, 7
    pack = _pack(mask)
    assert pack.order.tolist() == [2, 0, 1] and pack.rank.tolist() == [1, 2, 0] and pack.reordered
    assert pack.running == [3, 3, 3, 2, 2, 1, 1]
    # the time-major stacks list (sorted row, t) for each word t on its first running[t] rows
    stacked = [(r, t) for t, n in enumerate(pack.running) for r in range(n)]
    b, t = mask.nonzero(as_tuple=True)
    assert [stacked[i] for i in pack.stacked_rows().tolist()] == list(zip(pack.rank[b].tolist(), t.tolist()))
    assert pack.sorted_rows().tolist() == pack.rank[b].tolist()
    assert not _pack(mask[[2, 0, 1]]).reordered  # already longest first


def test_recurrent_layer_keeps_a_plain_linear_state_dict():
    decoder = AttentionDecoder(20, 16, tiny_model_config())
    assert "lstm_rec.weight" in decoder.state_dict() and "lstm_rec.bias" not in decoder.state_dict()
    H, D = decoder.hidden_dim, 16
    assert decoder.state_dict()["lstm_rec.weight"].shape == (4 * H, D + H)


def test_padding_does_not_change_the_loss():
    decoder = AttentionDecoder(20, 16, tiny_model_config()).eval()
    feats, caps = torch.randn(3, 9, 16), _captions()
    padded = torch.cat([caps, torch.full((3, 5), PAD_ID)], 1)
    a, b = caption_loss(decoder(feats, caps)), caption_loss(decoder(feats, padded))
    torch.testing.assert_close(a.xent, b.xent)
    torch.testing.assert_close(a.penalty, b.penalty)
    # and the loss of caption 1 alone equals its loss inside the padded batch
    solo = caption_loss(decoder(feats[1:2], caps[1:2, :4]))
    out = decoder(feats, padded)
    one = DecoderOutput(out.logits[1:2][out.mask[1:2]], out.alphas[1:2], out.targets[1:2], out.mask[1:2])
    torch.testing.assert_close(caption_loss(one).xent, solo.xent)


def test_doubly_stochastic_penalty_sums_cells_and_averages_batch():
    B, T, L, V = 2, 3, 4, 5
    alphas = torch.full((B, T, L), 1.0 / L)
    targets = torch.tensor([[5, 6, 2], [5, 2, 0]]) % V
    mask = torch.tensor([[True, True, True], [True, True, False]])
    out = DecoderOutput(torch.zeros(int(mask.sum()), V), alphas, targets, mask)
    loss = caption_loss(out, alpha_c=2.0)
    # image 0: each cell gets 3/4 -> 4 * (1/4)^2 = 0.25; image 1: 2/4 -> 4 * (1/2)^2 = 1.0
    torch.testing.assert_close(loss.penalty, torch.tensor(2.0 * (0.25 + 1.0) / 2))
    torch.testing.assert_close(loss.xent, torch.log(torch.tensor(float(V))))


def test_beta_gate_is_a_scalar_per_step_in_paper_mode():
    decoder = AttentionDecoder(20, 16, tiny_model_config(gate="scalar"))
    assert decoder.gate.out_features == 1
    assert AttentionDecoder(20, 16, tiny_model_config(gate="vector")).gate.out_features == 16


def test_build_model_end_to_end_on_images():
    model = build_model(tiny_model_config(), vocab_size=20)
    out = model(torch.randn(3, 3, 32, 32), _captions())
    assert out.alphas.shape == (3, 7, 9)
    assert model.grid == (3, 3)


def test_zero_initial_state_option():
    decoder = AttentionDecoder(20, 16, tiny_model_config(init_state="zeros"))
    memory = decoder.prepare(torch.randn(2, 9, 16))
    state = decoder.init_state(memory, beams=3)
    assert state.h.shape == (6, 24) and not state.h.any() and decoder.init_h is None


def test_bf16_autocast_training_step_gives_fp32_gradients():
    """Mixed precision (as on CUDA) through the chunked tanh scores and the deferred weight gradient."""
    for name in sorted(SCORERS):
        decoder = AttentionDecoder(20, 16, tiny_model_config(name))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = caption_loss(decoder(torch.randn(3, 9, 16), _captions()))
        loss.total.backward()
        assert torch.isfinite(loss.total)
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in decoder.parameters()), name
