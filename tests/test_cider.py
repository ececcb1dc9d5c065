"""CIDEr-D in-process equals pycocoevalcap's Cider when both count n-gram frequencies over the same references."""

from __future__ import annotations

import contextlib
import io
import random

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from caption.evaluation.cider import CiderD, ngram_counts

WORDS = "a the dog man woman runs on in grass with red ball two people water street".split()


def _caption(rng: random.Random, lo: int = 0, hi: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _pycoco(gts: dict, res: dict) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        return Cider().compute_score(gts, res)[1]


def test_equals_pycocoevalcap_with_the_same_document_frequencies():
    rng = random.Random(0)
    # candidates of every length (empty and one-word ones included), 1-6 references per image
    gts = {i: [_caption(rng, 1) for _ in range(rng.randint(1, 6))] for i in range(60)}
    res = {i: [_caption(rng)] for i in range(60)}
    res[3] = [gts[3][0]]  # one candidate equal to a reference
    res[4] = [gts[4][0] + " " + gts[4][0]]  # one saying it twice (clipping)
    expected = _pycoco(gts, res)
    cider = CiderD([[ref.split() for ref in gts[i]] for i in gts])
    got = [cider.score(res[i][0].split(), [ref.split() for ref in gts[i]]) for i in gts]
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    assert max(got) > 1.0  # not all trivially zero


def test_real_style_captions_and_prepared_references():
    gts = {
        1: ["a black dog runs through the grass", "a dog is running in a field", "the black dog is running outside"],
        2: ["two children play in the water", "kids splash in a pool", "two kids are swimming in the pool"],
        3: ["a man rides a bike down the street", "a cyclist on a city street", "a man on a bicycle"],
    }
    res = {1: ["a black dog is running in the grass"], 2: ["two children are playing in a pool"],
           3: ["a man in a red shirt and a red shirt"]}
    expected = _pycoco(gts, res)
    cider = CiderD([[r.split() for r in gts[i]] for i in gts])
    prepared = {i: cider.references(r.split() for r in gts[i]) for i in gts}
    got = cider.scores([res[i][0].split() for i in gts], [prepared[i] for i in gts])
    np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_frequencies_are_fixed_by_the_corpus_not_by_what_is_scored():
    refs = [["a", "dog", "runs"], ["a", "dog", "sits"]]
    small = CiderD([refs])  # one document: every n-gram has idf 0, so nothing scores
    assert small.score(["a", "dog", "runs"], refs) == 0.0
    corpus = [refs] + [[["a", "cat", "sleeps"]], [["a", "bird", "flies"]], [["people", "walk"]]]
    big = CiderD(corpus)
    assert big.documents == 4 and big.score(["a", "dog", "runs"], refs) > 1.0
    # the same corpus scores the same whatever candidates come later
    assert big.score(["a", "dog", "runs"], refs) == CiderD(corpus).score(("a", "dog", "runs"), refs)


def test_ids_work_like_words_and_unseen_ngrams_get_the_largest_idf():
    corpus = [[[5, 6, 7, 2]], [[5, 8, 9, 2]], [[10, 11, 2]]]
    cider = CiderD(corpus)
    vec = cider.vector([5, 12, 2])
    assert vec.weights[(12,)] == pytest.approx(cider.log_documents)  # never seen: idf = log N
    assert vec.weights[(5,)] == pytest.approx(cider.log_documents - np.log(2))
    assert vec.length == 2  # pycocoevalcap's length: the bigrams
    assert ngram_counts([1, 1, 1], 2) == {(1,): 3, (1, 1): 2}


def test_clipping_and_length_penalty():
    refs = [["a", "dog", "on", "the", "grass"], ["a", "brown", "dog", "on", "grass"]]
    corpus = [refs, [["a", "cat"]], [["the", "man", "walks"]], [["grass", "field"]]]
    cider = CiderD(corpus)
    good = cider.score(["a", "dog", "on", "the", "grass"], refs)
    assert cider.score(["dog", "dog", "dog", "dog", "dog"], refs) < good
    assert cider.score(["a", "dog", "on", "the", "grass", "a", "dog", "on", "the", "grass"], refs) < good
    with pytest.raises(ValueError):
        CiderD([])
