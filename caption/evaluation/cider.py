"""CIDEr-D in-process, with document frequencies fixed once: the reward of self-critical training.

The formula is pycocoevalcap's ``Cider`` (which is CIDEr-D, Vedantam et al. 2015): each caption
becomes tf-idf vectors of its 1- to 4-grams, idf = log(documents) - log(max(1, df)); a candidate's
similarity to a reference is, for each n, sum over the candidate's n-grams of
min(w_cand, w_ref) * w_ref (clipped counts) divided by both vectors' norms, times a Gaussian
length penalty exp(-delta^2 / (2 sigma^2)) with sigma = 6; the score is the mean over n, averaged
over the references, times 10. Lengths follow pycocoevalcap exactly: it counts a caption's
bigrams (words - 1) as its length.

pycocoevalcap counts document frequencies over the references it is handed, every call. Here
they are counted once, from a corpus given up front (the *training* references for a reward:
frequencies from one minibatch would make rare n-grams of ~32 images look informative and inflate
CIDEr to ~3). Tokens are any hashable values: words, or vocabulary ids (``caption.scst`` scores
id sequences with ``<end>`` kept). tests/test_cider.py checks the scores equal pycocoevalcap's
when both take their frequencies from the same tokenised references.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Hashable, Iterable, Sequence

NGram = tuple[Hashable, ...]


def ngram_counts(tokens: Sequence[Hashable], n: int = 4) -> Counter:
    """How often each 1- to n-gram of ``tokens`` occurs."""
    tokens = tuple(tokens)
    return Counter(tokens[i : i + k] for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


@dataclass(frozen=True)
class TfIdf:
    """One caption as CIDEr sees it: tf-idf weight of each n-gram, the norm per order, its length."""

    weights: dict  # n-gram -> tf * idf
    norms: tuple[float, ...]  # (n,) Euclidean norm of the order-k part, k = 1..n
    length: int  # pycocoevalcap's length: the number of bigrams (words - 1, at least 0)


class CiderD:
    """CIDEr-D scorer whose document frequencies come from ``corpus``, counted once.

    ``corpus`` holds one entry per image (document): its reference captions as token sequences.
    ``vector`` turns a caption into a :class:`TfIdf`; ``score`` compares a candidate with an
    image's references (vectors or token sequences); ``references`` prepares an image's vectors
    once, for scoring many candidates against them.
    """

    def __init__(self, corpus: Iterable[Sequence[Sequence[Hashable]]], n: int = 4, sigma: float = 6.0):
        df: Counter = Counter()
        documents = 0
        for refs in corpus:
            documents += 1
            df.update({gram for ref in refs for gram in ngram_counts(ref, n)})
        if documents == 0:
            raise ValueError("CIDEr-D needs at least one document (image) to count n-gram frequencies over")
        self.n, self.sigma = n, sigma
        self.documents = documents
        self.log_documents = math.log(documents)
        # an n-gram of one document has the idf of one never seen, log(documents): only the others are kept
        # (most distinct 3- and 4-grams of a large corpus occur once)
        self.idf = {gram: self.log_documents - math.log(count) for gram, count in df.items() if count > 1}

    def vector(self, tokens: Sequence[Hashable]) -> TfIdf:
        """tf-idf vector of one caption (an n-gram never seen in the corpus gets the largest idf)."""
        weights, squares = {}, [0.0] * self.n
        for gram, tf in ngram_counts(tokens, self.n).items():
            w = tf * self.idf.get(gram, self.log_documents)
            weights[gram] = w
            squares[len(gram) - 1] += w * w
        return TfIdf(weights, tuple(math.sqrt(s) for s in squares), max(len(tokens) - 1, 0))

    def references(self, refs: Iterable[Sequence[Hashable]]) -> tuple[TfIdf, ...]:
        """An image's reference vectors, prepared once for any number of candidates."""
        return tuple(self.vector(ref) for ref in refs)

    def score(self, candidate: Sequence[Hashable] | TfIdf, refs: Sequence[TfIdf] | Sequence[Sequence[Hashable]]) -> float:
        """CIDEr-D of one candidate against one image's references (x10, as reported)."""
        cand = candidate if isinstance(candidate, TfIdf) else self.vector(candidate)
        refs = [r if isinstance(r, TfIdf) else self.vector(r) for r in refs]
        if not refs:
            raise ValueError("CIDEr-D needs at least one reference caption")
        total = 0.0
        for ref in refs:
            sims = [0.0] * self.n
            for gram, w in cand.weights.items():
                r = ref.weights.get(gram)
                if r:
                    sims[len(gram) - 1] += min(w, r) * r  # clipped: saying a word twice earns no more
            for k in range(self.n):
                if cand.norms[k] and ref.norms[k]:
                    sims[k] /= cand.norms[k] * ref.norms[k]
            delta = cand.length - ref.length
            total += sum(sims) * math.exp(-(delta * delta) / (2 * self.sigma**2))
        return 10.0 * total / (self.n * len(refs))

    def scores(self, candidates: Sequence[Sequence[Hashable]], refs: Sequence[Sequence[TfIdf]]) -> list[float]:
        """CIDEr-D of each candidate against the references of its own image (``refs[i]``)."""
        return [self.score(c, r) for c, r in zip(candidates, refs, strict=True)]
