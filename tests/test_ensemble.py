"""Ensembles: several decoders over one encoder decode as one, through each member's own step()."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import TINY_WORDS, make_tiny_checkpoint, tiny_model_config
from PIL import Image

import caption
from caption.checkpoint import CheckpointError, save_checkpoint
from caption.config import Config, DataConfig, DecodeConfig
from caption.decoding import decode
from caption.model import AttentionDecoder, build_model
from caption.model.ensemble import EnsembleDecoder
from caption.vocab import PAD_ID, START_ID, UNK_ID, Vocabulary


def _decoder(seed: int, **overrides) -> AttentionDecoder:
    torch.manual_seed(seed)
    return AttentionDecoder(12, 16, tiny_model_config(**overrides)).eval()


def test_the_step_averages_the_members_log_probabilities_and_maps():
    a, b = _decoder(1), _decoder(2, attention="concat")
    both = EnsembleDecoder([a, b])
    feats = torch.randn(3, 9, 16)
    with torch.no_grad():
        memory, ma, mb = both.prepare(feats), a.prepare(feats), b.prepare(feats)
        prev = torch.full((3,), START_ID)
        out, oa, ob = both.step(prev, both.init_state(memory), memory), a.step(prev, a.init_state(ma), ma), \
            b.step(prev, b.init_state(mb), mb)
    expected = (torch.log_softmax(oa.logits, -1) + torch.log_softmax(ob.logits, -1)) / 2  # (N, V)
    torch.testing.assert_close(out.logits, expected)
    torch.testing.assert_close(out.alpha, (oa.alpha + ob.alpha) / 2)
    torch.testing.assert_close(out.state.members[1].h, ob.state.h)


@pytest.mark.parametrize("options", [DecodeConfig(beam_size=1, max_len=8), DecodeConfig(beam_size=3, max_len=8),
                                     DecodeConfig(beam_size=3, max_len=8, alternatives=True)])
def test_an_ensemble_of_copies_decodes_as_the_single_model(options):
    single = _decoder(3)
    twins = EnsembleDecoder([single, _decoder(3)])
    feats = torch.randn(4, 9, 16)
    for one, two in zip(decode(single, feats, options), decode(twins, feats, options)):
        assert one.tokens == two.tokens and one.log_prob == pytest.approx(two.log_prob, abs=1e-5)
        torch.testing.assert_close(one.alphas, two.alphas)
        assert [alt.tokens for alt in one.alternatives] == [alt.tokens for alt in two.alternatives]


def test_greedy_ensemble_picks_the_argmax_of_the_mean_log_probability():
    a, b = _decoder(4), _decoder(5)
    feats = torch.randn(5, 9, 16)
    first = [r.tokens[0] for r in decode(EnsembleDecoder([a, b]), feats, DecodeConfig(1, 1))]
    with torch.no_grad():
        mean = sum(torch.log_softmax(d.step(torch.full((5,), START_ID), d.init_state(d.prepare(feats)),
                                            d.prepare(feats)).logits, -1) for d in (a, b)) / 2  # (B, V)
    mean[:, [PAD_ID, START_ID, UNK_ID]] = float("-inf")  # never emitted (decode.suppress_unk)
    assert first == mean.argmax(-1).tolist()
    samples = decode(EnsembleDecoder([a, b]), feats, DecodeConfig(temperature=1.0, samples=3, max_len=5))
    assert len(samples) == 15  # sampling runs the ensemble too: 3 captions per image


def _member(path, decoder_seed: int, cfg: Config | None = None, words=TINY_WORDS):
    """A checkpoint whose encoder is the shared seed-0 one and whose decoder is seed ``decoder_seed``'s."""
    cfg = cfg or Config(name="member", data=DataConfig(image_size=32), model=tiny_model_config(),
                        decode=DecodeConfig(beam_size=2, max_len=6))
    vocab = Vocabulary(words)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(vocab))
    torch.manual_seed(decoder_seed)
    model.decoder = build_model(cfg.model, len(vocab)).decoder
    return save_checkpoint(path, model, cfg, vocab)


def test_load_a_list_of_checkpoints_as_an_ensemble(tmp_path):
    a, b = _member(tmp_path / "a.pt", 1), _member(tmp_path / "b.pt", 2)
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (20, 200, 30)).save(image)
    model = caption.load([a, b])
    assert isinstance(model.model.decoder, EnsembleDecoder) and model.name == "a.pt+b.pt"
    result = model.configured(beam=2).caption(image)
    assert result.words and result.alphas.shape[1:] == (3, 3)
    torch.testing.assert_close(result.alphas.sum((1, 2)), torch.ones(len(result.words)))


def test_members_must_share_encoder_grid_and_vocabulary(tmp_path):
    a = _member(tmp_path / "a.pt", 1)
    other_grid = Config(name="g", data=DataConfig(image_size=32), model=tiny_model_config(grid=2))
    cases = {
        "grid": _member(tmp_path / "grid.pt", 2, other_grid),
        "image_size": _member(tmp_path / "size.pt", 2, dataclasses.replace(other_grid, model=tiny_model_config(),
                                                                           data=DataConfig(image_size=48))),
        "vocabularies": _member(tmp_path / "words.pt", 2, words=TINY_WORDS[:-1]),
        "encoder weights": make_tiny_checkpoint(tmp_path / "seed.pt", seed=7),
    }
    for what, path in cases.items():
        with pytest.raises(CheckpointError, match=what):
            caption.load([a, path])


def test_predict_and_attend_take_several_checkpoints(tmp_path, capsys):
    from caption.commands.main import main

    a, b = _member(tmp_path / "a.pt", 1), _member(tmp_path / "b.pt", 2)
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (20, 200, 30)).save(image)
    assert main(["predict", str(image), "--checkpoint", str(a), str(b), "--json"]) == 0
    out = capsys.readouterr()
    assert '"caption"' in out.out and len(out.out.splitlines()) == 1
    assert main(["attend", str(image), "--checkpoint", str(a), str(b), "--out", str(tmp_path / "x.html")]) == 0
    assert (tmp_path / "x.html").stat().st_size > 1000
    other = make_tiny_checkpoint(tmp_path / "other.pt", seed=7)
    assert main(["predict", str(image), "--checkpoint", str(a), str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("caption predict: error: --checkpoint") and "encoder weights" in err[-1]


def test_an_ensembles_results_go_under_runs_eval_by_its_members():
    from pathlib import Path

    from caption.evaluation.evaluate import default_out_dir

    assert default_out_dir(["x/a.pt", "y/b.pt"]) == Path("runs/eval/a+b")
    assert default_out_dir("x/a.pt") == Path("runs/eval/a")
