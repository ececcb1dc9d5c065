"""The whole captioner: encoder + decoder, and the one place that builds it from a config."""

from __future__ import annotations

from typing import Any, Callable

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

    def forward(self, inputs: torch.Tensor, captions: torch.Tensor | None = None, *, features: bool = False,
                rows: torch.Tensor | None = None, blend: str | None = None,
                run: Callable[[AttentionDecoder, torch.Tensor], Any] | None = None) -> DecoderOutput | Any:
        """Teacher forcing on images (U, 3, S, S), or on cached features (U, L, D) with ``features=True``.

        ``rows`` (B,) names the image of each of the B captions (several captions may share one,
        which is then encoded once); without it caption b belongs to image b. ``blend``: how a
        hard-attention decoder reads the cells (:meth:`AttentionDecoder.prepare`). ``run(decoder,
        features)`` replaces teacher forcing (self-critical training samples this way, so that a
        DistributedDataParallel wrapper sees the forward pass and averages the gradients).
        """
        feats = inputs if features else self.encode(inputs)  # (U, L, D)
        if run is not None:
            return run(self.decoder, feats)
        feats = feats if rows is None else feats.index_select(0, rows)  # (B, L, D)
        return self.decoder(feats, captions, blend=blend)


def build_model(cfg: ModelConfig, vocab_size: int) -> Captioner:
    """Encoder and decoder sized for this config and vocabulary."""
    encoder = Encoder(cfg)
    return Captioner(encoder, AttentionDecoder(vocab_size, encoder.out_dim, cfg))
