"""Word vocabulary: tokenisation, special tokens, min-frequency cut-off, JSON save/load.

Tokenisation uses nltk's Treebank tokenizer (pure regular expressions, so no ``nltk.download``
is ever needed), lower-cases, and drops punctuation-only tokens, as the COCO anchors do.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from caption.fileio import atomic_write_json

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3


@lru_cache(maxsize=1)
def _tokenizer():
    """nltk's TreebankWordTokenizer, imported on first use (the model package never needs nltk)."""
    from nltk.tokenize import TreebankWordTokenizer

    return TreebankWordTokenizer()


_PLAIN = re.compile(r"[a-z0-9\s]*")  # a caption of words and spaces only: Treebank only splits it on spaces...
_SPLIT_BY_TREEBANK = frozenset("cannot gimme gonna gotta lemme wanna".split())  # ...except these ("can not")


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens of a caption, punctuation removed.

    Most captions are plain words with at most a final period; those are split on spaces, which
    gives the Treebank tokens (tests/test_vocab.py checks it on every Flickr8k caption) ~100x
    faster, so that COCO's 616k captions take seconds, not minutes.
    """
    text = text.lower()
    body = text.rstrip()
    body = body[:-1] if body.endswith(".") else body
    if _PLAIN.fullmatch(body):
        words = body.split()
        if _SPLIT_BY_TREEBANK.isdisjoint(words):
            return words
    tokens = _tokenizer().tokenize(text)
    return [t for t in tokens if any(ch.isalnum() for ch in t)]


class Vocabulary:
    """Bidirectional word <-> id map with fixed special ids (pad 0, start 1, end 2, unk 3)."""

    def __init__(self, words: Sequence[str] = ()):
        self.itos: list[str] = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary words must be unique")

    @classmethod
    def build(cls, captions: Iterable[str], min_freq: int = 5) -> "Vocabulary":
        """Words seen at least ``min_freq`` times, most frequent first (ties alphabetical)."""
        counts = Counter(tok for text in captions for tok in tokenize(text))
        kept = sorted((w for w, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w))
        return cls(kept)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        """``<start> w1 .. wn <end>`` ids; unknown words map to ``<unk>``; at most max_len words."""
        words = tokenize(text)
        if max_len is not None:
            words = words[:max_len]
        return [START_ID] + [self.stoi.get(w, UNK_ID) for w in words] + [END_ID]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words of an id sequence, stopping at ``<end>`` and dropping ``<start>``/``<pad>``."""
        words = []
        for i in ids:
            i = int(i)
            if i == END_ID:
                break
            if i in (START_ID, PAD_ID):
                continue
            words.append(self.itos[i])
        return words

    def to_dict(self) -> dict:
        return {"itos": self.itos}

    @classmethod
    def from_dict(cls, data: dict) -> "Vocabulary":
        itos = list(data["itos"])
        if tuple(itos[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}")
        return cls(itos[len(SPECIALS):])

    def save(self, path: str | Path) -> None:
        """Write as JSON, atomically."""
        atomic_write_json(path, self.to_dict(), ensure_ascii=False)

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        return cls.from_dict(json.loads(Path(path).read_text()))
