"""The trained models a run reads besides its own: the checkpoint it starts from (``train.init_from``)
and the teachers it distills (``train.teachers``).

Both are plain checkpoints (:mod:`caption.checkpoint` reads them); what this module adds is the
check that they fit this run, through the one comparison of model settings
(:func:`caption.checkpoint.spec_difference`), each with a ConfigError that names the setting.
"""

from __future__ import annotations

import dataclasses

from caption.checkpoint import Loaded, encoder_spec, load_checkpoint, load_checkpoints, spec_difference
from caption.config import Config, ConfigError
from caption.vocab import Vocabulary


def _model_spec(cfg: Config) -> dict:
    """What a run must share with the checkpoint it starts from: the model config, dropout aside."""
    return dataclasses.asdict(dataclasses.replace(cfg.model, dropout=0.0))


def load_init_from(cfg: Config) -> Loaded:
    """The checkpoint ``train.init_from`` names (a run directory means its best.pt), refused when its
    model differs from ``cfg.model`` in anything but dropout."""
    loaded = load_checkpoint(cfg.train.init_from)
    differ = spec_difference(cfg, loaded.config, _model_spec)
    if differ:
        raise ConfigError(f"train.init_from {loaded.path}: its model.{differ.key} is {differ.theirs!r}, this run's "
                          f"is {differ.ours!r} (the model config must match)")
    return loaded


def teacher_paths(cfg: Config) -> list[str]:
    """``train.teachers`` as a list of paths (comma-separated in the config)."""
    return [p.strip() for p in cfg.train.teachers.split(",") if p.strip()]


def load_teachers(cfg: Config, vocab: Vocabulary) -> Loaded:
    """The teachers ``train.teachers`` names (one model or an ensemble), in eval mode without
    gradients; ConfigError unless they read this run's features (encoder, image size) and vocabulary."""
    teachers = load_checkpoints(teacher_paths(cfg))
    differ = spec_difference(cfg, teachers.config, encoder_spec)
    if differ:
        raise ConfigError(f"train.teachers {teachers.name}: their {differ.key} is {differ.theirs!r}, this "
                          f"run's is {differ.ours!r} (teachers must read the student's features)")
    if teachers.vocab.itos != vocab.itos:
        raise ConfigError(f"train.teachers {teachers.name}: their vocabulary ({len(teachers.vocab)} words) is not "
                          f"this run's ({len(vocab)}); start the student from a teacher (train.init_from) to share it")
    teachers.model.eval().requires_grad_(False)
    return teachers
