"""Check a model config before anything is written: every choice and size the model would refuse."""

from __future__ import annotations

import dataclasses

import torch

from caption.config import ModelConfig
from caption.model.captioner import build_model
from caption.vocab import SPECIALS


def check_model_config(cfg: ModelConfig) -> None:
    """Raise the ConfigError that building this model would raise, without allocating weights or
    fetching pretrained ones (the model is built on the meta device with ``weights: none``)."""
    with torch.device("meta"):
        build_model(dataclasses.replace(cfg, weights="none"), len(SPECIALS) + 1)
