"""The training objectives' losses on one fixed batch of a tiny seeded model, pinned to the numbers
they gave when written: a change to how an objective computes its loss must not change what it trains."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_WORDS, tiny_model_config

from caption.checkpoint import save_checkpoint
from caption.config import Config, DataConfig, TrainConfig
from caption.model import build_model
from caption.training.distill import Distillation
from caption.training.distributed import Dist
from caption.training.objectives import HardAttention
from caption.vocab import END_ID, START_ID, Vocabulary

VOCAB = Vocabulary(TINY_WORDS)
CPU = Dist(0, 1, torch.device("cpu"))
SPLIT = SimpleNamespace(features=object(), dataset=None, records=[])  # cached features: no encoder runs


def _batch() -> SimpleNamespace:
    """Three images' (3, 9, 16) features and four captions; the first image has two."""
    feats = torch.randn(3, 9, 16, generator=torch.Generator().manual_seed(7))
    caps = torch.tensor([[START_ID, 5, 6, 7, END_ID, 0], [START_ID, 8, 9, END_ID, 0, 0],
                         [START_ID, 4, 5, 6, 7, END_ID], [START_ID, 10, END_ID, 0, 0, 0]])
    return SimpleNamespace(inputs=feats, captions=caps, rows=torch.tensor([0, 1, 2, 0]))


@pytest.mark.parametrize("expect_prob, losses, baseline", [
    (0.0, (5.257981, 5.300906, 5.387040), -1.8015978),  # every batch samples cells: REINFORCE and entropy
    (1.0, (6.072166, 6.072166, 6.072166), -1.8016977),  # every batch reads the expectation
    (0.5, (6.072166, 5.339422, 6.072166), -1.8014249),  # expectation, sample, expectation
])
def test_hard_attention_losses_are_pinned(expect_prob, losses, baseline):
    cfg = Config(model=tiny_model_config(blend="hard"), train=TrainConfig(hard_expect_prob=expect_prob,
                                                                           hard_entropy=0.05))
    torch.manual_seed(0)
    model = build_model(cfg.model, len(VOCAB)).train()
    objective = HardAttention(cfg, VOCAB, SPLIT)
    objective.baseline = -1.5
    torch.manual_seed(0)
    got = [objective.step(model, _batch(), CPU).loss.item() for _ in range(3)]
    assert got == pytest.approx(losses, rel=1e-5)
    assert objective.baseline == pytest.approx(baseline, rel=1e-5)


@pytest.mark.parametrize("members, loss, kl", [(2, 5.399674, 0.196601), (1, 5.400867, 0.252283)])
def test_distillation_loss_is_pinned(tmp_path, members, loss, kl):
    cfg = Config(data=DataConfig(image_size=32), model=tiny_model_config())
    torch.manual_seed(11)
    encoder = build_model(cfg.model, len(VOCAB)).encoder.state_dict()  # the teachers share one encoder
    paths = []
    for seed in (1, 2)[:members]:
        torch.manual_seed(seed)
        teacher = build_model(cfg.model, len(VOCAB))
        teacher.encoder.load_state_dict(encoder)
        paths.append(str(save_checkpoint(tmp_path / f"t{seed}.pt", teacher, cfg, VOCAB)))
    cfg = dataclasses.replace(cfg, train=TrainConfig(objective="distill", teachers=",".join(paths), distill_weight=0.3))
    torch.manual_seed(0)
    student = build_model(cfg.model, len(VOCAB)).train()
    result = Distillation(cfg, VOCAB, SPLIT).step(student, _batch(), CPU)
    assert result.loss.item() == pytest.approx(loss, rel=1e-5)
    assert result.metrics["kl"] == (pytest.approx(kl, rel=1e-5), 14.0)
