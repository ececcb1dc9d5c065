"""scripts/coco_standin.py: COCO's Karpathy split at any size from reused photos, through prepare,
train and evaluate in the Karpathy format (the tiny shapes model stands in for the encoder)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import evaluate_checkpoint

from caption.config import load_config
from caption.data.records import load_coco, load_karpathy
from caption.data.shapes import generate_shapes
from caption.training.loop import fit
from caption.training.splits import prepare

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "coco_standin.py"


def _standin():
    spec = importlib.util.spec_from_file_location("coco_standin", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_split_sizes_are_cocos_at_full_size_and_proportional_below():
    standin = _standin()
    assert standin.split_sizes(123_287) == {"train": 113_287, "val": 5_000, "test": 5_000}
    assert standin.split_sizes(50) == {"train": 46, "val": 2, "test": 2}
    assert standin.split_sizes(12_329) == {"train": 11_329, "val": 500, "test": 500}
    with pytest.raises(ValueError, match="too small"):
        standin.split_sizes(4)


@pytest.mark.slow
def test_n50_goes_through_prepare_train_and_evaluate(tmp_path):
    shapes = tmp_path / "shapes"
    generate_shapes(shapes, n=20, seed=0, image_size=48)
    out = tmp_path / "standin"
    assert _standin().main(["--images", str(shapes / "images"), "--captions", str(shapes / "captions_train.json"),
                            "--out", str(out), "--n", "50"]) == 0
    karpathy = json.loads((out / "dataset_coco.json").read_text())["images"]
    assert [e["split"] for e in karpathy].count("train") == 46 and len(karpathy) == 50
    assert all(len(e["sentences"]) == 5 and (out / "images" / e["filename"]).is_symlink() for e in karpathy)
    test = load_karpathy(out / "dataset_coco.json", out, "test")
    assert test == load_coco(out / "captions_test.json", out / "images")  # the two formats agree
    assert all(r.path.is_file() for r in test)  # the links resolve to real photos
    cfg = load_config(None, [
        "name=standin", "data.format=karpathy", f"data.karpathy_json={out / 'dataset_coco.json'}", f"data.images={out}",
        "data.image_size=48", "data.min_freq=1", f"data.cache_dir={tmp_path / 'cache'}", "precision=fp32",
        "model.encoder=small", "model.small_channels=8", "model.grid=3", "model.embed_dim=8", "model.hidden_dim=16",
        "model.attention_dim=8", "train.epochs=1", "train.batch_size=16", "decode.max_len=8",
    ])
    summary = prepare(cfg, tmp_path / "run")
    assert summary["train_cache"]["images"] == 46 and summary["val_cache"]["images"] == 2
    fit(cfg, tmp_path / "run", progress_bars=False)
    scores = evaluate_checkpoint(tmp_path / "run", split="test", beam=2, java=False, progress=False)
    assert scores["images"] == 2 and "CIDEr" in scores
