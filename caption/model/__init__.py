"""The captioning model: encoder, attention scorers, decoder.

Shape legend used in every ``# (...)`` comment and docstring of the package:
B batch (images), L grid cells (gh * gw), D feature dim, H hidden dim, A attention dim,
E embedding dim, T caption length, V vocabulary size, K beams per image, N rows (B * K).
"""

from caption.model.attention import (
    SCORERS,
    Memory,
    SoftAttention,
    build_scorer,
    register_scorer,
)
from caption.model.captioner import Captioner, build_model
from caption.model.decoder import (
    AttentionDecoder,
    DecoderOutput,
    DecoderState,
    StepOutput,
)
from caption.model.encoder import BACKBONES, Encoder, build_encoder

__all__ = [
    "SCORERS", "Memory", "SoftAttention", "build_scorer", "register_scorer", "Captioner", "build_model",
    "AttentionDecoder", "DecoderOutput", "DecoderState", "StepOutput", "BACKBONES", "Encoder", "build_encoder",
]
