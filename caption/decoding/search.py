"""The one decoding loop for greedy search and sampling, and :func:`decode`, the entry point.

:func:`run` feeds each row's previous word to the decoder's ``step`` and lets a small
:class:`TokenPicker` choose the next word from the step's logits: :class:`Argmax` (greedy search)
or :class:`Sampler` (softmax at a temperature). Both see the words ruled out by
:func:`caption.decoding.rules.ban` (``<pad>``/``<start>``, ``<unk>`` when suppressed, ``<end>``
before ``min_len``, words that would repeat an n-gram), as beam search does. Rows stop at ``<end>``
or ``max_len``. Beam search (:mod:`caption.decoding.beam`) scores K candidates per image instead of
picking one word per row, so it has its own loop over the same ``step`` and the same rules.
"""

from __future__ import annotations

import functools
from typing import Callable, Protocol

import torch
from torch import nn

from caption.config import DecodeConfig
from caption.decoding.beam import beam_search
from caption.decoding.results import DecodingResult, Hypothesis, Samples, default_grid, to_result
from caption.decoding.rules import ban, eval_mode, read_cells
from caption.vocab import END_ID, PAD_ID, START_ID, Vocabulary


Ban = Callable[[torch.Tensor], torch.Tensor]  # sets -inf, in place, at the words this step may not emit (N, V)


class TokenPicker(Protocol):
    """Chooses each row's next word: logits (N, V) and the step's ban -> word (N,), log-probs (N, V)."""

    def __call__(self, logits: torch.Tensor, ban: Ban) -> tuple[torch.Tensor, torch.Tensor]:
        ...


class Argmax:
    """Greedy search: the most likely allowed word, scored by the model's own log-probability."""

    def __call__(self, logits: torch.Tensor, ban: Ban) -> tuple[torch.Tensor, torch.Tensor]:
        logp = ban(torch.log_softmax(logits.float(), dim=-1))  # (N, V)
        return logp.argmax(dim=-1), logp


class Sampler:
    """Sampling: a word drawn from softmax(logits / temperature) over the allowed words."""

    def __init__(self, temperature: float, generator: torch.Generator | None = None):
        self.temperature, self.generator = temperature, generator

    def __call__(self, logits: torch.Tensor, ban: Ban) -> tuple[torch.Tensor, torch.Tensor]:
        logp = torch.log_softmax(ban(logits.float() / self.temperature), dim=-1)  # (N, V)
        word = torch.multinomial(logp.detach().exp(), 1, generator=self.generator).squeeze(1)  # (N,)
        return word, logp


def run(decoder: nn.Module, features: torch.Tensor, options: DecodeConfig, pick: TokenPicker, rows: int = 1,
        mask: torch.Tensor | None = None) -> Samples:
    """The one loop: ``rows`` captions per image of features (B, L, D), word by word through the
    decoder's ``step``, each next word chosen by ``pick``. The keys are projected once per image and
    shared by its rows; N = B*rows rows, an image's rows consecutive."""
    B, device = features.shape[0], features.device
    memory = decoder.prepare(features, mask)  # keys once per image, shared by its rows
    state = decoder.init_state(memory, beams=rows)  # (N, H)
    prev = torch.full((B * rows,), START_ID, dtype=torch.long, device=device)
    done = torch.zeros(B * rows, dtype=torch.bool, device=device)
    words, logps, alphas, live = [], [], [], []
    for t in range(options.max_len):
        out = decoder.step(prev, state, memory)
        said = torch.stack(words, 1) if words and options.no_repeat_ngram else prev.new_empty(B * rows, 0)  # (N, t)
        word, logp = pick(out.logits, functools.partial(ban, t=t, options=options, tokens=said))  # (N,), (N, V)
        live.append(~done)
        logps.append(logp.gather(1, word.unsqueeze(1)).squeeze(1).masked_fill(done, 0.0))  # (N,)
        alphas.append(out.alpha.detach().masked_fill(done.unsqueeze(1), 0.0))  # (N, L)
        word = word.masked_fill(done, PAD_ID)
        words.append(word)
        done = done | (word == END_ID)
        prev, state = word, out.state
        if bool(done.all()):
            break
    return Samples(torch.stack(words, 1), torch.stack(logps, 1), torch.stack(live, 1), torch.stack(alphas, 1),
                   None if memory.pool_alpha is None else memory.pool_alpha.detach(), rows)


def greedy_search(decoder: nn.Module, features: torch.Tensor, options: DecodeConfig, mask=None) -> list[Hypothesis]:
    """The most likely word at every step, for a batch of images features (B, L, D)."""
    return run(decoder, features, options, Argmax(), mask=mask).hypotheses()


def sample(decoder: nn.Module, features: torch.Tensor, options: DecodeConfig, *, mask: torch.Tensor | None = None,
           grad: bool = False, generator: torch.Generator | None = None) -> Samples:
    """``options.samples`` captions per image of features (B, L, D), drawn word by word at
    ``options.temperature`` (above 0).

    Samples are drawn in eval mode (no dropout: a dropout mask would make the sampled words and the
    policy being trained differ), under no_grad unless ``grad``; the caller's mode is restored.
    """
    if not options.sampling:
        raise ValueError("sample needs options.temperature > 0")
    with eval_mode(decoder, grad=grad):
        decoder = read_cells(decoder, options.hard_test)
        return run(decoder, features, options, Sampler(options.temperature, generator), options.samples, mask)


def search(decoder: nn.Module, features: torch.Tensor, options: DecodeConfig, mask=None) -> list[Hypothesis]:
    """Greedy search for ``beam_size`` 1, else batched beam search, for features (B, L, D)."""
    if options.beam_size == 1:
        return greedy_search(decoder, features, options, mask)
    return beam_search(decoder, features, options, mask)


def decode(decoder: nn.Module, features: torch.Tensor, options: DecodeConfig, *, vocab: Vocabulary | None = None,
           grid: tuple[int, int] | None = None, mask: torch.Tensor | None = None) -> list[DecodingResult]:
    """Caption every image of features (B, L, D): greedy search for ``beam_size`` 1, else batched
    beam search; with ``options.temperature`` > 0, ``options.samples`` sampled captions per image
    (B*K results, an image's consecutive). Guided captions are :mod:`caption.guidance`'s.

    ``grid`` (gh, gw) reshapes each attention map (default: square); ``vocab`` turns ids into
    words (default: the ids as strings, ``<end>`` named).
    """
    grid = default_grid(features.shape[1]) if grid is None else grid
    with eval_mode(decoder):
        decoder = read_cells(decoder, options.hard_test)
        if options.sampling:
            hyps = run(decoder, features, options, Sampler(options.temperature), options.samples, mask).hypotheses()
        else:
            hyps = search(decoder, features, options, mask)
    return [to_result(h, options, vocab, grid) for h in hyps]
