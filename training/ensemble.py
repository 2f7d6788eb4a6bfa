"""Ensembles: several trained classifiers of one task exported as one graph that averages their probabilities.

Members trained with different augmentation, learning rates or seeds make different mistakes, so the mean of their
probabilities is usually more accurate than any of them (emotion: two EfficientNet-Lite0 runs at 0.628 and 0.625 test
accuracy, 0.647 together). ``training.run --checkpoint A.pt B.pt ... --epochs 0`` evaluates and exports one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from training.mirror import log_mean_probabilities


class Ensemble(nn.Module):
    """Returns log of the members' mean probabilities, so that ``softmax(output)`` is that mean."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return log_mean_probabilities([member(x) for member in self.members])
