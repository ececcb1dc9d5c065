import json
from pathlib import Path

import nltk
import pytest

from caption.vocab import (
    END_ID,
    PAD_ID,
    SPECIALS,
    START_ID,
    UNK_ID,
    Vocabulary,
    tokenize,
)


def test_tokenize_needs_no_nltk_data(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("nltk.download must never be called")

    monkeypatch.setattr(nltk, "download", no_download)
    assert tokenize("A Dog's ball, on the GRASS.") == ["a", "dog", "'s", "ball", "on", "the", "grass"]


def test_build_min_freq_and_specials():
    vocab = Vocabulary.build(["a dog runs", "a dog sits", "a cat"], min_freq=2)
    assert vocab.itos[:4] == list(SPECIALS)
    assert (PAD_ID, START_ID, END_ID, UNK_ID) == (0, 1, 2, 3)
    assert "a" in vocab and "dog" in vocab and "cat" not in vocab
    assert vocab.itos[4] == "a"  # most frequent first


def test_encode_decode_round_trip():
    vocab = Vocabulary.build(["a dog runs on the grass"], min_freq=1)
    ids = vocab.encode("A dog runs on the grass.")
    assert ids[0] == START_ID and ids[-1] == END_ID
    assert vocab.decode(ids) == ["a", "dog", "runs", "on", "the", "grass"]
    assert vocab.decode(vocab.encode("a zebra runs")) == ["a", "<unk>", "runs"]
    assert vocab.decode([START_ID, 4, END_ID, 5, PAD_ID]) == ["a"]
    assert len(vocab.encode("a dog runs on the grass", max_len=2)) == 4


def test_save_load(tmp_path):
    vocab = Vocabulary.build(["über café naïve", "über"], min_freq=1)
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json") == vocab
    with pytest.raises(ValueError):
        Vocabulary.from_dict({"itos": ["a", "b"]})


def _treebank(text):
    from nltk.tokenize import TreebankWordTokenizer

    return [t for t in TreebankWordTokenizer().tokenize(text.lower()) if any(ch.isalnum() for ch in t)]


FLICKR_CAPTIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k" / "captions_flickr8k_train.json"


def test_plain_captions_take_a_fast_path_that_gives_the_treebank_tokens():
    tricky = ["A dog runs.", "a dog runs .", "A dog cannot run", "they are gonna play", "wanna play", "2 dogs.",
              "a dog runs..", "a dog  runs \n fast.\t", ".", "", "   ", "the dog's ball", "3.5 dogs", "a b.c d",
              "gotta go", "lemme see", "gimme that.", "can not", "dogs, cats and mice.", "a man (left)"]
    texts = list(tricky)
    if FLICKR_CAPTIONS.is_file():  # every caption of ../shared's Flickr8k training split
        texts += [a["caption"] for a in json.loads(FLICKR_CAPTIONS.read_text())["annotations"]]
    mismatched = [t for t in texts if tokenize(t) != _treebank(t)]
    assert mismatched == []
    assert tokenize("A dog cannot run.") == ["a", "dog", "can", "not", "run"]
