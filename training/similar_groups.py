"""Group near-copies when the file names carry no patient or scan: link each image under the name of its group.

    python -m training.similar_groups ../shared/datasets/alzheimer /tmp/alzheimer_by_scan
    python -m training.run my_task.toml --data /tmp/alzheimer_by_scan      # with group_pattern = '(\\w+/g\\d+)_'

Within each class folder, images whose small grayscale thumbnails correlate at least ``--threshold`` are linked, and
chains of links form a group (neighbouring slices of one scan, frames of one video, augmented copies of one photo).
Every image is then symbolically linked as ``<destination>/<split>/<class>/g<k>_<file name>`` (``k`` its group in
that class), so that a task's ``group_pattern`` keeps each group in one split. Nothing is copied. On the Alzheimer
dataset, at 0.98, the groups are its scans: 70 + 28 + 2 groups of 25-26 slices for VeryMild, Mild and Moderate.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from contract.cli import HelpFormatter
from training.data import IMAGE_SUFFIXES, SPLIT_ALIASES

log = logging.getLogger("training.similar_groups")


def thumbnails(files: list[Path], size: int) -> np.ndarray:
    """Each image as a standardised vector of its size × size grayscale thumbnail."""
    pixels = np.stack(
        [np.asarray(Image.open(f).convert("L").resize((size, size)), dtype=np.float32).ravel() for f in files]
    )
    return (pixels - pixels.mean(1, keepdims=True)) / (pixels.std(1, keepdims=True) + 1e-6)


def similar_groups(vectors: np.ndarray, threshold: float, block: int = 2048) -> np.ndarray:
    """Group index of each row: connected components of Pearson correlation ≥ threshold (computed in blocks)."""
    rows, cols = [], []
    for start in range(0, len(vectors), block):
        correlation = vectors[start : start + block] @ vectors.T / vectors.shape[1]
        r, c = np.nonzero(correlation >= threshold)
        rows.append(r + start)
        cols.append(c)
    n = len(vectors)
    links = csr_matrix((np.ones(sum(map(len, rows))), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    return connected_components(links, directed=False)[1]


def class_folders(root: Path) -> list[Path]:
    splits = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name.lower() in SPLIT_ALIASES]
    return [c for split in splits or [root] for c in sorted(split.iterdir()) if c.is_dir() and c.name[0] != "."]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.similar_groups", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("source", type=Path, help="a dataset folder: <split>/<class>/<image> or <class>/<image>")
    parser.add_argument("destination", type=Path, help="an empty or new folder for the links")
    parser.add_argument("--threshold", type=float, default=0.98, help="correlation of two thumbnails that links them")
    parser.add_argument("--size", type=int, default=32, help="thumbnail side, pixels")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.destination.exists() and any(args.destination.iterdir()):
        log.error("%s is not empty", args.destination)
        return 2
    for folder in class_folders(args.source):
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.name[0] != ".")
        if not files:
            continue
        groups = similar_groups(thumbnails(files, args.size), args.threshold)
        target = args.destination / folder.relative_to(args.source)
        target.mkdir(parents=True)
        for file, group in zip(files, groups, strict=True):
            os.symlink(file.resolve(), target / f"g{group:04d}_{file.name}")
        sizes = np.bincount(groups)
        log.info(
            "%s: %d images in %d groups (%d-%d images each)", target, len(files), len(sizes), sizes.min(), sizes.max()
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
