"""Class activation maps from the served graph (see training/explain.py): scaled to [0, 1] and drawn over the image.

The graph outputs one non-negative map per class at the model's input resolution; serving picks the predicted
class's map, scales it by its maximum and, for a PNG, blends a colour scale over the pixels the model saw.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

OVERLAY_MIN_SIDE = 256  # small inputs (MNIST's 28x28) are enlarged by a whole factor so a person can see them
OVERLAY_OPACITY = 0.6  # of the colour at the map's maximum; where the map is 0 the image shows unchanged
# a perceptual dark-blue → green → yellow scale (viridis at five stops), interpolated linearly
_STOPS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32)


def scaled_map(cam: np.ndarray) -> np.ndarray:
    """One class's map scaled to [0, 1] by its maximum; all zeros when the class has no positive evidence anywhere."""
    cam = np.maximum(np.nan_to_num(cam.astype(np.float32), nan=0.0, posinf=0.0), 0.0)
    peak = float(cam.max(initial=0.0))
    return cam / peak if peak > 0 else np.zeros_like(cam)


def _colours(values: np.ndarray) -> np.ndarray:
    position = values * (len(_STOPS) - 1)
    low = np.clip(np.floor(position).astype(int), 0, len(_STOPS) - 2)
    weight = (position - low)[..., None]
    return _STOPS[low] * (1 - weight) + _STOPS[low + 1] * weight


def overlay_png(pixels: np.ndarray, heat: np.ndarray) -> bytes:
    """The model's input pixels (uint8, C x H x W) with the map (H x W, [0, 1]) blended over them, as a PNG."""
    rgb = np.repeat(pixels, 3, axis=0) if pixels.shape[0] == 1 else pixels
    height, width = heat.shape
    factor = max(1, math.ceil(OVERLAY_MIN_SIDE / max(height, width)))
    size = (width * factor, height * factor)
    base = np.asarray(Image.fromarray(rgb.transpose(1, 2, 0)).resize(size, Image.Resampling.BILINEAR), np.float32)
    heat = np.asarray(Image.fromarray(heat.astype(np.float32)).resize(size, Image.Resampling.BILINEAR))
    alpha = (OVERLAY_OPACITY * np.clip(heat, 0, 1))[..., None]
    blended = base * (1 - alpha) + _colours(np.clip(heat, 0, 1)) * alpha
    buffer = io.BytesIO()
    Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
