"""Group near-copies when the file names carry no patient or scan: link each image under the name of its group.

    python -m training.similar_groups ../shared/datasets/alzheimer /tmp/alzheimer_by_scan
    python -m training.run my_task.toml --data /tmp/alzheimer_by_scan      # with group_pattern = '([^/]+/g\\d+)_'

For each class, over all its split folders together, images whose small grayscale thumbnails correlate at least
``--threshold`` are linked, and chains of links form a group (neighbouring slices of one scan, frames of one video,
augmented copies of one photo). Every image is then symbolically linked as
``<destination>/[<split>/]<class>/g<k>_<path in its class folder, / → __>``, ``k`` its group's number in that class,
so that a task's ``group_pattern`` keeps each group in one split, a given test folder's too. Nothing is copied; the
images are decoded as training decodes them (DICOM and 16-bit files included), and no link is made unless all of
them decode. On the Alzheimer dataset, at 0.98, the groups are its scans: 70 + 28 + 2 groups of 25-26 slices for
VeryMild, Mild and Moderate. Memory grows with the square of a class's size (fine to tens of thousands of images).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from contract.card import InputSpec
from contract.cli import HelpFormatter
from contract.preprocessing import ImageError, load_pixels
from training.data import DataError, class_folders, image_files, split_folders

log = logging.getLogger("training.similar_groups")


def thumbnails(files: list[Path], size: int) -> np.ndarray:
    """Each image as a standardised vector of its size × size grayscale thumbnail; DataError naming ten failures."""
    spec = InputSpec(channels=1, height=size, width=size, resize="bicubic")
    vectors, failed = [], []
    for path in files:
        try:
            vectors.append(load_pixels(path.read_bytes(), spec, dicom=path.suffix.lower() == ".dcm").ravel())
        except (ImageError, OSError) as error:
            failed.append(f"{path} ({error})")
    if failed:
        raise DataError(f"{len(failed)} files cannot be decoded: {'; '.join(failed[:10])}")
    pixels = np.stack(vectors).astype(np.float32)
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


def images_by_class(root: Path) -> dict[str, list[tuple[Path, Path]]]:
    """class name → (its folder under a split folder or the root, image) over every split folder."""
    found: dict[str, list[tuple[Path, Path]]] = defaultdict(list)
    for split in split_folders(root).values():
        for folder in class_folders(split):
            found[folder.name] += [(folder, image) for image in image_files(folder)]
    return found


def link_groups(source: Path, destination: Path, threshold: float, size: int) -> dict[str, np.ndarray]:
    """Link every image of `source` under its group's name in `destination`; each class's group sizes."""
    source, destination = source.resolve(), destination.resolve()
    if destination.is_relative_to(source):
        raise ValueError(f"{destination} is inside {source}: training on {source} would read the links as a class")
    if destination.exists() and any(destination.iterdir()):
        raise FileExistsError(f"{destination} is not empty: give a new folder")
    classes = images_by_class(source)
    groups = {name: similar_groups(thumbnails([image for _, image in pairs], size), threshold)
              for name, pairs in classes.items() if pairs}  # fmt: skip
    for name, group_of in groups.items():  # every image decoded: now the links
        for (folder, image), group in zip(classes[name], group_of, strict=True):
            target = destination / folder.relative_to(source)
            target.mkdir(parents=True, exist_ok=True)
            os.symlink(image, target / f"g{group:04d}_{image.relative_to(folder).as_posix().replace('/', '__')}")
    return {name: np.bincount(group_of) for name, group_of in groups.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.similar_groups", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("source", type=Path, help="a dataset folder: <split>/<class>/<image> or <class>/<image>")
    parser.add_argument("destination", type=Path, help="a new folder for the links, outside the source")
    parser.add_argument("--threshold", type=float, default=0.98, help="correlation of two thumbnails that links them")
    parser.add_argument("--size", type=int, default=32, help="thumbnail side, pixels")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    try:
        sizes = link_groups(args.source, args.destination, args.threshold, args.size)
    except (DataError, FileExistsError, ValueError) as error:
        log.error("%s", error)
        return 2
    for name, counts in sizes.items():
        log.info("%s: %d images in %d groups of %d-%d", name, counts.sum(), len(counts), counts.min(), counts.max())
    log.info("links in %s; split by them with group_pattern = '([^/]+/g\\d+)_'", args.destination)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
