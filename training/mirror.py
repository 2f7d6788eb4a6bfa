"""Test-time mirror averaging: a classifier's probabilities averaged over the image and its left-right mirror.

For tasks whose labels do not change under a horizontal flip (faces, pets), the average of the two views is a
better estimate than either, at twice the inference cost. The wrapper is part of the exported graph, so serving
needs no knowledge of it, and training's evaluation runs the very same computation.
"""

from __future__ import annotations

import torch
from torch import nn

LOG_FLOOR = 1e-12  # keeps log finite; softmax of the output differs from the mean probabilities by < 1e-11


class MirrorAveraged(nn.Module):
    """Returns log of the mean probabilities of both views, so that ``softmax(output)`` is that mean."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probabilities = (self.model(x).softmax(dim=1) + self.model(x.flip(-1)).softmax(dim=1)) / 2
        return probabilities.clamp_min(LOG_FLOOR).log()
