"""Batched beam search: all images and all K beams as one (B*K)-row batch, through the decoder's ``step``.

The image keys are projected once per image and shared by its beams, never copied per beam.
Scores are sums of log-probabilities; a hypothesis that emits ``<end>`` among the top K candidates
is set aside as finished (and stays finished) while K live beams go on; an image is done once no
live beam can still beat its best finished hypothesis (log-probabilities only fall as words are
added); at ``max_len`` the live hypotheses compete too, so a result always exists. The final pick
uses ``log_prob / len**length_penalty``. With K=1 this is exactly greedy search.
"""

from __future__ import annotations

import dataclasses
import heapq
import math

import torch
from torch import nn

from caption.config import DecodeConfig
from caption.decoding.results import Hypothesis, normalised
from caption.decoding.rules import log_probs
from caption.vocab import END_ID, START_ID


def beam_search(decoder: nn.Module, features: torch.Tensor, options: DecodeConfig, mask=None) -> list[Hypothesis]:
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
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    norms: list[list[float]] = [[] for _ in range(B)]  # normalised scores of the finished
    need = K if options.alternatives else 1  # finished hypotheses that must be final before stopping
    best_finished = torch.full((B,), float("-inf"), device=device)  # the need-th best of norms
    for t in range(options.max_len):
        out = decoder.step(prev, state, memory)
        logp = log_probs(out.logits, t, options, tokens)  # (B*R, V)
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
            finished[b].append(Hypothesis(seq, float(top[b, j]), maps, True))
            norms[b].append(normalised(float(top[b, j]), len(seq), options.length_penalty))
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


def _with_init_alphas(hyps: list[Hypothesis], memory) -> list[Hypothesis]:
    """Each image's query-free pool weights (memory.pool_alpha (B, L), model.init_state=attend) on
    its hypothesis and runners-up; the hypotheses as they are for the other init states."""
    pool = memory.pool_alpha
    if pool is None:
        return hyps
    return [dataclasses.replace(h, init_alpha=pool[b], others=tuple(dataclasses.replace(o, init_alpha=pool[b])
                                                                     for o in h.others))
            for b, h in enumerate(hyps)]


def _best(finished: list[Hypothesis], live_scores, live_tokens, live_alphas, options: DecodeConfig) -> Hypothesis:
    """Highest normalised score among the finished and, at the length cap, the live ones; with
    ``options.alternatives`` the next K-1 (finished, or cut at the cap) ride along as ``others``."""
    pool = list(finished)
    for k, s in enumerate(live_scores.tolist()):  # after an early stop these cannot win
        if math.isfinite(s):
            pool.append(Hypothesis(live_tokens[k].tolist(), s, live_alphas[k], False))

    def score(h: Hypothesis) -> float:
        return normalised(h.log_prob, len(h.tokens), options.length_penalty)

    best = max(pool, key=score)
    if not options.alternatives:
        return best
    # live beams stopped early are unfinished prefixes, not captions: only those at the cap count
    final = [h for h in pool if h is not best and (h.finished or len(h.tokens) == options.max_len)]
    others = sorted(final, key=score, reverse=True)[: options.beam_size - 1]
    return dataclasses.replace(best, others=tuple(others))
