"""What every decoding strategy shares: eval mode for the decoder, and the words a step may not emit."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from caption.config import DecodeConfig
from caption.vocab import END_ID, PAD_ID, START_ID, UNK_ID


@contextlib.contextmanager
def eval_mode(module: nn.Module, grad: bool = False) -> Iterator[None]:
    """Decode without dropout (and without autograd unless ``grad``), then restore the caller's mode."""
    was_training = module.training
    module.eval()
    try:
        with torch.enable_grad() if grad else torch.no_grad():
            yield
    finally:
        module.train(was_training)


def _banned_columns(t: int, options: DecodeConfig) -> list[int]:
    """The words no row may emit at step ``t``: <pad>/<start>, <unk> (when suppressed), <end> before ``min_len``."""
    return [PAD_ID, START_ID] + ([UNK_ID] if options.suppress_unk else []) + ([END_ID] if t < options.min_len else [])


def _repeats(tokens: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows, words) (M,) each: the words that would repeat an n-gram of ``tokens`` (N, t) in their row."""
    if not n or tokens.shape[1] < n:  # no complete n-gram yet (n = 1 bans every word already said)
        return None
    grams = tokens.unfold(1, n, 1)  # (N, W, n), every n-gram said so far
    prefix = tokens[:, tokens.shape[1] - n + 1 :]  # (N, n-1), the words the next one would follow
    seen = (grams[:, :, : n - 1] == prefix.unsqueeze(1)).all(-1)  # (N, W), n-grams that start like that
    rows, at = seen.nonzero(as_tuple=True)  # (M,) each
    return rows, grams[rows, at, n - 1]


def banned_words(vocab_size: int, t: int, options: DecodeConfig, tokens: torch.Tensor) -> torch.Tensor:
    """(N, V) bool, True for the words step ``t`` may not emit: <pad>/<start>, <unk> (when
    suppressed), <end> before ``min_len``, and words that would repeat an n-gram of ``tokens``
    (N, t), each row's words so far."""
    banned = torch.zeros(tokens.shape[0], vocab_size, dtype=torch.bool, device=tokens.device)  # (N, V)
    banned[:, _banned_columns(t, options)] = True
    repeats = _repeats(tokens, options.no_repeat_ngram)
    if repeats is not None:
        banned[repeats] = True
    return banned


def log_probs(logits: torch.Tensor, t: int, options: DecodeConfig, tokens: torch.Tensor) -> torch.Tensor:
    """(N, V) fp32 log-softmax of the logits, -inf at the words :func:`banned_words` rules out
    (set in place, column by column, without forming the (N, V) mask)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    logp[:, _banned_columns(t, options)] = float("-inf")
    repeats = _repeats(tokens, options.no_repeat_ngram)
    if repeats is not None:
        logp[repeats] = float("-inf")
    return logp


class _ReadCells:
    """A decoder whose ``prepare`` reads the cells as ``blend`` says; everything else is the decoder's."""

    def __init__(self, decoder: nn.Module, blend: str):
        self.decoder, self.blend = decoder, blend

    def prepare(self, features: torch.Tensor, mask: torch.Tensor | None = None):
        return self.decoder.prepare(features, mask, blend=self.blend)

    def __getattr__(self, name: str):
        return getattr(self.decoder, name)


def read_cells(decoder: nn.Module, hard_test: str):
    """The decoder as every search reads it: a hard-attention decoder (``model.blend=hard``) reads
    its most likely cell per word (``decode.hard_test=argmax``: one-hot maps) or the expectation
    (``expect``); a soft decoder is returned as it is."""
    return _ReadCells(decoder, hard_test) if _is_hard(decoder) else decoder


def _is_hard(decoder: nn.Module) -> bool:
    members = getattr(decoder, "members", None)
    return any(_is_hard(m) for m in members) if members is not None else bool(getattr(decoder, "hard", False))
