"""Real photos: the shipped model, and the real pipeline on a slice of Flickr8k (../shared/data)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import evaluate_checkpoint
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FLICKR = SHARED / "flickr8k"
PHOTOS = SHARED / "photos"
pytest.importorskip("efficientnet_lite_pytorch", reason="the 'lite' extra (EfficientNet-Lite0) is not installed")


def test_shipped_files_are_small_and_load_without_unpickling():
    from caption.checkpoint import INT8, read_checkpoint
    from caption.inference import GROUNDED_MODEL, SHIPPED_ENSEMBLE, SHIPPED_MODELS

    vocabularies = []
    for path in SHIPPED_MODELS + SHIPPED_ENSEMBLE + (GROUNDED_MODEL,):
        assert path.is_file() and path.stat().st_size <= 25 * 2**20
        raw = torch.load(path, weights_only=True)
        assert all(v.dtype == torch.float16 for v in raw["model"].values())
        if path in SHIPPED_ENSEMBLE + (GROUNDED_MODEL,):  # weight matrices in 8 bits
            assert raw[INT8] and all(q["values"].dtype == torch.int8 for q in raw[INT8].values())
        data = read_checkpoint(path)  # torch.load(weights_only=True) inside
        assert data["encoder"] == "from_config" and data["config"]["model"]["encoder"] == "efficientnet_lite0"
        assert "amp" not in data["config"]["train"]  # today's config format
        vocabularies.append(data["vocab"])
    assert all(v == vocabularies[0] for v in vocabularies)
    assert sum(p.stat().st_size for p in SHIPPED_MODELS[0].parent.glob("*.pt")) <= 60 * 2**20


def test_the_default_is_one_decoder_and_the_shipped_ensemble_loads():
    import caption
    from caption.inference import SHIPPED_ENSEMBLE, SHIPPED_MODELS
    from caption.model.ensemble import EnsembleDecoder

    one = caption.load(guide=False)
    assert not isinstance(one.model.decoder, EnsembleDecoder) and one.paths == SHIPPED_MODELS
    ensemble = caption.load(SHIPPED_ENSEMBLE, guide=False)
    assert isinstance(ensemble.model.decoder, EnsembleDecoder) and len(ensemble.model.decoder.members) == 3
    assert ensemble.name == "+".join(p.name for p in SHIPPED_ENSEMBLE)


def test_the_grounded_model_looks_at_the_dog_the_default_spreads_over_the_photo():
    """The box-supervised model's map for "dog" on the sample photo (two dogs) is sharp and on the dogs;
    the default's is nearly flat (docs/attention.md)."""
    import caption
    from caption.data.images import load_image
    from caption.guidance.detector import load_detector
    from caption.guidance.grounding import LABEL_IDS, cell_masks, detect_full_size
    from caption.inference import GROUNDED_MODEL, SAMPLE_PHOTO

    detector, reason = load_detector(threads=1)
    assert detector is not None, reason
    dogs = cell_masks(detect_full_size(detector, [load_image(SAMPLE_PHOTO)])[0], (7, 7))[LABEL_IDS["dog"]]
    masses = {}
    for name, model in (("default", caption.load(guide=False)), ("grounded", caption.load(GROUNDED_MODEL, guide=False))):
        result = model.caption(SAMPLE_PHOTO)
        t = next(i for i, w in enumerate(result.words) if w in ("dog", "dogs"))
        masses[name] = float(result.alphas[t].flatten()[dogs].sum())
    share = float(dogs.float().mean())
    assert masses["default"] < share + 0.1 and masses["grounded"] > max(0.6, share + 0.25), (masses, share)


@pytest.mark.skipif(not PHOTOS.is_dir(), reason="../shared/data/photos is not beside the checkout")
def test_shipped_model_captions_every_real_photo():
    import caption

    model = caption.load()  # the shipped model is the default
    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in {".jpg", ".bmp", ".png"})
    assert len(photos) >= 10
    results = [o.result for o in model.configured(beam=3).captions(photos)]
    for path, result in zip(photos, results):
        assert not isinstance(result, Exception), (path, result)
        assert result.words and result.caption, path
        spelled = dict(result.guide.spelled) if result.guide else {}  # names the vocabulary lacks, said anyway
        assert all(w in model.vocab or spelled.get(i) == w for i, w in enumerate(result.words)), path
        torch.testing.assert_close(result.alphas.sum((1, 2)), torch.ones(len(result.words)), atol=1e-4, rtol=0)
        assert result.alphas.shape[1:] == (7, 7)


def _slice(src: Path, dst: Path, n: int) -> None:
    data = json.loads(src.read_text())
    images = data["images"][:n]
    keep = {im["id"] for im in images}
    data.update(images=images, annotations=[a for a in data["annotations"] if a["image_id"] in keep])
    dst.write_text(json.dumps(data))


@pytest.mark.skipif(not FLICKR.is_dir(), reason="../shared/data/flickr8k is not beside the checkout")
@pytest.mark.slow
def test_real_pipeline_on_a_slice_of_flickr8k(tmp_path):
    from caption.config import load_config
    from caption.training.loop import fit
    from caption.training.splits import prepare

    _slice(FLICKR / "captions_flickr8k_train.json", tmp_path / "train.json", 200)
    _slice(FLICKR / "captions_flickr8k_dev.json", tmp_path / "dev.json", 40)
    cfg = load_config(Path(__file__).parents[1] / "configs" / "flickr8k.yaml", [
        f"data.train_captions={tmp_path / 'train.json'}", f"data.val_captions={tmp_path / 'dev.json'}",
        f"data.test_captions={tmp_path / 'dev.json'}", f"data.images={FLICKR / 'images'}",
        f"data.cache_dir={tmp_path / 'cache'}", "data.min_freq=2", "model.hidden_dim=128", "model.embed_dim=128",
        "model.attention_dim=128", "train.epochs=3", "train.batch_size=50", "train.lr=2e-3",
    ])
    summary = prepare(cfg, tmp_path / "run")
    assert summary["train_cache"]["images"] == 200 and summary["val_cache"]["images"] == 40
    assert len(list((tmp_path / "cache").glob("*.f16"))) == 2
    fit(cfg, tmp_path / "run", progress_bars=False)
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert len(rows) == 3 and float(rows[-1]["train_xent"]) < float(rows[0]["train_xent"])
    scores = evaluate_checkpoint(tmp_path / "run", split="val", beam=2, java=False, progress=False)
    assert scores["images"] == 40 and {"BLEU-4", "CIDEr", "ROUGE-L"} <= set(scores)
    assert (tmp_path / "run" / "eval" / "captions_val.json").is_file()
    # the run shipped as a small file: decoder in fp16, encoder rebuilt from its package
    from caption.commands.main import main
    from caption.inference import load

    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "small.pt")]) == 0
    data = torch.load(tmp_path / "small.pt", weights_only=True)
    assert data["encoder"] == "from_config" and all(v.dtype == torch.float16 for v in data["model"].values())
    full, small = load(tmp_path / "run", precision="fp32"), load(tmp_path / "small.pt", precision="fp32")
    photos = sorted((FLICKR / "images").iterdir())[:4]
    pairs = [(a.result, b.result) for a, b in zip(full.configured(beam=1).captions(photos),
                                                  small.configured(beam=1).captions(photos))]
    same = [(a, b) for a, b in pairs if a.tokens == b.tokens]  # fp16 weights may flip a near-tie
    assert len(same) >= 3 and all(abs(a.log_prob - b.log_prob) < 0.05 for a, b in same)


def test_export_refuses_a_model_whose_encoder_it_cannot_rebuild(tiny_checkpoint, tmp_path, capsys):
    from caption.commands.main import main

    assert main(["export", str(tiny_checkpoint), "--out", str(tmp_path / "x.pt")]) == 2
    assert "frozen, pretrained encoder" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()


def test_export_ships_decode_defaults_and_refuses_model_settings(tmp_path, capsys):
    from caption.checkpoint import read_checkpoint
    from caption.commands.main import main
    from caption.inference import SHIPPED_MODELS

    out = tmp_path / "member.pt"
    assert main(["export", str(SHIPPED_MODELS[0]), "--out", str(out), "--set", "decode.no_repeat_ngram=3",
                 "--set", "guide.plausible=0.3"]) == 0
    data, before = read_checkpoint(out), read_checkpoint(SHIPPED_MODELS[0])
    assert data["config"]["decode"]["no_repeat_ngram"] == 3 and data["config"]["guide"]["plausible"] == 0.3
    assert all(torch.equal(data["model"][k], before["model"][k]) for k in before["model"])  # the same weights
    assert main(["export", str(SHIPPED_MODELS[0]), "--out", str(tmp_path / "no.pt"), "--set", "model.hidden_dim=8"]) == 2
    assert "model.hidden_dim=8" in capsys.readouterr().err and not (tmp_path / "no.pt").exists()


def test_int8_export_halves_the_file_and_keeps_the_weights_close(tmp_path):
    from caption.checkpoint import INT8, load_checkpoint, read_checkpoint
    from caption.commands.main import main
    from caption.inference import SHIPPED_MODELS

    out = tmp_path / "int8.pt"
    assert main(["export", str(SHIPPED_MODELS[0]), "--out", str(out), "--int8"]) == 0
    assert out.stat().st_size < 0.55 * SHIPPED_MODELS[0].stat().st_size
    raw = torch.load(out, weights_only=True)
    assert raw[INT8] and all(q["values"].dtype == torch.int8 for q in raw[INT8].values())
    data, before = read_checkpoint(out), read_checkpoint(SHIPPED_MODELS[0])
    assert INT8 not in data and set(data["model"]) == set(before["model"])
    for key, value in before["model"].items():  # each row within half a step of its scale
        step = value.float().abs().amax(dim=-1, keepdim=True) / 127 if value.dim() == 2 else 1e-3
        assert ((data["model"][key].float() - value.float()).abs() <= step / 2 + 1e-3).all(), key
    model = load_checkpoint(out).model
    assert sum(p.numel() for p in model.decoder.parameters()) == sum(
        p.numel() for p in load_checkpoint(SHIPPED_MODELS[0]).model.decoder.parameters())
