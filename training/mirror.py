"""Test-time mirror averaging: a classifier's probabilities averaged over the image and its left-right mirror.

For tasks whose labels do not change under a horizontal flip (faces, pets), the average of the two views is a
better estimate than either, at twice the inference cost. The wrapper is part of the exported graph, so serving
needs no knowledge of it, and training's evaluation runs the very same computation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

LOG_FLOOR = 1e-12  # keeps log finite; softmax of the output differs from the mean probabilities by < 1e-11


def log_mean_probabilities(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """log of the mean of several predictions' probabilities: what an averaging wrapper returns as its logits."""
    return torch.stack([z.softmax(dim=1) for z in logits]).mean(dim=0).clamp_min(LOG_FLOOR).log()


class MirrorAveraged(nn.Module):
    """Returns log of the mean probabilities of both views, so that ``softmax(output)`` is that mean."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return log_mean_probabilities([self.model(x), self.model(x.flip(-1))])
