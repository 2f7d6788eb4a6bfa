"""The decision rule: which class a classifier's probabilities predict.

A binary model with a positive class and a stored threshold predicts the positive class when its probability reaches
the threshold; every other model predicts the most probable class. Training's evaluation, training.quantize's
accuracy check and the service all call this one function, so a reported metric counts exactly what the service
answers.
"""

from __future__ import annotations

import numpy as np


def predicted_classes(probabilities: np.ndarray, positive: int | None, threshold: float | None) -> np.ndarray:
    """The predicted class index of each row of (..., K) `probabilities` (a 0-d array for one image's (K,))."""
    if positive is not None and threshold is not None and probabilities.shape[-1] == 2:
        return np.where(probabilities[..., positive] >= threshold, positive, 1 - positive)
    return probabilities.argmax(-1)
