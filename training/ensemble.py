"""Ensembles: several trained classifiers of one task exported as one graph that averages their probabilities.

Members trained with different augmentation, learning rates or seeds make different mistakes, so the mean of their
probabilities is usually more accurate than any of them (emotion: two EfficientNet-Lite0 runs at 0.628 and 0.625 test
accuracy, 0.647 together). ``training.run --checkpoint A.pt B.pt ... --epochs 0`` evaluates and exports one.
Members may differ in architecture, options and input size (a member of another size: :class:`Resized`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as functional
from torch import nn

from training.mirror import log_mean_probabilities


class Ensemble(nn.Module):
    """Returns log of the members' mean probabilities, so that ``softmax(output)`` is that mean."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return log_mean_probabilities([member(x) for member in self.members])


class Resized(nn.Module):
    """A member trained at another input size: the ensemble's input resized to it (bilinear) inside the graph.

    The member then sees the image resampled twice (to the ensemble's size by the preprocessing, then to its own)
    instead of once. Measured for an emotion Lite0 trained at 160 px and fed 224 px images resized in the graph:
    FER2013 PublicTest accuracy 0.650, against 0.648 from 160 px preprocessing.
    """

    def __init__(self, model: nn.Module, height: int, width: int) -> None:
        super().__init__()
        self.model, self.height, self.width = model, height, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(resize(x, self.height, self.width))


def resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return functional.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
