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


def ban(scores: torch.Tensor, t: int, options: DecodeConfig, tokens: torch.Tensor) -> torch.Tensor:
    """``scores`` (N, V) (logits or log-probabilities) with -inf, set in place, at the words step ``t``
    may not emit: <pad>/<start>, <unk> (when suppressed), <end> before ``min_len``, and words that
    would repeat an n-gram of ``tokens`` (N, t), each row's words so far. A row whose every word is
    ruled out may still end, so no search runs dry. Every search bans through this one function."""
    columns = _banned_columns(t, options)
    repeats = _repeats(tokens, options.no_repeat_ngram)
    if repeats is not None and repeats[0].numel() >= scores.shape[1] - len(columns):  # a row may be stuck
        banned = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)  # (N, V)
        banned[:, columns] = True
        banned[repeats] = True
        banned[:, END_ID] &= ~banned.all(1)
        return scores.masked_fill_(banned, float("-inf"))
    scores[:, columns] = float("-inf")  # column by column, without forming the (N, V) mask
    if repeats is not None:
        scores[repeats] = float("-inf")
    return scores


def log_probs(logits: torch.Tensor, t: int, options: DecodeConfig, tokens: torch.Tensor) -> torch.Tensor:
    """(N, V) fp32 log-softmax of the logits, -inf at the words :func:`ban` rules out."""
    return ban(torch.log_softmax(logits.float(), dim=-1), t, options, tokens)  # (N, V)


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
