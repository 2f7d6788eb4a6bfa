"""Small generated datasets, so tests never need ../shared: classes differ by a learnable pattern."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_image(label: int, size: int, mode: str, rng: np.random.Generator) -> Image.Image:
    """Class 0: a dark disc; class k > 0: a bright square whose brightness grows with k, on noise."""
    pixels = rng.integers(0, 60, (size, size), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
    if label == 0:
        pixels[(yy - cy) ** 2 + (xx - cx) ** 2 < (size // 5) ** 2] = 20
    else:
        half = size // 5
        pixels[max(cy - half, 0) : cy + half, max(cx - half, 0) : cx + half] = min(255, 120 + 60 * label)
    image = Image.fromarray(pixels)
    return image.convert(mode)


def make_image_folder(
    root: Path,
    classes: list[str],
    per_class: int,
    size: int = 40,
    mode: str = "L",
    splits: tuple[str, ...] = ("train",),
    seed: int = 0,
    suffix: str = ".png",
) -> Path:
    rng = np.random.default_rng(seed)
    for split in splits:
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                make_image(label, size, mode, rng).save(folder / f"{name}_{i}{suffix}")
    return root


def make_mnist_idx(root: Path, train: int = 200, test: int = 50, seed: int = 0) -> Path:
    """The four MNIST IDX files (gzipped, torchvision's MNIST/raw layout) holding generated 28×28 digits."""
    import gzip
    import struct

    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        labels = np.arange(count, dtype=np.uint8) % 10
        images = np.stack([np.asarray(make_image(int(lab) % 3, 28, "L", rng)) for lab in labels])
        images[np.arange(count), labels.astype(int) + 2, :] = 255  # a stripe whose row encodes the digit
        with gzip.open(raw / f"{prefix}-images-idx3-ubyte.gz", "wb") as handle:
            handle.write(struct.pack(">IIII", 2051, count, 28, 28) + images.tobytes())
        with gzip.open(raw / f"{prefix}-labels-idx1-ubyte.gz", "wb") as handle:
            handle.write(struct.pack(">II", 2049, count) + labels.tobytes())
    return root
