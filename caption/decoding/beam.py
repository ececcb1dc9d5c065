"""Batched beam search: all images and all K beams as one (B*K)-row batch, through the decoder's ``step``.

The image keys are projected once per image and shared by its beams, never copied per beam.
Scores are sums of log-probabilities; the beams are one bank of the beam core
(:class:`caption.decoding.core.Beams`): a hypothesis that emits ``<end>`` among the top K candidates
is set aside as finished while K live beams go on; an image is done once no live beam can still
beat its best finished hypothesis; at ``max_len`` the live hypotheses compete too, so a result
always exists. The final pick uses ``log_prob / len**length_penalty``. With K=1 this is exactly
greedy search.
"""

from __future__ import annotations

import torch
from torch import nn

from caption.config import DecodeConfig
from caption.decoding.core import Beams
from caption.decoding.results import Hypothesis
from caption.decoding.rules import log_probs


def beam_search(decoder: nn.Module, features: torch.Tensor, options: DecodeConfig, mask=None) -> list[Hypothesis]:
    """Batched beam search: B images x K beams in one (B*K)-row batch; the best per image.

    Before the first word all K beams of an image would be the same, so the first step runs one
    row per image (R = 1) and its top K words start the K beams (R = K from then on).
    """
    memory = decoder.prepare(features, mask)  # keys once per image, shared by its beams
    state = decoder.init_state(memory)  # (B*R, H) with R = 1 row per image
    beams = Beams(features.shape[0], options, memory.values.shape[1], features.device)
    for t in range(options.max_len):
        out = decoder.step(beams.prev, state, memory)
        logp = log_probs(out.logits, t, options, beams.tokens)  # (B*R, V)
        top = beams.top(beams.candidates(logp))  # logp is spent: the candidates are summed into it
        beams.finish(top, out.alpha)
        state = out.state.index(beams.advance([top], out.alpha))
        if beams.done():
            break
    return beams.results(memory)  # never None: a row whose every word is banned may still end
