"""The MNIST report's fully connected autoencoder and the classifier trained on its 30-d code."""

from __future__ import annotations

import torch
from torch import nn

from training.architectures import register_model


def _mlp(sizes: list[int], last_activation: nn.Module | None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU(inplace=True))
    if last_activation is not None:
        layers.append(last_activation)
    return nn.Sequential(*layers)


class Autoencoder(nn.Module):
    """Encoder 784-500-200-100-30, decoder 30-100-200-500-784 with a sigmoid; ReLU between layers."""

    def __init__(self, in_chans: int, image_size: int, hidden: tuple[int, ...], code_size: int) -> None:
        super().__init__()
        self.shape = (in_chans, image_size, image_size)
        pixels = in_chans * image_size * image_size
        self.code_size = code_size
        self.encoder = nn.Sequential(nn.Flatten(), _mlp([pixels, *hidden, code_size], None))
        self.decoder = _mlp([code_size, *reversed(hidden), pixels], nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.encoder(x)
        return self.decoder(code).view(-1, *self.shape), code


class CodeClassifier(nn.Module):
    """A frozen encoder followed by a small MLP (30-20-15-10) on its code."""

    def __init__(self, encoder: nn.Module, code_size: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.ReLU(), _mlp([code_size, 20, 15, num_classes], None))

    def layers(self) -> list[nn.Module]:
        """The modules forward applies, in order (training.explain unrolls them)."""
        return [self.encoder, self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


@register_model
def mlp_autoencoder(
    in_chans: int,
    num_classes: int,
    image_size: int,
    pretrained: bool,
    code_size: int = 30,
    hidden: tuple[int, ...] = (500, 200, 100),
) -> nn.Module:
    if pretrained:
        raise ValueError("mlp_autoencoder trains from scratch")
    return Autoencoder(in_chans, image_size, tuple(hidden), code_size)
