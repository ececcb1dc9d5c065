"""Hard attention (model.blend=hard): one cell per word, trained with REINFORCE on the cell choices."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import Killed, tiny_model_config

from caption.checkpoint import read_checkpoint
from caption.decoding import DecodeConfig, decode
from caption.model import AttentionDecoder
from caption.training.loop import fit
from caption.training.objectives import reinforce_loss
from caption.vocab import END_ID, START_ID


def _hard(seed: int = 0) -> AttentionDecoder:
    torch.manual_seed(seed)
    return AttentionDecoder(14, 16, tiny_model_config(blend="hard")).eval()


@pytest.mark.parametrize("options", [DecodeConfig(beam_size=1, max_len=6), DecodeConfig(beam_size=3, max_len=6),
                                     DecodeConfig(beam_size=3, max_len=6, alternatives=True),
                                     DecodeConfig(temperature=1.0, samples=2, max_len=6)])
def test_argmax_mode_gives_one_hot_maps_in_every_decoding_mode(options):
    results = decode(_hard(), torch.randn(3, 9, 16), options, grid=(3, 3))
    maps = [r.alphas for r in results] + [a.alphas for r in results for a in r.alternatives]
    for m in maps:
        flat = m.flatten(1)  # (T, L)
        assert torch.equal(flat.sum(1), torch.ones(len(flat))) and torch.equal(flat.max(1).values, torch.ones(len(flat)))


def test_argmax_mode_gives_one_hot_maps_in_constrained_beam_search():
    from caption.decoding.constrained import Constraint, constrained_beam_search
    from caption.decoding.rules import read_cells

    with torch.no_grad():
        found = constrained_beam_search(read_cells(_hard(2), "argmax"), torch.randn(3, 9, 16),
                                        DecodeConfig(beam_size=2, max_len=6), [Constraint(((5,),))] * 3)
    for h in found:
        assert h is not None and 5 in h.tokens
        assert torch.equal(h.alphas.sum(1), torch.ones(len(h.alphas))) and torch.equal(h.alphas.max(1).values, torch.ones(len(h.alphas)))


def test_expect_mode_decodes_as_the_same_weights_read_softly():
    hard, feats = _hard(1), torch.randn(2, 9, 16)
    torch.manual_seed(1)
    soft = AttentionDecoder(14, 16, tiny_model_config()).eval()
    soft.load_state_dict(hard.state_dict())
    options = DecodeConfig(beam_size=2, max_len=6, hard_test="expect")
    for a, b in zip(decode(hard, feats, options), decode(soft, feats, options)):
        assert a.tokens == b.tokens and a.log_prob == pytest.approx(b.log_prob)
        torch.testing.assert_close(a.alphas, b.alphas)


def test_argmax_reads_the_most_likely_cell():
    decoder, feats = _hard(2), torch.randn(2, 9, 16)
    with torch.no_grad():
        memory = decoder.prepare(feats, blend="argmax")
        state = decoder.init_state(memory)
        context, alpha, cell = decoder.attention(state.h, memory)
    assert torch.equal(cell, alpha.argmax(1)) and torch.equal(context, feats[torch.arange(2), cell])


def test_reinforce_estimate_approaches_the_exact_gradient_on_three_cells():
    """E over cells s ~ softmax(z) of the surrogate's gradient -> -grad_z sum_s softmax(z)_s f(s)."""
    z = torch.tensor([0.3, -0.5, 1.1], requires_grad=True)
    f = torch.tensor([-2.0, -0.4, -1.3])  # the log-likelihood each cell would give
    exact = -torch.autograd.grad((torch.softmax(z, 0) * f).sum(), z)[0]
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    cells = torch.multinomial(torch.softmax(z, 0).detach(), n, replacement=True, generator=gen)  # (n,)
    log_choice = torch.log_softmax(z, 0)[cells]  # (n,)
    estimate = torch.autograd.grad(reinforce_loss(log_choice, f[cells], baseline=-1.0, count=n), z)[0]
    torch.testing.assert_close(estimate, exact, atol=0.01, rtol=0.0)
    assert not torch.allclose(exact, torch.zeros(3), atol=0.05)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    from caption.data.shapes import generate_shapes

    out = tmp_path_factory.mktemp("shapes")
    generate_shapes(out, n=40, seed=1, image_size=48)
    return out


def _config(shapes_dir, *overrides):
    from caption.config import load_config

    data = [f"data.{s}_captions={shapes_dir}/captions_{s}.json" for s in ("train", "val", "test")]
    return load_config(None, [
        "data.format=coco", f"data.images={shapes_dir}/images", "data.image_size=48", "data.min_freq=1",
        "data.metric=shapes", "model.encoder=small", "model.small_channels=8", "model.grid=3", "model.embed_dim=8",
        "model.hidden_dim=16", "model.attention_dim=8", "model.dropout=0.3", "model.fine_tune=true",
        "model.fine_tune_blocks=4", "train.epochs=1", "train.batch_size=16", "train.lr=0.003", "precision=fp32",
        "decode.max_len=10", *data, *overrides,
    ])


@pytest.mark.slow
def test_always_reading_the_expectation_trains_exactly_as_soft_attention(shapes_dir, tmp_path):
    soft = fit(_config(shapes_dir), tmp_path / "soft", progress_bars=False)
    hard = fit(_config(shapes_dir, "model.blend=hard", "train.hard_expect_prob=1"), tmp_path / "hard",
               progress_bars=False)
    a, b = (read_checkpoint(tmp_path / run / "last.pt")["model"] for run in ("soft", "hard"))
    assert soft.epochs == hard.epochs == 1
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_hard_training_resumes_exactly_with_its_baseline(shapes_dir, tmp_path):
    cfg = _config(shapes_dir, "model.blend=hard", "train.epochs=2", "train.checkpoint_every=3")

    def kill(progress):
        if progress.step == 7:
            raise Killed

    fit(cfg, tmp_path / "straight", progress_bars=False)
    with pytest.raises(Killed):
        fit(cfg, tmp_path / "resumed", progress_bars=False, on_step=kill)
    fit(cfg, tmp_path / "resumed", resume=True, progress_bars=False)
    a, b = (read_checkpoint(tmp_path / run / "last.pt") for run in ("straight", "resumed"))
    assert a["objective"]["baseline"] == b["objective"]["baseline"] != 0.0
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    rows = (tmp_path / "straight" / "metrics.csv").read_text()
    assert "train_reward" in rows and "train_sampled" in rows


@pytest.mark.slow
def test_predict_json_of_a_hard_model_gives_one_hot_maps(shapes_dir, tmp_path, capsys):
    from caption.commands.main import main

    fit(_config(shapes_dir, "model.blend=hard"), tmp_path / "run", progress_bars=False)
    capsys.readouterr()  # training's epoch lines
    image = sorted((shapes_dir / "images").iterdir())[0]
    assert main(["predict", str(image), "--checkpoint", str(tmp_path / "run"), "--json", "--hard-test", "argmax"]) == 0
    record = json.loads(capsys.readouterr().out)
    for m in record["attention"]:
        assert sorted(sum(m, [])) == [0.0] * 8 + [1.0]
    assert main(["predict", str(image), "--checkpoint", str(tmp_path / "run"), "--json", "--hard-test", "expect"]) == 0
    soft_maps = json.loads(capsys.readouterr().out)["attention"]
    assert any(max(sum(m, [])) < 1.0 for m in soft_maps)


def test_teacher_forcing_returns_the_sampled_cells():
    decoder = _hard(3).train()
    caps = torch.tensor([[START_ID, 5, 6, 7, END_ID], [START_ID, 8, END_ID, 0, 0]])
    out = decoder(torch.randn(2, 9, 16), caps, blend="sample")
    assert out.cells is not None and out.cells.shape == out.mask.shape
    assert int(out.cells[~out.mask].abs().sum()) == 0 and bool((out.cells[out.mask] < 9).all())
    assert decoder(torch.randn(2, 9, 16), caps).cells is None  # blend None: the expectation
