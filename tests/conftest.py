"""Shared fixtures: tiny configs and models that run on CPU in milliseconds."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from caption.config import ModelConfig


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
