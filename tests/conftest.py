"""Shared fixtures: tiny configs and models that run on CPU in milliseconds."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from caption.config import Config, ModelConfig, load_config
from caption.data.shapes import generate_shapes


def tiny_model_config(attention: str = "additive", **overrides) -> ModelConfig:
    """A decoder small enough to train in a second; dot attention needs hidden == feature dim."""
    cfg = ModelConfig(
        encoder="small", grid=3, small_channels=16, attention=attention,
        embed_dim=16, hidden_dim=16 if attention == "dot" else 24, attention_dim=12, dropout=0.0,
    )
    return dataclasses.replace(cfg, **overrides)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny models: thread hand-offs cost more than they save
    yield


# ----------------------------------------------------------------------------- tiny checkpoints

TINY_WORDS = ("a", "red", "blue", "green", "circle", "square", "triangle", "left", "of", "the")


def make_tiny_checkpoint(path, attention: str = "additive", seed: int = 0):
    """An untrained checkpoint (small CNN, 32-pixel images, 3x3 grid, 14 words) written to ``path``.

    Its captions are arbitrary but valid, which is all the inference plumbing tests need.
    """
    from caption.checkpoint import save_checkpoint
    from caption.config import Config, DataConfig, DecodeConfig
    from caption.model import build_model
    from caption.vocab import Vocabulary

    cfg = Config(name=f"tiny-{attention}", data=DataConfig(image_size=32),
                 model=tiny_model_config(attention), decode=DecodeConfig(beam_size=2, max_len=6))
    vocab = Vocabulary(TINY_WORDS)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model(cfg.model, len(vocab))
    return save_checkpoint(path, model, cfg, vocab)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of a tiny untrained checkpoint file, shared by the whole test session."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_run") / "best.pt")


@dataclass
class FakeResult:
    """Stand-in for caption.decoding.DecodingResult: the fields the overlays and the viewer read."""

    words: list[str]
    alphas: Any
    caption: str
    log_prob: float
    alternatives: tuple = ()
    init_alphas: Any = None


# ----------------------------------------------------------------------------- shapes runs


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes(out, n=40, seed=1, image_size=48)
    return out


def tiny_config(shapes_dir, *overrides: str) -> Config:
    data = [f"data.{s}_captions={shapes_dir}/captions_{s}.json" for s in ("train", "val", "test")]
    return load_config(None, [
        "name=tiny", "data.format=coco", f"data.images={shapes_dir}/images", "data.image_size=48", "data.min_freq=1",
        "data.metric=shapes",
        "model.encoder=small", "model.small_channels=8", "model.grid=3", "model.embed_dim=8", "model.hidden_dim=16",
        "model.attention_dim=8", "model.dropout=0.3", "model.fine_tune=true", "model.fine_tune_blocks=4",
        "train.epochs=2", "train.batch_size=16", "train.lr=0.003", "train.encoder_lr=0.003", "train.amp=false",
        "decode.max_len=12", *data, *overrides,
    ])


class Killed(Exception):
    """Raised from an ``on_step`` callback to stop a training mid-run (resume tests)."""


def evaluate_checkpoint(checkpoint, **kwargs) -> dict:
    """``caption.evaluation.evaluate.evaluate`` of a checkpoint loaded by ``caption.load``."""
    from caption.evaluation.evaluate import evaluate
    from caption.inference import load

    return evaluate(load(checkpoint), checkpoint=checkpoint, **kwargs)
