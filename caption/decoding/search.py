"""Caption generation: greedy and batched beam search behind one interface.

Both strategies use only the decoder's ``prepare`` / ``init_state`` / ``step``. Beam search
runs all images and all K beams as one (B*K)-row batch; the image keys are projected once per
image and shared by its beams, never copied per beam. Scores are sums of log-probabilities;
a hypothesis that emits ``<end>`` among the top K candidates is set aside as finished (and stays
finished) while K live beams go on; an image is done once no live beam can still beat its best
finished hypothesis (log-probabilities only fall as words are added); at ``max_len`` the live
hypotheses compete too, so a result always exists. The final pick uses
``log_prob / len**length_penalty``. With K=1 this is exactly greedy search.

``sample`` draws K captions per image from the softmax (self-critical training, diverse
captions), through the same three calls, K consecutive rows per image sharing its keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from caption.config import DecodeConfig
from caption.vocab import END, END_ID, PAD_ID, SPECIALS, START_ID, UNK_ID, Vocabulary


@dataclass(frozen=True)
class DecodingOptions:
    """How to decode; :meth:`from_config` builds it from a run's ``decode`` section."""

    beam_size: int = 1  # 1 = greedy
    max_len: int = 20  # most words emitted per caption, <end> included
    min_len: int = 0  # <end> is suppressed before this many words
    length_penalty: float = 0.0  # final score = log_prob / len**length_penalty (0: raw log-prob)
    suppress_unk: bool = True  # never emit <unk> (it would show as a gap in the caption)
    no_repeat_ngram: int = 0  # never emit an n-gram of this many words twice in one caption (0: off)
    alternatives: bool = False  # beam search also returns its K-1 runners-up (it then decodes until K are final)

    def __post_init__(self) -> None:
        if self.beam_size < 1 or self.max_len < 1 or self.min_len < 0 or self.no_repeat_ngram < 0:
            raise ValueError(f"invalid decoding options: {self}")

    @classmethod
    def from_config(cls, decode: DecodeConfig, **overrides) -> "DecodingOptions":
        """The run's ``decode`` settings with the given overrides (None keeps the config's value)."""
        values = {f.name: getattr(decode, f.name) for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - set(values))
        if unknown:
            raise TypeError(f"unknown decoding option(s): {', '.join(unknown)}")
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)


@dataclass(frozen=True)
class DecodingResult:
    """One image's caption. ``alphas[t]`` is the attention map used to emit ``words[t]``."""

    tokens: list[int]  # emitted ids, <end> included when emitted, no <start>
    words: list[str]  # one per token ("<end>" for the end token)
    log_prob: float  # sum of the tokens' log-probabilities
    score: float  # log_prob / len(tokens)**length_penalty
    alphas: torch.Tensor  # (T, gh, gw), each map sums to 1
    finished: bool  # False when cut at max_len
    alternatives: tuple["DecodingResult", ...] = ()  # the beam's runners-up, best first (options.alternatives)
    init_alphas: torch.Tensor | None = None  # (gh, gw) the query-free pool h0/c0 came from (model.init_state=attend)

    @property
    def caption(self) -> str:
        return " ".join(w for w in self.words if w not in SPECIALS)


@dataclass(frozen=True)
class _Hyp:
    tokens: list[int]
    log_prob: float
    alphas: torch.Tensor  # (T, L)
    finished: bool
    others: tuple["_Hyp", ...] = ()  # runners-up, best first, when options.alternatives
    init_alpha: torch.Tensor | None = None  # (L,) the image's query-free pool weights (init_state=attend)


@contextlib.contextmanager
def _eval_mode(module: nn.Module, grad: bool = False) -> Iterator[None]:
    """Decode without dropout (and without autograd unless ``grad``), then restore the caller's mode."""
    was_training = module.training
    module.eval()
    try:
        with torch.enable_grad() if grad else torch.no_grad():
            yield
    finally:
        module.train(was_training)


def _log_probs(logits: torch.Tensor, t: int, options: DecodingOptions, tokens: torch.Tensor) -> torch.Tensor:
    """(N, V) log-probabilities with <pad>/<start>, <unk> (optionally), <end> before min_len and
    words that would repeat an n-gram of ``tokens`` (N, t), each row's words so far, ruled out."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    logp[:, PAD_ID] = float("-inf")
    logp[:, START_ID] = float("-inf")
    if options.suppress_unk:
        logp[:, UNK_ID] = float("-inf")
    if t < options.min_len:
        logp[:, END_ID] = float("-inf")
    if options.no_repeat_ngram:
        _block_repeats(logp, tokens, options.no_repeat_ngram)
    return logp


def _block_repeats(logp: torch.Tensor, tokens: torch.Tensor, n: int) -> None:
    """Rule out, in place, each row's words that would complete an n-gram already in its ``tokens`` (N, t)."""
    if tokens.shape[1] < n:  # no complete n-gram yet (n = 1 blocks every word already said)
        return
    grams = tokens.unfold(1, n, 1)  # (N, W, n), every n-gram said so far
    prefix = tokens[:, tokens.shape[1] - n + 1 :]  # (N, n-1), the words the next one would follow
    seen = (grams[:, :, : n - 1] == prefix.unsqueeze(1)).all(-1)  # (N, W), n-grams that start like that
    rows, at = seen.nonzero(as_tuple=True)  # (M,) each
    logp[rows, grams[rows, at, n - 1]] = float("-inf")


def greedy_search(decoder: nn.Module, features: torch.Tensor, options: DecodingOptions, mask=None) -> list[_Hyp]:
    """The most likely word at every step, for a batch of images features (B, L, D)."""
    memory = decoder.prepare(features, mask)
    state = decoder.init_state(memory)
    B = features.shape[0]
    prev = torch.full((B,), START_ID, dtype=torch.long, device=features.device)
    done = torch.zeros(B, dtype=torch.bool, device=features.device)
    words, logps, alphas = [], [], []
    for t in range(options.max_len):
        out = decoder.step(prev, state, memory)
        said = torch.stack(words, 1) if words and options.no_repeat_ngram else prev.new_empty(B, 0)  # (B, t)
        logp, prev = _log_probs(out.logits, t, options, said).max(dim=-1)  # (B,), (B,)
        words.append(prev)
        logps.append(logp.masked_fill(done, 0.0))
        alphas.append(out.alpha)
        done = done | (prev == END_ID)
        state = out.state
        if bool(done.all()):
            break
    tokens = torch.stack(words, 1).tolist()  # (B, T)
    logp_sum = torch.stack(logps, 1).sum(1).tolist()  # (B,)
    alpha = torch.stack(alphas, 1)  # (B, T, L)
    hyps = []
    for b in range(B):
        n = tokens[b].index(END_ID) + 1 if END_ID in tokens[b] else len(tokens[b])
        hyps.append(_Hyp(tokens[b][:n], logp_sum[b], alpha[b, :n], END_ID in tokens[b]))
    return _with_init_alphas(hyps, memory)


def beam_search(decoder: nn.Module, features: torch.Tensor, options: DecodingOptions, mask=None) -> list[_Hyp]:
    """Batched beam search: B images x K beams in one (B*K)-row batch; the best per image.

    Before the first word all K beams of an image would be the same, so the first step runs one
    row per image (R = 1) and its top K words start the K beams (R = K from then on).
    """
    B, K, device = features.shape[0], options.beam_size, features.device
    memory = decoder.prepare(features, mask)  # keys once per image, shared by its beams
    state = decoder.init_state(memory)  # (B*R, H) with R = 1 row per image
    scores = torch.zeros((B, 1), device=device)  # (B, R)
    prev = torch.full((B,), START_ID, dtype=torch.long, device=device)
    tokens = torch.empty((B, 0), dtype=torch.long, device=device)  # (B*R, t)
    alphas = torch.empty((B, 0, memory.values.shape[1]), device=device)  # (B*R, t, L)
    finished: list[list[_Hyp]] = [[] for _ in range(B)]
    norms: list[list[float]] = [[] for _ in range(B)]  # normalised scores of the finished
    need = K if options.alternatives else 1  # finished hypotheses that must be final before stopping
    best_finished = torch.full((B,), float("-inf"), device=device)  # the need-th best of norms
    for t in range(options.max_len):
        out = decoder.step(prev, state, memory)
        logp = _log_probs(out.logits, t, options, tokens)  # (B*R, V)
        (R, V) = scores.shape[1], logp.shape[1]
        cand = logp.view(B, R, V).add_(scores.unsqueeze(-1)).view(B, R * V)  # (B, R*V), in place
        top, idx = cand.topk(min(2 * K, R * V), dim=1)  # (B, C)
        origin, word = idx // V, idx % V  # floor division: row of origin, next word
        rows = torch.arange(B, device=device).unsqueeze(1) * R + origin  # (B, C) rows of B*R
        new_alpha = out.alpha.to(alphas.dtype)  # (B*R, L)
        is_end = word == END_ID
        rank = torch.arange(top.shape[1], device=device)
        fin = is_end & (rank < K) & torch.isfinite(top)  # (B, C)
        for b, j in fin.nonzero().tolist():
            r = int(rows[b, j])
            seq = tokens[r].tolist() + [END_ID]
            maps = torch.cat([alphas[r], new_alpha[r : r + 1]], 0)  # (T, L)
            finished[b].append(_Hyp(seq, float(top[b, j]), maps, True))
            norms[b].append(_normalised(float(top[b, j]), len(seq), options.length_penalty))
            best_finished[b] = heapq.nlargest(need, norms[b])[-1] if len(norms[b]) >= need else float("-inf")
        keep = torch.argsort(is_end.long() * top.shape[1] + rank, dim=1)[:, :K]  # (B, K) best non-<end>
        # R = K rows per image from now on; an <end> kept for lack of other candidates (K above the
        # vocabulary) has finished above, so its row goes on dead (-inf), never as a live beam
        scores = top.gather(1, keep).masked_fill(is_end.gather(1, keep), float("-inf"))  # (B, K)
        sel = rows.gather(1, keep).view(-1)  # (B*K,)
        prev = word.gather(1, keep).view(-1)  # (B*K,)
        tokens = torch.cat([tokens[sel], prev.unsqueeze(1)], 1)  # (B*K, t+1)
        alphas = torch.cat([alphas[sel], new_alpha[sel].unsqueeze(1)], 1)  # (B*K, t+1, L)
        state = out.state.index(sel)
        # best normalised score a live beam could still reach (it can only lose log-probability)
        bound = scores.max(1).values / options.max_len**options.length_penalty  # (B,)
        if bool((best_finished >= bound).all()):
            break
    R = scores.shape[1]  # K, or fewer when the vocabulary has fewer than K words
    return _with_init_alphas([_best(finished[b], scores[b], tokens[b * R : (b + 1) * R], alphas[b * R : (b + 1) * R],
                                    options) for b in range(B)], memory)


def _with_init_alphas(hyps: list[_Hyp], memory) -> list[_Hyp]:
    """Each image's query-free pool weights (memory.pool_alpha (B, L), model.init_state=attend) on
    its hypothesis and runners-up; the hypotheses as they are for the other init states."""
    pool = memory.pool_alpha
    if pool is None:
        return hyps
    return [dataclasses.replace(h, init_alpha=pool[b], others=tuple(dataclasses.replace(o, init_alpha=pool[b])
                                                                     for o in h.others))
            for b, h in enumerate(hyps)]


def _best(finished: list[_Hyp], live_scores, live_tokens, live_alphas, options: DecodingOptions) -> _Hyp:
    """Highest normalised score among the finished and, at the length cap, the live ones; with
    ``options.alternatives`` the next K-1 (finished, or cut at the cap) ride along as ``others``."""
    pool = list(finished)
    for k, s in enumerate(live_scores.tolist()):  # after an early stop these cannot win
        if math.isfinite(s):
            pool.append(_Hyp(live_tokens[k].tolist(), s, live_alphas[k], False))

    def score(h: _Hyp) -> float:
        return _normalised(h.log_prob, len(h.tokens), options.length_penalty)

    best = max(pool, key=score)
    if not options.alternatives:
        return best
    # live beams stopped early are unfinished prefixes, not captions: only those at the cap count
    final = [h for h in pool if h is not best and (h.finished or len(h.tokens) == options.max_len)]
    others = sorted(final, key=score, reverse=True)[: options.beam_size - 1]
    return dataclasses.replace(best, others=tuple(others))


def _normalised(log_prob: float, length: int, length_penalty: float) -> float:
    return log_prob / max(length, 1) ** length_penalty


def decode(
    decoder: nn.Module,
    features: torch.Tensor,
    options: DecodingOptions = DecodingOptions(),
    *,
    vocab: Vocabulary | None = None,
    grid: tuple[int, int] | None = None,
    mask: torch.Tensor | None = None,
) -> list[DecodingResult]:
    """Caption every image of features (B, L, D): greedy when beam_size == 1, else beam search.

    ``grid`` (gh, gw) reshapes each attention map (default: square); ``vocab`` turns ids into
    words (default: the ids as strings, ``<end>`` named).
    """
    grid = _default_grid(features.shape[1]) if grid is None else grid
    with _eval_mode(decoder):
        search = greedy_search if options.beam_size == 1 else beam_search
        hyps = search(decoder, features, options, mask)
    return [_result(h, options, vocab, grid) for h in hyps]


def _result(h: _Hyp, options: DecodingOptions, vocab: Vocabulary | None, grid: tuple[int, int]) -> DecodingResult:
    """A search hypothesis as a DecodingResult, its runners-up included."""
    if vocab is not None:
        words = [vocab.itos[i] for i in h.tokens]
    else:
        words = [END if i == END_ID else str(i) for i in h.tokens]
    return DecodingResult(
        tokens=h.tokens,
        words=words,
        log_prob=h.log_prob,
        score=_normalised(h.log_prob, len(h.tokens), options.length_penalty),
        alphas=h.alphas.float().reshape(len(h.tokens), *grid).cpu(),  # (T, gh, gw)
        finished=h.finished,
        alternatives=tuple(_result(o, options, vocab, grid) for o in h.others),
        init_alphas=None if h.init_alpha is None else h.init_alpha.float().reshape(grid).cpu(),  # (gh, gw)
    )


# ----------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample: K captions per image from the model's softmax at ``temperature``."""

    samples: int = 1  # K captions per image
    temperature: float = 1.0  # softmax(logits / temperature); 1 = the model's own distribution
    max_len: int = 16  # most tokens per caption, <end> included
    min_len: int = 0  # <end> is ruled out before this many words
    suppress_unk: bool = True  # never emit <unk>
    no_repeat_ngram: int = 0  # never emit an n-gram of this many words twice in one caption (0: off)

    def __post_init__(self) -> None:
        if self.samples < 1 or not self.temperature > 0 or self.max_len < 1 or self.min_len < 0 \
                or self.no_repeat_ngram < 0:
            raise ValueError(f"invalid sampling options: {self}")


@dataclass(frozen=True)
class Samples:
    """K sampled captions per image as N = B*K rows, the K rows of an image consecutive (as beams).

    ``log_probs`` are under the distribution sampled from (the options' rules applied, then
    renormalised); they carry gradients when sampled with ``grad=True`` (self-critical training).
    """

    tokens: torch.Tensor  # (N, T) emitted ids, <end> included when emitted, <pad> after it
    log_probs: torch.Tensor  # (N, T) each token's log-probability, 0 at <pad>
    mask: torch.Tensor  # (N, T) bool, True on emitted tokens (<end> included)
    alphas: torch.Tensor  # (N, T, L) attention used for each token, 0 at <pad> (no gradient)
    init_alphas: torch.Tensor | None  # (B, L) the query-free pool weights (model.init_state=attend), else None
    samples: int  # K

    @property
    def lengths(self) -> torch.Tensor:
        """(N,) tokens per caption, <end> included."""
        return self.mask.sum(1)

    def token_lists(self) -> list[list[int]]:
        """Each row's emitted ids (<end> included when emitted)."""
        return [row[:n] for row, n in zip(self.tokens.tolist(), self.lengths.tolist())]

    def results(self, vocab: Vocabulary | None = None, grid: tuple[int, int] | None = None) -> list[DecodingResult]:
        """Each row as a DecodingResult (``score`` is its log-probability), rows in order."""
        grid = _default_grid(self.alphas.shape[-1]) if grid is None else grid
        logp = self.log_probs.detach().sum(1).tolist()  # (N,)
        hyps = [_Hyp(tokens, logp[i], self.alphas[i, : len(tokens)], END_ID in tokens,
                     init_alpha=None if self.init_alphas is None else self.init_alphas[i // self.samples])
                for i, tokens in enumerate(self.token_lists())]
        return [_result(h, DecodingOptions(), vocab, grid) for h in hyps]


def _default_grid(L: int) -> tuple[int, int]:
    side = math.isqrt(L)
    return (side, side) if side * side == L else (1, L)


def sample(
    decoder: nn.Module, features: torch.Tensor, options: SamplingOptions = SamplingOptions(), *,
    mask: torch.Tensor | None = None, grad: bool = False, generator: torch.Generator | None = None,
) -> Samples:
    """K = options.samples captions per image of features (B, L, D), drawn word by word.

    The image keys are projected once and shared by its K samples, as beam search shares them.
    Samples are drawn in eval mode (no dropout: a dropout mask would make the sampled words and the
    policy being trained differ), under no_grad unless ``grad``; the caller's mode is restored.
    """
    with _eval_mode(decoder, grad=grad):
        return _sample(decoder, features, options, mask, generator)


def _sample(decoder: nn.Module, features: torch.Tensor, options: SamplingOptions, mask, generator) -> Samples:
    B, K, device = features.shape[0], options.samples, features.device
    memory = decoder.prepare(features, mask)  # keys once per image, shared by its K samples
    state = decoder.init_state(memory, beams=K)  # (B*K, H), K consecutive rows per image
    prev = torch.full((B * K,), START_ID, dtype=torch.long, device=device)
    done = torch.zeros(B * K, dtype=torch.bool, device=device)
    words, logps, alphas, live = [], [], [], []
    for t in range(options.max_len):
        out = decoder.step(prev, state, memory)
        said = torch.stack(words, 1) if words and options.no_repeat_ngram else prev.new_empty(B * K, 0)  # (N, t)
        logp = _sampling_log_probs(out.logits, t, options, said)  # (N, V)
        word = torch.multinomial(logp.detach().exp(), 1, generator=generator).squeeze(1)  # (N,)
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
                   None if memory.pool_alpha is None else memory.pool_alpha.detach(), K)


def _sampling_log_probs(logits: torch.Tensor, t: int, options: SamplingOptions, tokens: torch.Tensor) -> torch.Tensor:
    """(N, V) log-softmax of logits / temperature over the words the options allow (as in search)."""
    banned = torch.isneginf(_log_probs(logits.detach(), t, options, tokens))  # (N, V)
    banned[:, END_ID] &= ~banned.all(1)  # a row whose every word is ruled out (no_repeat_ngram) may still end
    return torch.log_softmax((logits.float() / options.temperature).masked_fill(banned, float("-inf")), dim=-1)
