"""Build ``caption/assets/imagenet_names.tsv``: for each ImageNet-1k class, the names that can stand
for it in a caption, most specific first, and what kind of thing it is. Run by hand, once; nothing
else needs WordNet.

    ../shared/tools/wordnet_for_nltk.sh /tmp/nltk_data
    NLTK_DATA=/tmp/nltk_data python scripts/build_imagenet_names.py [--classes ../shared/data/imagenet_classes.tsv]

Names: the lemmas of the class's own WordNet 3.0 synset, then those of its hypernyms, nearest first
(breadth-first up every hypernym path), stopping at the generic top (``GENERIC_TOP``: WordNet's
broad categories such as organism, animal, artifact, device, container, covering, structure, food,
whose names say nothing about what is in a photo: "a being", "a device"). Lemmas that are generic
or mean something else in everyday English (``VAGUE_LEMMAS``: "being", "thing", "game", "toy" for
a toy dog, "arm" for a weapon) are left out wherever they appear. Multi-word lemmas keep their words
("hot dog", "German shepherd" -> "german shepherd").

Kind (the guide constrains only objects, see caption/guidance/guide.py): the first WordNet category
among ``KINDS`` that the class falls under: person, clothing, scenery (geological formations:
seashore, alp, cliff), structure (buildings, bridges, fences), animal, plant, food, else thing.

Output rows: ``index<TAB>wnid<TAB>class<TAB>kind<TAB>name|name|...`` in the classifier head's order.
Beside it, ``caption/assets/people_words.txt``: one-word nouns for people and for what they wear
(:func:`people_words`), which guided captions of animals, plants and food avoid.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ROOT.parent / "shared" / "data" / "imagenet_classes.tsv"
OUT = ROOT / "caption" / "assets" / "imagenet_names.tsv"
PEOPLE_OUT = ROOT / "caption" / "assets" / "people_words.txt"

# WordNet's broad categories: neither they nor anything above them name what a photo shows
GENERIC_TOP = """entity.n.01 physical_entity.n.01 abstraction.n.06 object.n.01 whole.n.02 living_thing.n.01
organism.n.01 causal_agent.n.01 matter.n.03 substance.n.01 substance.n.07 solid.n.01 artifact.n.01
instrumentality.n.03 device.n.01 container.n.01 covering.n.02 protective_covering.n.01 conveyance.n.03
commodity.n.01 consumer_goods.n.01 durables.n.01 equipment.n.01 implement.n.01 structure.n.01
obstruction.n.01 restraint.n.06 mechanism.n.05 furnishing.n.02 establishment.n.04 place_of_business.n.01
natural_object.n.01 part.n.02 plant_part.n.01 plant_organ.n.01 reproductive_structure.n.01 animal.n.01
chordate.n.01 vertebrate.n.01 invertebrate.n.01 mammal.n.01 placental.n.01 domestic_animal.n.01
geological_formation.n.01 communication.n.02 signal.n.01 creation.n.02 product.n.02 system.n.01
material.n.01 fabric.n.01 medium.n.01 game.n.04""".split()

# categories no caption calls a thing by ("a sports equipment", "an electronic device", "a
# receptacle"), whose own names are left out while the walk goes on above them: "instrument" above
# "measuring instrument" for a clock, "vehicle" above "self-propelled vehicle", "food" above
# "produce"; "vehicle", "instrument", "tool" stay, the disjunction lets the model say "bike" or
# "guitar" where it can
NAMELESS = """produce.n.01 self-propelled_vehicle.n.01 military_vehicle.n.01 tracked_vehicle.n.01
public_transport.n.01 measuring_instrument.n.01 cutting_implement.n.01 game_equipment.n.01
sports_equipment.n.01 electronic_equipment.n.01 machine.n.01 appliance.n.01 appliance.n.02
home_appliance.n.01 piece_of_cloth.n.01 barrier.n.01 headdress.n.01 electrical_device.n.01
electronic_device.n.01 apparatus.n.01 mechanical_device.n.01 vessel.n.03 receptacle.n.01
source_of_illumination.n.01""".split()

# lemmas that are generic, or whose everyday sense is another thing than the class, and mass nouns
# of categories that cannot name one thing ("a furniture", "a clothing")
VAGUE_LEMMAS = set("""being thing unit object item article good goods wear game toy arm machine wind cause
material stuff organism creature beast brute fauna animal device product system outlet cover covering
support protection site set piece part body form type kind sort matter furniture clothing equipment
jewelry jewellery luggage baggage makeup hardware machinery cutlery tableware footwear footgear headgear
apparel attire garb clothes gear crockery dishware woodenware ware bedding bedclothes nutriment nourishment
nutrition nutrient sustenance aliment alimentation victuals foodstuff food""".split())

# (kind, synset names): the first kind whose synsets are among the class's ancestors (or itself)
KINDS = (
    ("person", ("person.n.01",)),
    ("clothing", ("clothing.n.01", "headdress.n.01", "footwear.n.01", "footwear.n.02", "mask.n.04")),
    ("scenery", ("geological_formation.n.01",)),
    ("structure", ("structure.n.01", "establishment.n.04")),
    ("animal", ("animal.n.01",)),
    ("plant", ("plant.n.02", "fungus.n.01", "plant_part.n.01")),
    ("food", ("food.n.01", "food.n.02")),
)


def name_of(lemma: str) -> str | None:
    """A lemma as a caption would say it (lower case, words spaced), or None when it is no word."""
    text = lemma.replace("_", " ").lower()
    if not re.fullmatch(r"[a-z]+(?:[ -][a-z]+)*", text) or len(text) < 3 or text in VAGUE_LEMMAS:
        return None
    return text


LIVING = ("noun.animal", "noun.plant", "noun.food")
THINGS = ("noun.artifact", "noun.object")


def group(lexname: str) -> str:
    """A coarse kind of thing from a WordNet lexicographer file: person, living, thing or other."""
    return ("person" if lexname == "noun.person" else "living" if lexname in LIVING
            else "thing" if lexname in THINGS else "other")


def means_else(lemma: str, synset, kind: str, head: bool, first: bool = False) -> bool:
    """Whether a one-word lemma (of ``synset``, the class's or a hypernym) first means another kind
    of thing than the class (WordNet's first sense is the most frequent): a person where the class
    is none ("painter" for a cougar, "boxer" for the dog); something living where the class is a
    thing ("crane" the bird for the machine) or back; something abstract where this sense comes
    third or later ("drop" for a cliff, "board" for a table), unless it is the ``head`` word of
    the class's own synset ("dome", "volleyball"). A multi-word lemma other than the ``first`` of
    its synset (a nickname) of a living thing means something else when its last word first means
    a thing of the same WordNet category that the synset is not ("river horse" is no horse,
    "native bear" no bear; a "hot dog" is no animal)."""
    from nltk.corpus import wordnet as wn

    if "_" in lemma:
        heads = wn.synsets(lemma.rsplit("_", 1)[1], pos="n")
        if first or not heads or heads[0].lexname() != synset.lexname() or kind != "living":
            return False
        return heads[0] not in {a for path in synset.hypernym_paths() for a in path}
    senses = wn.synsets(lemma, pos="n")
    first = group(senses[0].lexname()) if senses else "other"
    if first == kind:
        return False
    if first == "other":
        return not head and synset not in senses[:2]
    return True


def names_of(synset, generic: set) -> list[str]:
    """The class's own names, then its hypernyms' (nearest first, ``NAMELESS`` ones skipped), below
    the generic top; a name only where it does not first mean another kind of thing (:func:`means_else`)."""
    kind = group(synset.lexname())
    names: list[str] = []
    level, seen = [synset], set()
    while level:
        following = []
        for s in level:
            if s.name() in seen or s.name() in generic:
                continue
            seen.add(s.name())
            following.extend(s.hypernyms() + s.instance_hypernyms())
            if s.name() in NAMELESS:
                continue
            names.extend(name_of(lemma) for i, lemma in enumerate(s.lemma_names())
                         if name_of(lemma) and name_of(lemma) not in names
                         and not means_else(lemma, s, kind, head=s == synset and i == 0, first=i == 0))
        level = following
    return names


def kind_of(synset) -> str:
    ancestors = {a.name() for path in synset.hypernym_paths() for a in path}
    return next((kind for kind, roots in KINDS if ancestors & set(roots)), "thing")


def people_words() -> dict[str, list[str]]:
    """One-word nouns for a person ("skier", "bride") and for what people wear ("jacket", "scarf"):
    words whose most frequent sense is a kind of person (or of clothing) that are no adjective or
    adverb (not "great", "dry" or "straight", first senses of which are people) and less often a
    verb than a noun (not "have")."""
    from nltk.corpus import wordnet as wn

    found: dict[str, list[str]] = {}
    for kind, root in (("person", "person.n.01"), ("clothing", "clothing.n.01")):
        words = set()
        for synset in wn.synset(root).closure(lambda s: s.hyponyms() + s.instance_hyponyms()):
            for lemma in synset.lemma_names():
                nouns, verbs = wn.synsets(lemma, pos="n"), wn.synsets(lemma, pos="v")
                other = wn.synsets(lemma, pos="a") + wn.synsets(lemma, pos="r")
                if re.fullmatch(r"[a-z]{3,}", lemma) and nouns and not other and len(verbs) <= len(nouns):
                    if any(root == a.name() for path in nouns[0].hypernym_paths() for a in path):
                        words.add(lemma)
        found[kind] = sorted(words)
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=Path, default=CLASSES, help="index<TAB>wnid<TAB>name, the head's order")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--people-out", type=Path, default=PEOPLE_OUT)
    args = p.parse_args()
    from nltk.corpus import wordnet as wn

    rows = [line.rstrip("\n").split("\t") for line in args.classes.read_text().splitlines()[1:] if line.strip()]
    generic = set(GENERIC_TOP)
    lines = ["# index\twnid\tclass\tkind\tnames (most specific first), built by scripts/build_imagenet_names.py "
             "from WordNet 3.0"]
    for index, wnid, label in rows:
        synset = wn.synset_from_pos_and_offset("n", int(wnid[1:]))
        lines.append("\t".join([index, wnid, label, kind_of(synset), "|".join(names_of(synset, generic))]))
    args.out.write_text("\n".join(lines) + "\n")
    people = people_words()
    args.people_out.write_text("# kind<TAB>words: nouns for people and for what people wear, built by "
                               "scripts/build_imagenet_names.py from WordNet 3.0\n"
                               + "".join(f"{kind}\t{' '.join(words)}\n" for kind, words in people.items()))
    print(f"{len(rows)} classes -> {args.out}; {sum(map(len, people.values()))} words -> {args.people_out}")


if __name__ == "__main__":
    main()
