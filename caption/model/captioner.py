"""The whole captioner: encoder + decoder, and the one place that builds it from a config."""

from __future__ import annotations

import torch
from torch import nn

from caption.config import ModelConfig
from caption.model.decoder import AttentionDecoder, DecoderOutput
from caption.model.encoder import Encoder


class Captioner(nn.Module):
    """images (B, 3, S, S) -> features (B, L, D) -> words; ``grid`` reshapes alphas to (gh, gw)."""

    def __init__(self, encoder: Encoder, decoder: AttentionDecoder):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    @property
    def grid(self) -> tuple[int, int]:
        return self.encoder.grid

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)  # (B, L, D)

    def forward(self, inputs: torch.Tensor, captions: torch.Tensor, *, features: bool = False) -> DecoderOutput:
        """Teacher forcing on images (B, 3, S, S), or on cached features (B, L, D) with ``features=True``."""
        return self.decoder(inputs if features else self.encode(inputs), captions)


def build_model(cfg: ModelConfig, vocab_size: int) -> Captioner:
    """Encoder and decoder sized for this config and vocabulary."""
    encoder = Encoder(cfg)
    return Captioner(encoder, AttentionDecoder(vocab_size, encoder.out_dim, cfg))
