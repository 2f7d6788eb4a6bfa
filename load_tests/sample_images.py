"""Images to upload in load tests: a folder's PNG and JPEG files, or generated grayscale PNGs."""

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


def generated_images(count: int = 8, size: int = 256) -> list[tuple[str, bytes, str]]:
    """Grayscale PNGs of smooth blobs plus noise: compressible like real scans, different from each other."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for index in range(count):
        cx, cy, width = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.4)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * width**2))
        pixels = np.clip(blob * 200 + rng.normal(0, 12, blob.shape) + 20, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        images.append((f"generated_{index}.png", buffer.getvalue(), "image/png"))
    return images
