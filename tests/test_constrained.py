"""Constrained beam search against brute-force enumeration on a tiny vocabulary."""


import pytest
import torch
from conftest import tiny_model_config

from caption.decoding import DecodeConfig, beam_search, decode
from caption.decoding.constrained import Constraint, constrained_beam_search
from caption.model import AttentionDecoder
from caption.vocab import END_ID

WORDS = (4, 5, 6)  # the real words of a 7-word vocabulary (4 specials first)


def _decoder(seed: int, vocab: int = 7):
    torch.manual_seed(seed)
    decoder = AttentionDecoder(vocab, 16, tiny_model_config()).eval()
    with torch.no_grad():
        decoder.out.bias[END_ID] += 1.0  # captions that like to end early: the constraint must fight that
    return decoder


def _all_captions(decoder, feats, max_len, constraint):
    """Every caption of at most max_len tokens (those cut at max_len included) with its
    log-probability and, per position, whether it was a noun slot for ``constraint``, by stepping
    all prefixes of each length as one batch."""
    memory = decoder.prepare(feats)
    prefixes, totals, slots = [[]], torch.zeros(1), [[]]
    state, prev = decoder.init_state(memory, beams=1), torch.tensor([1])
    captions = []
    for n in range(1, max_len + 1):
        out = decoder.step(prev, state, memory.index(torch.zeros(len(prefixes), dtype=torch.long)))
        logp = torch.log_softmax(out.logits, -1)  # (prefixes, V)
        mass = logp.exp()[:, list(constraint.slot_words)].sum(1)
        slots = [s + [float(m) >= constraint.slot_mass] for s, m in zip(slots, mass)]
        for i, seq in enumerate(prefixes):
            for last in ([END_ID] + list(WORDS)) if n == max_len else [END_ID]:
                captions.append((seq + [last], float(totals[i] + logp[i, last]), slots[i]))
        grow = [(i, w) for i in range(len(prefixes)) for w in WORDS]
        rows = torch.tensor([i for i, _ in grow])
        prefixes, slots = [prefixes[i] + [w] for i, w in grow], [slots[i] for i, _ in grow]
        totals = totals[rows] + logp[rows, torch.tensor([w for _, w in grow])]
        state, prev = out.state.index(rows), torch.tensor([w for _, w in grow])
    return captions


def _exhaustive(decoder, feats, constraint, max_len, length_penalty=0.0, min_len=0):
    """(normalised ranking score, log-probability, tokens) of the best caption of at most max_len
    tokens (and at least min_len words) that satisfies ``constraint``, by enumerating them all."""
    best = (float("-inf"), float("-inf"), None)
    with torch.no_grad():
        for seq, lp, slots in _all_captions(decoder, feats, max_len, constraint):
            if constraint.satisfied_by(seq, slots) and (seq[-1] != END_ID or len(seq) > min_len):
                ranked = lp - constraint.penalty * sum(w in constraint.penalized for w in seq)
                best = max(best, (ranked / len(seq) ** length_penalty, lp, seq))
    return best


CASES = [
    Constraint(((5,),)),  # one word, anywhere
    Constraint(((5,), (6,))),  # a disjunction
    Constraint(((6,),), within=1),  # the caption must start with it
    Constraint(((4, 6), (5,)), within=2),  # a two-word phrase or a word, starting in the first two
    Constraint(((4,),), penalized=(5,), penalty=1.5),  # a word to say, another one penalised
    Constraint(((5,), (4, 6)), slot_words=(4, 6), slot_mass=0.25),  # only where 4 and 6 are likely
    Constraint(((6, 4, 5), (5, 5, 6)), within=2),  # three-word phrases
    Constraint(((5,), (6, 4)), slot_words=(4, 5), slot_mass=0.2, end_phrase=True),  # the phrase ends its noun phrase
    Constraint(((5,), (6, 4)), not_after=((4, 6), (5,))),  # 5 never after 4 or 6, "6 4" never after 5
]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_wide_constrained_beam_finds_the_exact_best_satisfying_caption(case, length_penalty):
    """With K beams per state above every live prefix, the search is exhaustive over the captions
    that satisfy the constraint: the same caption, log-probability and score as brute force."""
    constraint = CASES[case]
    options = DecodeConfig(beam_size=40, max_len=4, length_penalty=length_penalty)
    found_some, changed = False, False
    for seed in range(3):
        decoder = _decoder(seed)
        feats = torch.randn(3, 9, 16)
        with torch.no_grad():
            found = constrained_beam_search(decoder, feats, options, [constraint] * 3)
            plain = decode(decoder, feats, options)
        for i, hyp in enumerate(found):
            score, log_prob, seq = _exhaustive(decoder, feats[i : i + 1], constraint, 4, length_penalty)
            if seq is None:  # no caption satisfies it (a noun slot never comes): none is returned
                assert hyp is None
                continue
            found_some, changed = True, changed or plain[i].tokens != seq
            assert hyp is not None and hyp.tokens == seq
            assert constraint.satisfied_by(hyp.tokens)
            assert hyp.log_prob == pytest.approx(log_prob, abs=1e-4)  # the model's own, not the penalised one
    assert found_some and changed  # the constraint is met, and it has something to do


def test_a_penalty_alone_ranks_the_captions_it_lowers():
    """A constraint without phrases only penalises words: the widest search finds the caption that
    is best once the penalty is taken off, which is not the plain best."""
    constraint = Constraint((), penalized=(4, 6), penalty=2.0)
    options = DecodeConfig(beam_size=40, max_len=4, min_len=3)
    changed = False
    for seed in range(3):
        decoder, feats = _decoder(seed), torch.randn(3, 9, 16)
        with torch.no_grad():
            found = constrained_beam_search(decoder, feats, options, [constraint] * 3)
            plain = decode(decoder, feats, options)
        for i, hyp in enumerate(found):
            _, log_prob, seq = _exhaustive(decoder, feats[i : i + 1], constraint, 4, min_len=3)
            assert hyp.tokens == seq and hyp.log_prob == pytest.approx(log_prob, abs=1e-4)
            changed |= plain[i].tokens != seq
    assert changed


def test_each_image_keeps_its_own_constraint_in_a_batch():
    decoder, feats = _decoder(0), torch.randn(4, 9, 16)
    constraints = [Constraint(((4,),)), Constraint(((5,),), within=1), Constraint(((6,),)), Constraint(((4, 5),))]
    options = DecodeConfig(beam_size=3, max_len=6)
    with torch.no_grad():
        batched = constrained_beam_search(decoder, feats, options, constraints)
        for i, c in enumerate(constraints):
            (single,) = constrained_beam_search(decoder, feats[i : i + 1], options, [c])
            assert batched[i].tokens == single.tokens and c.satisfied_by(single.tokens)
            assert batched[i].log_prob == pytest.approx(single.log_prob, abs=1e-4)
            assert batched[i].alphas.shape == (len(single.tokens), 9)


def test_one_beam_per_state_still_says_a_phrase_the_model_would_not():
    """A phrase's first words wait in state 1 (under way) instead of competing with free captions,
    so even K = 1 reaches a three-word phrase."""
    decoder, feats = _decoder(3), torch.randn(4, 9, 16)
    constraint = Constraint(((6, 6, 4),))
    with torch.no_grad():
        plain = decode(decoder, feats, DecodeConfig(beam_size=1, max_len=6))
        found = constrained_beam_search(decoder, feats, DecodeConfig(beam_size=1, max_len=6), [constraint] * 4)
    assert not any(constraint.satisfied_by(p.tokens) for p in plain)
    assert all(h is not None and constraint.satisfied_by(h.tokens) and h.tokens[-1] == END_ID for h in found)


def test_unsatisfiable_in_time_gives_none():
    """A phrase longer than max_len allows cannot be said: no caption, and no crash."""
    decoder, feats = _decoder(1), torch.randn(2, 9, 16)
    with torch.no_grad():
        found = constrained_beam_search(decoder, feats, DecodeConfig(beam_size=2, max_len=2),
                                        [Constraint(((4, 5, 6),)), Constraint(((5,),))])
    assert found[0] is None and found[1] is not None and 5 in found[1].tokens


def test_a_constraint_the_caption_already_meets_changes_nothing():
    """When the unconstrained best caption already says the word, the constrained search with the
    same K returns it (the satisfied bank holds what plain beam search would keep)."""
    decoder, feats = _decoder(2), torch.randn(6, 9, 16)
    options = DecodeConfig(beam_size=40, max_len=4)
    with torch.no_grad():
        plain = decode(decoder, feats, options)
        constraints = [Constraint(((r.tokens[0],),)) for r in plain]
        guided = constrained_beam_search(decoder, feats, options, constraints)
    assert [g.tokens for g in guided] == [p.tokens for p in plain]


@pytest.mark.parametrize("options", [DecodeConfig(beam_size=1, max_len=6), DecodeConfig(beam_size=3, max_len=8),
                                     DecodeConfig(beam_size=4, max_len=7, length_penalty=1.0, alternatives=True),
                                     DecodeConfig(beam_size=5, max_len=6, min_len=2, no_repeat_ngram=2, alternatives=True),
                                     DecodeConfig(beam_size=12, max_len=4, length_penalty=0.5)])
def test_an_empty_constraint_is_plain_beam_search(options):
    """A constraint that asks nothing (no phrase, no penalty) holds every caption from the start:
    its held bank is plain beam search's one bank, so the captions, log-probabilities, maps and
    runners-up are plain beam search's, exactly."""
    for seed in range(3):
        decoder, feats = _decoder(seed), torch.randn(4, 9, 16)
        with torch.no_grad():
            plain = beam_search(decoder, feats, options)
            found = constrained_beam_search(decoder, feats, options, [Constraint(())] * 4)
        for p, c in zip(plain, found):
            for a, b in zip((p, *p.others), (c, *c.others), strict=True):
                assert a.tokens == b.tokens and a.log_prob == b.log_prob and a.finished == b.finished
                assert torch.equal(a.alphas, b.alphas)


def test_constraint_checks_its_arguments():
    with pytest.raises(ValueError):
        Constraint(((),))
    with pytest.raises(ValueError):
        Constraint(((4,),), within=-1)
    assert Constraint(((4, 5),), within=2).satisfied_by([6, 4, 5, END_ID])
    assert not Constraint(((4, 5),), within=1).satisfied_by([6, 4, 5, END_ID])
