"""Captions guided by the encoder's own ImageNet classifier: name what is in the photo.

The EfficientNet-Lite encoders' grid features are what their ImageNet-1k classifier head reads, so
the head on the features' spatial mean gives class probabilities from the forward pass the
captioner already makes (cached features too). A *name*'s probability is the summed probability of
the object classes it names ("dog": every dog breed), from the packaged names table
(:mod:`caption.decoding.names`) intersected with the model's vocabulary.

Each image is captioned by the plain search first. When a name reaches ``threshold`` (animals,
plants and food) or ``thing_threshold`` (things and structures), the caption stays as it is if it
names, anywhere, something the classifier finds at least ``plausible`` ("a man rides a bike" for a
unicycle; "skier" for a ski). Otherwise constrained beam search makes the caption say one of the
sure names (:mod:`caption.decoding.constrained`): where the model expects a noun, with the right
article, ending its noun phrase, and for animals, plants and food (``subject_kinds``) as the
subject, within the first ``within`` words, with people and clothing words penalised
(``person_penalty``). A photo that is surely an animal, plant or food (``no_people``) without a
name the vocabulary holds gets the penalty alone, where its plain caption has people. Defaults and
how they were chosen: :class:`caption.config.GuideConfig`, MODEL_CARD.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from caption.config import Config, ConfigError, DecodeConfig, GuideConfig
from caption.decoding.constrained import Constraint, constrained_beam_search
from caption.decoding.names import (
    PERSON_WORDS,
    ImageNetClass,
    not_after,
    read_classes,
    read_people_words,
    sayable,
    talks_of,
)
from caption.decoding.results import GuideInfo, Hypothesis
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

    def accepts(self, tokens: Sequence[int]) -> bool:
        """Whether a plain caption may stay as it is."""
        return (self.enough is None or self.enough.satisfied_by(tokens)) and not self.avoid.intersection(tokens)


class Guide(nn.Module):
    """The classifier head and what each class may be called: features (B, L, D) -> a Plan per image."""

    def __init__(self, head: nn.Linear, classes: Sequence[ImageNetClass], vocab: Vocabulary, cfg: GuideConfig):
        super().__init__()
        if head.out_features != len(classes):
            raise ValueError(f"the classifier head has {head.out_features} outputs, the names table {len(classes)}")
        self.head, self.classes, self.cfg, self.vocab = head.eval().requires_grad_(False), list(classes), cfg, vocab
        kinds, subject_kinds = _kinds(cfg.kinds), _kinds(cfg.subject_kinds)
        self.names: list[tuple[tuple[int, ...], ...]] = []  # each name's phrases: its words, then its plural
        index: dict[str, int] = {}
        names_of = torch.zeros(len(self.classes), 1 + sum(len(c.names) for c in self.classes))  # (C, names)
        for c in self.classes:
            for name in c.names:
                phrases = sayable(name, vocab)
                if phrases and c.kind in kinds:
                    if name not in index:
                        index[name] = len(self.names)
                        self.names.append(phrases)
                    names_of[c.index, index[name]] = 1.0
        self.register_buffer("names_of", names_of[:, : max(len(self.names), 1)], persistent=False)  # (C, names)
        subject = torch.tensor([c.kind in subject_kinds for c in self.classes])  # (C,)
        self.register_buffer("subject", subject, persistent=False)
        of_subjects = (self.names_of[subject] > 0).any(0)  # (names,) names of animals, plants, food
        bar = torch.where(of_subjects, cfg.threshold, cfg.thing_threshold)  # (names,)
        self.register_buffer("bar", bar, persistent=False)
        self.not_after = [tuple(not_after(p, k > 0, vocab) for k, p in enumerate(ps)) for ps in self.names]
        self.forms = [tuple(f for p in ps for f in talks_of(p, vocab)) for ps in self.names]
        words = read_people_words()
        people = {t for w in (*PERSON_WORDS, *words["person"]) for p in sayable(w, vocab) for t in p}  # plurals too
        wear = {t for w in words["clothing"] for p in sayable(w, vocab) for t in p} | self._words({"clothing"})
        self.penalized = tuple(sorted(people | wear))  # people and what they wear
        self.slot_words = tuple(sorted(people | self._words(kinds)))  # what captions name things and people by

    def _words(self, kinds: set[str]) -> set[int]:
        """The one-word names (and plurals) of the classes of ``kinds`` the vocabulary holds."""
        return {p[0] for c in self.classes if c.kind in kinds for n in c.names for p in sayable(n, self.vocab)
                if len(p) == 1}

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C) class probabilities from features (B, L, D): the head on their spatial mean."""
        return torch.softmax(self.head(features.float().mean(1)).float(), dim=-1)  # (B, C)

    def plan(self, features: torch.Tensor) -> list[Plan]:
        """A Plan per image of features (B, L, D)."""
        probs = self.probabilities(features)  # (B, C)
        name_probs = probs @ self.names_of  # (B, names): each name's probability
        sure_of = (name_probs >= self.bar).cpu()  # (B, names) the names a caption must say
        plausible_of = (name_probs >= self.bar.clamp(max=self.cfg.plausible)).cpu()  # (B, names) or may say instead
        name_probs = name_probs.cpu()
        subject_mass = (probs * self.subject).sum(1).tolist()  # (B,) animals, plants, food
        top_p, top_i = probs.topk(min(self.cfg.top_labels, probs.shape[1]), dim=1)  # (B, k)
        plans = []
        for b, (ps, ids) in enumerate(zip(top_p.tolist(), top_i.tolist())):
            info = GuideInfo(tuple((self.classes[i].label, round(p, 4)) for i, p in zip(ids, ps)))
            sure = sure_of[b].nonzero().flatten().tolist()
            if sure:
                plausible = plausible_of[b].nonzero().flatten().tolist()
                plans.append(self._naming(sorted(sure, key=lambda n: float(name_probs[b, n])), plausible, probs[b], info))
            elif subject_mass[b] >= self.cfg.no_people:  # no name to say, but surely no place for people
                plans.append(Plan(Constraint((), 0, self.penalized, self.cfg.person_penalty), None,
                                  dataclasses.replace(info, no_people=True), frozenset(self.penalized)))
            else:
                plans.append(Plan(None, None, info))
        return plans

    def _naming(self, sure: list[int], plausible: list[int], probs: torch.Tensor, info: GuideInfo) -> Plan:
        """The plan of an image whose ``sure`` names (most specific first) reach their threshold;
        its plain caption may say any ``plausible`` one instead; ``probs`` (C,) its class probabilities."""
        named = (self.names_of[:, sure].sum(1) > 0) * probs  # (C,) the classes those names name
        subject = bool(self.subject[int(named.argmax())])  # an animal, plant or food: the caption's subject
        phrases = tuple(p for n in sure for p in self.names[n])
        said = {t for p in phrases for t in p}  # a tiger is no person, whatever WordNet's first sense
        penalized = tuple(w for w in self.penalized if w not in said) if subject else ()
        within = self.cfg.within if subject else 0
        constraint = Constraint(phrases, within, penalized, self.cfg.person_penalty, self.slot_words,
                                self.cfg.slot_mass, end_phrase=True,
                                not_after=tuple(a for n in sure for a in self.not_after[n]))
        enough = Constraint(tuple(dict.fromkeys(f for n in plausible for f in self.forms[n])))  # anywhere, people or not
        words = tuple(" ".join(self.vocab.itos[t] for t in p) for p in phrases)
        return Plan(constraint, enough, dataclasses.replace(info, constraint=words[0], names=words, no_people=subject))


PlainSearch = Callable[[nn.Module, torch.Tensor, DecodeConfig, "torch.Tensor | None"], list[Hypothesis]]


def guided_search(decoder: nn.Module, features: torch.Tensor, options: DecodeConfig, guide: Guide,
                  plain: PlainSearch, mask: torch.Tensor | None = None) -> list[tuple[Hypothesis, GuideInfo]]:
    """Caption features (B, L, D) with ``plain`` search; the captions their Plan does not accept are
    searched again with constrained beam search (where it finds none within ``max_len``, the plain
    caption stays)."""
    plans = guide.plan(features)
    hyps = plain(decoder, features, options, mask)
    keep = [p.accepts(h.tokens) for h, p in zip(hyps, plans)]
    infos = [p.info if p.enough is None else dataclasses.replace(p.info, satisfied=k) for p, k in zip(plans, keep)]
    todo = [i for i, p in enumerate(plans) if p.constraint is not None and not keep[i]]
    if todo:
        sub = torch.tensor(todo, device=features.device)
        found = constrained_beam_search(decoder, features[sub], options, [plans[i].constraint for i in todo],
                                        None if mask is None else mask[sub])
        for i, h in zip(todo, found):
            if h is not None:
                hyps[i] = h
                infos[i] = dataclasses.replace(infos[i], satisfied=plans[i].enough is not None, shaped=True)
    return list(zip(hyps, infos))


def build_guide(config: Config, vocab: Vocabulary, device: torch.device) -> tuple[Guide | None, str | None]:
    """The guide of a run (the encoder's ImageNet classifier and the names table), or None and why
    there is none: ``guide.enabled`` false, an encoder without a classifier head that reads its
    features, or an encoder fine-tuned away from it."""
    if not config.guide.enabled:
        return None, "guide.enabled is false in the run's config"
    if config.train.fine_tune_from_epoch >= 0:
        return None, "the encoder was fine-tuned (train.fine_tune_from_epoch): its ImageNet classifier no longer fits"
    try:
        head = classifier_head(config.model)
    except ConfigError as err:
        return None, str(err)
    return Guide(head, read_classes(), vocab, config.guide).to(device), None
