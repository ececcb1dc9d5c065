"""What things and people are called: the packaged ImageNet-1k names table and people words, and
how a name becomes token ids of a model's vocabulary.

``caption/assets/imagenet_names.tsv`` lists, per class of the classifier head (in its order), the
names that can stand for it in a caption, most specific first, and what kind of thing it is;
``caption/assets/people_words.txt`` lists nouns for people and for what people wear. Both are built
once from WordNet 3.0 by ``scripts/build_imagenet_names.py``; nothing here needs WordNet.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from caption.vocab import SPECIALS, Vocabulary

# the commonest words for people, irregular plurals included, beside WordNet's (people_words.txt)
PERSON_WORDS = tuple("man men woman women person people child children kid kids lady ladies guy guys".split())
# what a class the vocabulary has no name for is searched as, by kind: the caption is found with this
# word and then says the class's own name in its place (none for food: "food" is a mass noun)
STAND_INS = {"animal": "animal", "plant": "plant", "thing": "object", "structure": "building"}
SINGULAR_ONLY = ("two", "three", "four", "five", "several", "many", "both")  # never right before a singular name


@dataclass(frozen=True)
class ImageNetClass:
    """One row of the names table."""

    index: int  # output of the classifier head
    wnid: str  # WordNet 3.0 noun offset, n########
    label: str  # the class's usual name
    kind: str  # person, clothing, scenery, structure, animal, plant, food or thing
    names: tuple[str, ...]  # what can stand for it in a caption, most specific first


def _asset(name: str) -> str:
    return resources.files("caption").joinpath("assets", name).read_text(encoding="utf-8")


def _rows(text: str) -> list[list[str]]:
    return [line.split("\t") for line in text.splitlines() if line.strip() and not line.startswith("#")]


def read_classes(text: str | None = None) -> list[ImageNetClass]:
    """The names table (default: the packaged ``assets/imagenet_names.tsv``), in head order."""
    rows = _rows(_asset("imagenet_names.tsv") if text is None else text)
    return [ImageNetClass(int(r[0]), r[1], r[2], r[3], tuple(n for n in r[4].split("|") if n)) for r in rows]


def read_people_words(text: str | None = None) -> dict[str, tuple[str, ...]]:
    """Nouns for people ("person") and for what people wear ("clothing"); default: the packaged
    ``assets/people_words.txt``."""
    return {kind: tuple(words.split()) for kind, words in _rows(_asset("people_words.txt") if text is None else text)}


def plural(word: str) -> str:
    """The regular English plural: cat -> cats, box -> boxes, puppy -> puppies."""
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in ("a", "e", "i", "o", "u"):
        return word[:-1] + "ies"
    return word + "s"


def sayable(name: str, vocab: Vocabulary) -> tuple[tuple[int, ...], ...]:
    """A name as token ids when the vocabulary holds every word of it, followed by its plural when
    it holds that too; () when it cannot say it. Never a special token."""
    words = name.split()
    phrases: list[tuple[int, ...]] = []
    for form in (words, words[:-1] + [plural(words[-1])]):
        if form and all(w in vocab and w not in SPECIALS for w in form):
            ids = tuple(vocab.stoi[w] for w in form)
            if ids not in phrases:
                phrases.append(ids)
    return tuple(phrases)


def talks_of(phrase: tuple[int, ...], vocab: Vocabulary) -> tuple[tuple[int, ...], ...]:
    """The phrase and the words made from its last word that the vocabulary holds: "ski" -> skis,
    skier, skiers, skiing; "swing" -> swings, swinging; "bike" -> biker, biking. A caption that
    says one of them already talks of the object."""
    *head, word = [vocab.itos[t] for t in phrase]
    stems = {word, word[:-1] if word.endswith("e") else word, word + word[-1]}  # bike -> bik-, swim -> swimm-
    forms = [word] + [stem + end for stem in sorted(stems) for end in ("s", "es", "er", "ers", "ing")]
    return tuple(tuple(vocab.stoi[w] for w in head + [f]) for f in dict.fromkeys(forms)
                 if all(w in vocab for w in head + [f]))


def takes_an(word: str) -> bool:
    """Whether "an" goes before the word: a vowel sound (an owl, an umbrella, an hour; a unicycle)."""
    if word.startswith(("uni", "use", "usu", "uti", "ure", "uro", "eu", "one")):
        return False
    return word[:1] in ("a", "e", "i", "o", "u") or word.startswith(("hour", "honest", "heir"))


def not_after(word: str, plural_form: bool, vocab: Vocabulary) -> tuple[int, ...]:
    """The words a name starting with ``word`` may not follow: "a" before "owl" ("an" before "cat"),
    a number before a singular name, "a"/"an" before a plural one."""
    words = ("a", "an") if plural_form else (("a",) if takes_an(word) else ("an",)) + SINGULAR_ONLY
    return tuple(vocab.stoi[w] for w in words if w in vocab)


def everyday_name(c: ImageNetClass) -> str | None:
    """What people call the class: its usual name (the label) when that is one word ("koala", never
    a synonym such as "native bear"); else the label's last word when that names the class too
    ("spider" for a garden spider); else a two-word label ("sea lion"); else its first one-word name
    ("spider" for a black and gold garden spider). None when there is none of these."""
    label = c.label.lower()
    words = label.split()
    if all(w.isalpha() for w in words):
        if len(words) == 1 or words[-1] in c.names:
            return words[-1]
        if len(words) == 2:
            return label
    return next((n for n in c.names if n.isalpha()), None)


def stand_in(c: ImageNetClass, vocab: Vocabulary) -> str | None:
    """The word a caption of a class the vocabulary has no name for is searched with: its kind's
    word (:data:`STAND_INS`: "animal" for a koala, "object" for a teapot), when the vocabulary holds it."""
    word = STAND_INS.get(c.kind)
    return word if word is not None and sayable(word, vocab) else None
