"""Images to upload in load tests: a folder's PNG and JPEG files, or generated ones (grayscale PNGs, colour JPEGs)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def folder_images(folder: Path, count: int | None = None) -> list[tuple[str, bytes, str]]:
    """(file name, bytes, content type) of a folder's images; with `count`, at most that many, spread over it."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if count is not None:
        files = files[:: max(1, len(files) // count)][:count]
    return [(p.name, p.read_bytes(), IMAGE_SUFFIXES[p.suffix.lower()]) for p in files]


def generated_images(count: int = 8, size: int = 256, channels: int = 1) -> list[tuple[str, bytes, str]]:
    """Smooth blobs plus noise: compressible like real uploads, different from each other. Grayscale as PNGs, colour
    as JPEGs with a random brightness per channel."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for index in range(count):
        cx, cy, width = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.4)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * width**2))
        buffer = io.BytesIO()
        if channels == 1:
            pixels = np.clip(blob * 200 + rng.normal(0, 12, blob.shape) + 20, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(buffer, format="PNG")
            suffix = ".png"
        else:
            layers = [blob * rng.uniform(120, 230) + rng.normal(0, 12, blob.shape) + 20 for _ in range(channels)]
            pixels = np.clip(np.stack(layers, axis=-1), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
            suffix = ".jpg"
        images.append((f"generated_{index}{suffix}", buffer.getvalue(), IMAGE_SUFFIXES[suffix]))
    return images
