"""Shared fixtures: tiny configs and models that run on CPU in milliseconds."""

from __future__ import annotations

import dataclasses

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
    yield
