"""Captions guided by the encoder's own ImageNet classifier: name what is in the photo.

The EfficientNet-Lite encoders' grid features are what their ImageNet-1k classifier head reads, so
the head on the features' spatial mean gives class probabilities from the forward pass the
captioner already makes (cached features too). A *name*'s probability is the summed probability of
the object classes it names ("dog": every dog breed), from the packaged names table
(:mod:`caption.guidance.names`) intersected with the model's vocabulary; a class whose everyday
name the vocabulary lacks ("iguana") is searched through a stand-in word ("animal") that the
caption then replaces (``new_names``), with the article chosen for the name and the stand-in's
attention map.

Each image is captioned by the plain search first. When a name reaches ``threshold`` (animals,
plants and food) or ``thing_threshold`` (things and structures), the caption stays as it is if it
names, anywhere, something the classifier finds at least ``plausible`` ("a man rides a bike" for a
unicycle; "skier" for a ski). Otherwise constrained beam search makes the caption say one of the
sure names (:mod:`caption.decoding.constrained`) where the model expects a noun, with the right
article, ending its noun phrase: as the subject, within the first ``within`` words, with people and
clothing words penalised (``person_penalty``), for animals, plants and food, and for every kind
where the people probe (:mod:`caption.guidance.people`) says the photo has no people. A caption
that, after the name, still speaks of a person, clothing or another creature or thing ("a lizard
in a black and white dog") is cut to the name's noun phrase ("a small lizard"): the decoder has
seen few photos of lone objects, and that is where its habits take over.

The people probe also keeps guidance out of photos of people (probe ``>= people``): their plain
caption stays, so a thing's name never takes a person's place ("a young instrument in a red
shirt"); the classifier's top labels are still reported.

A photo without a sayable sure name is still kept free of people (the penalty alone, where the
plain caption has them) when it is surely an animal, plant or food (``no_people``) and the probe
does not call it a photo of people. Defaults and how they were chosen:
:class:`caption.config.GuideConfig`, MODEL_CARD.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from caption.config import Config, ConfigError, GuideConfig
from caption.decoding.constrained import Constraint
from caption.guidance.names import (
    PERSON_WORDS,
    ImageNetClass,
    everyday_name,
    not_after,
    plural,
    read_classes,
    read_people_words,
    sayable,
    stand_in,
    talks_of,
)
from caption.guidance.detector import Detector, load_detector
from caption.guidance.evidence import PROBE_PEOPLE, Evidence, coco_phrases, confirmed, found
from caption.guidance.people import PeopleProbe, load_probe
from caption.guidance.result import GuideInfo
from caption.model.encoder import classifier_head
from caption.vocab import Vocabulary


def _kinds(text: str) -> set[str]:
    return {k.strip() for k in text.split(",") if k.strip()}


@dataclass(frozen=True)
class Plan:
    """What guidance asks of one image's caption."""

    constraint: Constraint | None  # what a constrained search must make the caption say (or only avoid); None: nothing
    enough: Constraint | None  # what a plain caption may say instead and stay as it is (any plausible name)
    info: GuideInfo
    avoid: frozenset[int] = frozenset()  # words a plain caption must not say to stay as it is
    spoken: tuple[tuple[tuple[int, ...], str], ...] = ()  # stand-in phrases and the name each is said as
    short: Constraint | None = None  # the constraint of the name's noun phrase alone, for a caption that ...
    invents: frozenset[int] = frozenset()  # ... says one of these words after the name

    def accepts(self, tokens: Sequence[int]) -> bool:
        """Whether a plain caption may stay as it is."""
        enough = self.enough is None or bool(self.enough.phrases) and self.enough.satisfied_by(tokens)
        return enough and not self.avoid.intersection(tokens)

    def _first(self, tokens: Sequence[int]) -> tuple[int, tuple[int, ...]] | None:
        """(position, phrase) of the first of the constraint's phrases that ``tokens`` say; None: none."""
        phrases = self.constraint.phrases if self.constraint is not None else ()
        return next(((i, p) for i in range(len(tokens)) for p in phrases if tuple(tokens[i : i + len(p)]) == p), None)

    def said_as(self, tokens: Sequence[int]) -> tuple[tuple[int, str], ...]:
        """((position, name),) where the first of the constraint's phrases that ``tokens`` say is a
        stand-in for a name the vocabulary lacks; () where it is a name of its own, or there is none."""
        first, spoken = self._first(tokens), dict(self.spoken)
        return ((first[0], spoken[first[1]]),) if first is not None and first[1] in spoken else ()

    def cut_short(self, tokens: Sequence[int]) -> bool:
        """Whether a guided caption is to be cut to the name's noun phrase: after the name, it says
        one of ``invents`` (a person, clothing, another creature or thing)."""
        first = self._first(tokens) if self.short is not None else None
        return first is not None and bool(self.invents.intersection(tokens[first[0] + len(first[1]) :]))


class Guide(nn.Module):
    """The classifier head, the people probe and what each class may be called: features (B, L, D)
    -> a Plan per image."""

    def __init__(self, head: nn.Linear, classes: Sequence[ImageNetClass], vocab: Vocabulary, cfg: GuideConfig,
                 probe: PeopleProbe | None = None, detector: Detector | None = None):
        super().__init__()
        if head.out_features != len(classes):
            raise ValueError(f"the classifier head has {head.out_features} outputs, the names table {len(classes)}")
        self.head, self.classes, self.cfg, self.vocab = head.eval().requires_grad_(False), list(classes), cfg, vocab
        self.probe, self.detector = probe, detector
        self.detector_off: str | None = None if detector is not None else "none given"  # why there is none
        self.coco = coco_phrases(vocab)  # how captions name what the detector finds
        kinds, subject_kinds = _kinds(cfg.kinds), _kinds(cfg.subject_kinds)
        self.names: list[tuple[tuple[int, ...], ...]] = []  # each name's phrases: its words, then its plural
        self.spelled: list[tuple[str, ...]] = []  # each name's phrases as the caption says them
        self.stand: list[bool] = []  # the name is said through a stand-in word
        index: dict[str, int] = {}
        pairs = []  # (class, name)
        for c in self.classes:
            if c.kind not in kinds:
                continue
            for name in c.names:
                phrases = sayable(name, vocab)
                if phrases:
                    pairs.append((c.index, self._name(index, name, phrases, None)))
            word, stand = everyday_name(c), stand_in(c, vocab)
            if cfg.new_names and word and stand and not any(sayable(n, vocab) for n in c.names):
                pairs.append((c.index, self._name(index, word, sayable(stand, vocab), (word, plural(word)))))
        names_of = torch.zeros(len(self.classes), max(len(self.names), 1))  # (C, names)
        for c, n in pairs:
            names_of[c, n] = 1.0
        self.register_buffer("names_of", names_of, persistent=False)  # (C, names)
        subject = torch.tensor([c.kind in subject_kinds for c in self.classes])  # (C,)
        self.register_buffer("subject", subject, persistent=False)
        of_subjects = (self.names_of[subject] > 0).any(0)  # (names,) names of animals, plants, food
        bar = torch.where(of_subjects, cfg.threshold, cfg.thing_threshold)  # (names,)
        self.register_buffer("bar", bar, persistent=False)
        self.not_after = [tuple(not_after(w.split()[0], k > 0, vocab) for k, w in enumerate(ws)) for ws in self.spelled]
        self.forms = [() if st else tuple(f for p in ps for f in talks_of(p, vocab))
                      for ps, st in zip(self.names, self.stand)]
        words = read_people_words()
        people = {t for w in (*PERSON_WORDS, *words["person"]) for p in sayable(w, vocab) for t in p}  # plurals too
        wear = {t for w in words["clothing"] for p in sayable(w, vocab) for t in p} | self._words({"clothing"})
        self.penalized = tuple(sorted(people | wear))  # people and what they wear
        self.people_words = frozenset(people)
        self.slot_words = tuple(sorted(people | self._words(kinds)))  # what captions name things and people by

    def _name(self, index: dict[str, int], name: str, phrases: tuple[tuple[int, ...], ...],
              spelled: tuple[str, ...] | None) -> int:
        """The index of ``name`` (searched as ``phrases``, said as ``spelled``), added when new."""
        if name not in index:
            index[name] = len(self.names)
            self.names.append(phrases)
            self.spelled.append(spelled or tuple(" ".join(self.vocab.itos[t] for t in p) for p in phrases))
            self.stand.append(spelled is not None)
        return index[name]

    def _words(self, kinds: set[str]) -> set[int]:
        """The one-word names (and plurals) of the classes of ``kinds`` the vocabulary holds."""
        return {p[0] for c in self.classes if c.kind in kinds for n in c.names for p in sayable(n, self.vocab)
                if len(p) == 1}

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C) class probabilities from features (B, L, D): the head on their spatial mean."""
        return torch.softmax(self.head(features.float().mean(1)).float(), dim=-1)  # (B, C)

    def plan(self, features: torch.Tensor, tokens: Sequence[Sequence[int]] | None = None,
             pixels: torch.Tensor | None = None) -> list[Plan]:
        """A Plan per image of features (B, L, D). With a detector, the plain captions' ``tokens``
        and the images' ``pixels`` (B, 3, S, S), the detector decides where people are
        (:meth:`_with_evidence`); otherwise the people probe does."""
        detected = self.detector is not None and tokens is not None and pixels is not None
        plans = self._plans(features, crowd_by_probe=not detected)
        return self._with_evidence(plans, tokens, Evidence(self.detector, pixels)) if detected else plans

    def _plans(self, features: torch.Tensor, crowd_by_probe: bool) -> list[Plan]:
        """A Plan per image from the classifier, photos of people (the probe at ``people``) left
        unguided where ``crowd_by_probe``; otherwise every photo planned as one without people."""
        probs = self.probabilities(features)  # (B, C)
        people = [None] * len(probs) if self.probe is None else self.probe(features).tolist()  # (B,)
        name_probs = probs @ self.names_of  # (B, names): each name's probability
        sure_of = (name_probs >= self.bar).cpu()  # (B, names) the names a caption must say
        plausible_of = (name_probs >= self.bar.clamp(max=self.cfg.plausible)).cpu()  # (B, names) or may say instead
        name_probs = name_probs.cpu()
        subject_mass = (probs * self.subject).sum(1).tolist()  # (B,) animals, plants, food
        top_p, top_i = probs.topk(min(self.cfg.top_labels, probs.shape[1]), dim=1)  # (B, k)
        plans = []
        for b, (ps, ids) in enumerate(zip(top_p.tolist(), top_i.tolist())):
            info = GuideInfo(tuple((self.classes[i].label, round(p, 4)) for i, p in zip(ids, ps)),
                             people=None if people[b] is None else round(people[b], 4))
            crowd = crowd_by_probe and people[b] is not None and people[b] >= self.cfg.people
            sure = sure_of[b].nonzero().flatten().tolist()
            if sure and not crowd:
                plausible = plausible_of[b].nonzero().flatten().tolist()
                plans.append(self._naming(sorted(sure, key=lambda n: float(name_probs[b, n])), plausible, probs[b],
                                          info, people[b] is not None or not crowd_by_probe))
            elif subject_mass[b] >= self.cfg.no_people and not crowd:  # surely no place for people
                plans.append(Plan(Constraint((), 0, self.penalized, self.cfg.person_penalty), None,
                                  dataclasses.replace(info, no_people=True), frozenset(self.penalized)))
            else:
                plans.append(Plan(None, None, info))
        return plans

    def _with_evidence(self, plans: list[Plan], tokens: Sequence[Sequence[int]], evidence: Evidence) -> list[Plan]:
        """The plans of photos planned as without people, settled where a decision depends on it
        (:mod:`caption.guidance.evidence`): the detector looks at every caption that would be
        changed, and at those that name a person the probe is not sure of (the others keep it).
        Where someone is seen, a caption that names a person stays, and one that names none may
        be given the classifier's name, people not penalised. Where no one is but something else
        surely is (a name the classifier is sure of, an object the detector finds), the caption
        says that thing, people penalised and out of the plain caption. A caption naming an object
        the detector confirms keeps it instead of the classifier's name. Where neither sees
        anything for sure, the plain caption stays: the detector misses people (small, far,
        upside down), and a search without them invents a dog."""
        says = [bool(self.people_words.intersection(t)) for t in tokens]
        probed = [s and p.info.people is not None and p.info.people >= PROBE_PEOPLE for s, p in zip(says, plans)]
        changes = [p.constraint is not None and bool(p.constraint.phrases) and not p.accepts(t)
                   for p, t in zip(plans, tokens)]
        evidence.look([b for b in range(len(plans)) if changes[b] or (says[b] and not probed[b])])
        out = []
        for b, (plan, t) in enumerate(zip(plans, tokens)):
            if b not in evidence.found:  # the probe settled it, or nothing depends on the detector
                out.append(Plan(None, None, plan.info) if says[b] else plan)
                continue
            seen = evidence.seen(b)
            named = confirmed(t, seen, self.coco) or (() if changes[b] else found(seen, self.coco))
            as_it_is = Plan(None, None, dataclasses.replace(plan.info, no_people=False))
            if named and not says[b]:  # it names what the detector sees
                out.append(as_it_is)
            elif seen.person and changes[b] and not says[b]:  # the name may join the people, not replace them
                out.append(dataclasses.replace(plan, constraint=dataclasses.replace(plan.constraint, penalized=()),
                                               short=None, info=as_it_is.info))
            elif seen.person or not (named or changes[b]):
                out.append(as_it_is)
            elif named:  # what it names or the detector finds, and no person
                words = tuple(" ".join(self.vocab.itos[i] for i in p) for p in named)
                info = dataclasses.replace(plan.info, no_people=True, constraint=words[0], names=words)
                out.append(Plan(Constraint(named, 0, self.penalized, self.cfg.person_penalty), None, info,
                                frozenset(self.penalized)))
            else:  # the classifier's name, as in any photo without people
                out.append(plan)
        return out

    def _naming(self, sure: list[int], plausible: list[int], probs: torch.Tensor, info: GuideInfo,
                probed: bool) -> Plan:
        """The plan of an image whose ``sure`` names (most specific first) reach their threshold;
        its plain caption may say any ``plausible`` one instead; ``probs`` (C,) its class
        probabilities; ``probed``: the people probe ran and did not call it a photo of people (then
        every kind is the subject; without a probe, only animals, plants and food are)."""
        named = (self.names_of[:, sure].sum(1) > 0) * probs  # (C,) the classes those names name
        subject = probed or bool(self.subject[int(named.argmax())])  # the caption's subject
        phrases, words, blocked, spoken = [], [], [], []
        for n in sure:
            for p, w, a in zip(self.names[n], self.spelled[n], self.not_after[n]):
                if p not in phrases:  # a stand-in is said as the most specific sure name searched through it
                    phrases.append(p)
                    words.append(w)
                    blocked.append(a)
                    spoken += [(p, w)] if self.stand[n] else []
        said = {t for p in phrases for t in p}  # a tiger is no person, whatever WordNet's first sense
        penalized = tuple(w for w in self.penalized if w not in said) if subject else ()
        constraint = Constraint(tuple(phrases), self.cfg.within if subject else 0, penalized, self.cfg.person_penalty,
                                self.slot_words, self.cfg.slot_mass, end_phrase=True,
                                not_after=tuple(blocked))
        enough = Constraint(tuple(dict.fromkeys(f for n in plausible for f in self.forms[n])))  # anywhere, people or not
        info = dataclasses.replace(info, constraint=words[0], names=tuple(words), no_people=subject)
        if not subject:
            return Plan(constraint, enough, info, spoken=tuple(spoken))
        invents = frozenset(self.penalized + self.slot_words) - said  # a person, clothing, another creature or thing
        return Plan(constraint, enough, info, spoken=tuple(spoken), short=dataclasses.replace(constraint, stop=True),
                    invents=invents)


def build_guide(config: Config, vocab: Vocabulary, device: torch.device,
                detector: bool = True) -> tuple[Guide | None, str | None]:
    """The guide of a run (the encoder's ImageNet classifier, its people probe where one is
    packaged, the names table and, with ``detector``, the COCO detector where it is installed), or
    None and why there is none: ``guide.enabled`` false, an encoder without a classifier head that
    reads its features, or an encoder fine-tuned away from it. Without the detector the probe
    alone says where people are (``guide.detector_off`` says why)."""
    if not config.guide.enabled:
        return None, "guide.enabled is false in the run's config"
    if config.train.fine_tune_from_epoch >= 0:
        return None, "the encoder was fine-tuned (train.fine_tune_from_epoch): its ImageNet classifier no longer fits"
    try:
        head = classifier_head(config.model)
    except ConfigError as err:
        return None, str(err)
    found, why = load_detector() if detector else (None, "not asked for")
    guide = Guide(head, read_classes(), vocab, config.guide, load_probe(config.model), found).to(device)
    guide.detector_off = why
    return guide, None
