"""Encoders run channels-last; the inference copy folds every BatchNorm and keeps the features."""

from __future__ import annotations

import pytest
import torch

from caption.config import (
    ModelConfig,
)
from caption.model import build_encoder
from caption.model.fuse import fused_for_inference

# ----------------------------------------------------------------------------- channels-last encoders


@pytest.mark.parametrize("name", ["small", "mobilenet_v3_large", "resnet50", "efficientnet_lite0"])
def test_every_backbone_runs_channels_last_with_the_same_features(name):
    torch.manual_seed(0)
    enc = build_encoder(ModelConfig(encoder=name, weights="none", grid=2, small_channels=16)).eval()
    convs = [m.weight for m in enc.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        feats = enc(images)  # (B, L, D)
        nchw = enc.pool(enc.blocks.to(memory_format=torch.contiguous_format)(images.contiguous()))
    assert feats.is_contiguous()
    torch.testing.assert_close(feats, nchw.flatten(2).transpose(1, 2), atol=1e-4, rtol=1e-4)


def test_loading_weights_keeps_the_channels_last_layout():
    cfg = ModelConfig(encoder="small", grid=2, small_channels=16)
    enc, other = build_encoder(cfg), build_encoder(cfg)
    other.load_state_dict({k: v.contiguous() for k, v in enc.state_dict().items()})
    conv = other.blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and torch.equal(conv, enc.blocks[0][0].weight)


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "resnet50", "efficientnet_lite0"])
def test_fused_encoder_folds_every_batchnorm_and_gives_the_same_features(name):
    torch.manual_seed(0)
    enc = build_encoder(ModelConfig(encoder=name, weights="none", grid=2)).eval()
    images = torch.randn(2, 3, 64, 64)
    fused = fused_for_inference(enc, torch.zeros(1, 3, 64, 64))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules())  # the original is untouched
    assert not any(p.requires_grad for p in fused.parameters())
    with torch.no_grad():
        expected = enc(images)
        torch.testing.assert_close(fused(images), expected, atol=1e-4 * expected.abs().max().item(), rtol=1e-3)


def test_fusion_that_would_change_the_output_is_not_done():
    class Reused(torch.nn.Module):  # the conv's output feeds the BatchNorm and the sum: not foldable
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
            self.bn.running_mean.fill_(0.5)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    module = Reused().eval()
    fused = fused_for_inference(module, torch.randn(1, 3, 8, 8))
    assert isinstance(fused.bn, torch.nn.BatchNorm2d) and fused is not module
