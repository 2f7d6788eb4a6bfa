"""From-scratch CNNs: a compact general-purpose one and the reference reports' architectures."""

from __future__ import annotations

import torch
from torch import nn

from training.architectures import register_model


class NoPretrainedWeights(ValueError):
    pass


def _no_pretrained(name: str, pretrained: bool) -> None:
    if pretrained:
        raise NoPretrainedWeights(f"{name} trains from scratch; it has no pretrained weights")


class GaussianDropout(nn.Module):
    """Keras' GaussianDropout: multiplicative noise N(1, p/(1-p)) during training, identity at inference."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.std = (p / (1.0 - p)) ** 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.std == 0:
            return x
        return x * (1.0 + torch.randn_like(x) * self.std)


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def initialise(model: nn.Module, scheme: str) -> nn.Module:
    """Initialise conv and dense weights as the reference reports' ablations do (glorot, zeros, ones)."""
    fill = {
        "glorot": nn.init.xavier_uniform_,
        "zeros": nn.init.zeros_,
        "ones": nn.init.ones_,
        "default": None,
    }
    if scheme not in fill:
        raise ValueError(f"unknown init {scheme!r}; choose one of {sorted(fill)}")
    if fill[scheme] is None:
        return model
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            fill[scheme](module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


@register_model
def compact_cnn(
    in_chans: int,
    num_classes: int,
    image_size: int,
    pretrained: bool,
    width: float = 24,
    dropout: float = 0.3,
    depth: int = 4,
) -> nn.Module:
    """``depth`` VGG-style stages (width, 2w, 4w, 8w, ...) with batch norm, then global average pooling.

    Small enough to train from scratch on two CPU cores; global pooling keeps it input-size agnostic. Fewer stages
    keep a finer last feature map (image_size / 2**depth), hence finer class activation maps. From 128 px up the
    first convolution has stride 2, which halves the cost of the first stage at little loss (photos, not glyphs).
    """
    _no_pretrained("compact_cnn", pretrained)
    if not 1 <= depth <= 6:
        raise ValueError("compact_cnn depth must be between 1 and 6")
    width = int(width)
    widths = [width * 2**stage for stage in range(depth)]
    layers: list[nn.Module] = [conv_bn_relu(in_chans, widths[0], stride=2 if image_size >= 128 else 1)]
    c_in = widths[0]
    for c_out in widths:
        layers += [conv_bn_relu(c_in, c_out), conv_bn_relu(c_out, c_out), nn.MaxPool2d(2)]
        c_in = c_out
    return nn.Sequential(
        *layers,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(c_in, num_classes),
    )


def _dropout(rate: float) -> nn.Module:
    """Dropout, or nothing at rate 0 (the layer count stays the same, so checkpoints load either way)."""
    return nn.Dropout(rate) if rate > 0 else nn.Identity()


@register_model
def alzheimer_cnn(
    in_chans: int, num_classes: int, image_size: int, pretrained: bool, dropout: float = 0.3, init: str = "glorot"
) -> nn.Module:
    """The Alzheimer report's CNN: 4 conv32 layers with BN (2 max-pools), Dense128-64 head; ≈1.09 M params at 64×64.

    ``dropout=0`` and ``init`` reproduce its ablations.
    """
    _no_pretrained("alzheimer_cnn", pretrained)
    flat = 32 * (image_size // 4) ** 2
    model = nn.Sequential(
        conv_bn_relu(in_chans, 32),
        _dropout(dropout),
        conv_bn_relu(32, 32),
        nn.MaxPool2d(2),
        conv_bn_relu(32, 32),
        _dropout(dropout),
        conv_bn_relu(32, 32),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 128),
        nn.BatchNorm1d(128),
        nn.ReLU(inplace=True),
        nn.Linear(128, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(inplace=True),
        _dropout(dropout),
        nn.Linear(64, num_classes),
    )
    return initialise(model, init)


@register_model
def covid_cnn(
    in_chans: int,
    num_classes: int,
    image_size: int,
    pretrained: bool,
    depth: int = 5,
    width: float = 1.0,
    dropout: float = 0.2,
) -> nn.Module:
    """The COVID report's CNN: blocks Conv(64,128,256,512,512) → MaxPool → BN → ReLU → Dropout, Dense512-256 head.

    ``depth`` (1-5) reproduces its depth ablation; ``width`` scales the filters (1.0 is the report's ≈8.2 M params at
    150×150) so it can be trained on a CPU.
    """
    _no_pretrained("covid_cnn", pretrained)
    if not 1 <= depth <= 5:
        raise ValueError("covid_cnn depth must be between 1 and 5")
    filters = [max(8, int(f * width)) for f in (64, 128, 256, 512, 512)][:depth]
    layers: list[nn.Module] = []
    c_in, size = in_chans, image_size
    for c_out in filters:
        layers += [
            nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        ]
        c_in, size = c_out, size // 2
    hidden = max(32, int(512 * width))
    return nn.Sequential(
        *layers,
        nn.Flatten(),
        nn.Linear(c_in * size * size, hidden),
        nn.BatchNorm1d(hidden),
        nn.Linear(hidden, hidden // 2),
        nn.ReLU(inplace=True),
        nn.BatchNorm1d(hidden // 2),
        nn.Linear(hidden // 2, num_classes),
    )


def _dense_head(features: int, num_classes: int, hidden: int = 1024, dropout: float = 0.5) -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(features, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


def _pooled_stages(stages: list[tuple[nn.Module, int]], image_size: int, num_classes: int, dropout: float) -> nn.Module:
    """Conv stages, each followed by 2×2 max-pooling (while the map is at least 6 px) and Gaussian dropout 0.2,
    then the emotion report's Dense1024 ×2 head."""
    layers: list[nn.Module] = []
    size = image_size
    for stage, _ in stages:
        layers.append(stage)
        if size >= 6:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        layers.append(GaussianDropout(0.2))
    channels = stages[-1][1]
    return nn.Sequential(*layers, _dense_head(channels * size * size, num_classes, dropout=dropout))


@register_model
def emotion_alexnet(
    in_chans: int, num_classes: int, image_size: int, pretrained: bool, dropout: float = 0.5
) -> nn.Module:
    """The emotion report's AlexNet-like CNN: five conv blocks (16→128 filters, kernels 9→3), each BN → ReLU →
    MaxPool → GaussianDropout, then Dense1024 ×2."""
    _no_pretrained("emotion_alexnet", pretrained)
    spec = [(16, 9), (32, 7), (64, 5), (128, 3), (128, 3)]
    inputs = [in_chans] + [c for c, _ in spec[:-1]]
    stages = [(conv_bn_relu(c_in, c_out, kernel), c_out) for c_in, (c_out, kernel) in zip(inputs, spec, strict=True)]
    return _pooled_stages(stages, image_size, num_classes, dropout)


@register_model
def emotion_vgg(
    in_chans: int, num_classes: int, image_size: int, pretrained: bool, width: float = 16, dropout: float = 0.5
) -> nn.Module:
    """The emotion report's VGG-like CNN: five blocks of two 3×3 convs (16-32-64-128-128) with BN and ReLU,
    MaxPool, GaussianDropout 0.2; Dense1024 ×2 with dropout. ``width`` scales the first block."""
    _no_pretrained("emotion_vgg", pretrained)
    width = int(width)
    widths = [width, width * 2, width * 4, width * 8, width * 8]
    inputs = [in_chans, *widths[:-1]]
    stages = [
        (nn.Sequential(conv_bn_relu(c_in, c_out), conv_bn_relu(c_out, c_out)), c_out)
        for c_in, c_out in zip(inputs, widths, strict=True)
    ]
    return _pooled_stages(stages, image_size, num_classes, dropout)


@register_model
def mobilenet(
    in_chans: int, num_classes: int, image_size: int, pretrained: bool, width: float = 1.0, dropout: float = 0.2
) -> nn.Module:
    """MobileNet v1: depthwise-separable blocks 32 → 1024 scaled by the width multiplier, global average pooling.

    Small inputs (< 96 px) skip the first two stride-2 steps so the feature map does not vanish.
    """
    _no_pretrained("mobilenet", pretrained)
    blocks = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
    small = image_size < 96

    def scaled(c: int) -> int:
        return max(8, int(c * width))

    layers: list[nn.Module] = [conv_bn_relu(in_chans, scaled(32), stride=1 if small else 2)]
    c_in, skipped = scaled(32), 0
    for c_out, stride in blocks:
        if small and stride == 2 and skipped < 1:
            stride, skipped = 1, skipped + 1
        layers += [conv_bn_relu(c_in, c_in, stride=stride, groups=c_in), conv_bn_relu(c_in, scaled(c_out), 1)]
        c_in = scaled(c_out)
    return nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in, num_classes)
    )
