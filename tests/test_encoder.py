"""Encoder backbones: grid output, no downloads, fine-tuning, frozen BatchNorm, EfficientNet-Lite0."""

import dataclasses

import pytest
import torch
import torchvision

from caption.config import ConfigError, ModelConfig
from caption.model import build_encoder


@pytest.fixture
def no_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an encoder tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.mark.parametrize("name, dim", [("small", 32), ("resnet50", 2048), ("mobilenet_v3_large", 960), ("vgg16", 512)])
def test_backbones_give_a_grid_without_downloading(name, dim, no_downloads):
    cfg = ModelConfig(encoder=name, weights="none", grid=3, small_channels=32)
    enc = build_encoder(cfg).eval()
    with torch.no_grad():
        feats = enc(torch.randn(2, 3, 64, 64))
    assert feats.shape == (2, 9, dim) and enc.out_dim == dim and enc.grid == (3, 3)


def test_grid_is_configurable():
    enc = build_encoder(ModelConfig(encoder="small", grid=5, small_channels=16))
    assert enc(torch.randn(1, 3, 96, 96)).shape == (1, 25, 16)


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ConfigError, match="model.encoder"):
        build_encoder(ModelConfig(encoder="resnet9000"))


def test_fine_tune_unfreezes_only_top_blocks_and_frozen_blocks_stay_in_eval():
    cfg = ModelConfig(encoder="resnet50", weights="none", fine_tune=True, fine_tune_blocks=1)
    enc = build_encoder(cfg)
    trainable = [any(p.requires_grad for p in b.parameters()) for b in enc.blocks]
    assert trainable == [False, False, False, False, True]  # stem, layer1..3 frozen, layer4 trained
    enc.train()
    assert not enc.blocks[0].training and enc.blocks[-1].training
    frozen = build_encoder(dataclasses.replace(cfg, fine_tune=False))
    assert frozen.frozen and not any(p.requires_grad for p in frozen.parameters())
    frozen.train()
    bn = frozen.blocks[0][1]
    before = bn.running_mean.clone()
    frozen(torch.randn(2, 3, 64, 64))
    assert torch.equal(bn.running_mean, before)  # BatchNorm statistics never drift


def test_efficientnet_lite0_pretrained_classifies_a_real_photo(no_downloads):
    pytest.importorskip("efficientnet_lite_pytorch", reason="the 'lite' extra is not installed")
    data = pytest.importorskip("skimage.data", reason="scikit-image provides the sample photo")
    from caption.model.encoder import load_efficientnet_lite

    net = load_efficientnet_lite("efficientnet_lite0", pretrained=True).eval()
    photo = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float() / 255  # a tabby cat
    x = torchvision.transforms.functional.resize(photo, [224, 224], antialias=True)
    x = (x - 0.5) / 0.5
    with torch.no_grad():
        top5 = net(x.unsqueeze(0)).topk(5).indices[0].tolist()
    assert set(top5) & {281, 282, 283, 285}  # tabby, tiger cat, Persian, Egyptian cat


@pytest.mark.parametrize("stage, dim, grid", [(16, 112, 14), (32, 1280, 7)])
def test_efficientnet_lite0_stages(stage, dim, grid, no_downloads):
    pytest.importorskip("efficientnet_lite_pytorch", reason="the 'lite' extra is not installed")
    cfg = ModelConfig(encoder="efficientnet_lite0", weights="DEFAULT", stage=stage, grid=grid)
    enc = build_encoder(cfg).eval()
    with torch.no_grad():
        assert enc(torch.randn(1, 3, 224, 224)).shape == (1, grid * grid, dim)


def test_coordinate_features_tell_where_each_cell_is():
    enc = build_encoder(ModelConfig(encoder="small", grid=3, small_channels=8, coord_features=True))
    feats = enc(torch.randn(2, 3, 48, 48))
    assert feats.shape == (2, 9, 10) and enc.out_dim == 10
    xy = feats[1, :, -2:]  # (L, 2): row-major cells, x then y in [-1, 1]
    assert xy[0].tolist() == [-1.0, -1.0] and xy[2].tolist() == [1.0, -1.0] and xy[6].tolist() == [-1.0, 1.0]


def test_small_cnn_cells_see_only_their_neighbourhood():
    """A change in one corner leaves far cells' features unchanged (no per-image normalisation leak)."""
    enc = build_encoder(ModelConfig(encoder="small", grid=6, small_channels=16)).eval()
    image = torch.randn(1, 3, 96, 96)
    changed = image.clone()
    changed[..., :16, :16] += 3.0  # the top-left cell
    with torch.no_grad():
        a, b = enc(image).view(6, 6, -1), enc(changed).view(6, 6, -1)  # (gh, gw, D)
    assert not torch.allclose(a[0, 0], b[0, 0])
    torch.testing.assert_close(a[3:, 3:], b[3:, 3:])  # 48+ px away: outside the 39 px receptive field
