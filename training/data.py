"""Dataset loading: discover samples, drop duplicates across splits, carve missing splits, decode once and cache.

Every image goes through :func:`contract.preprocessing.load_pixels` (the same code serving runs on uploads), and the
resulting uint8 arrays are cached on disk keyed by the images (their paths and content) and the input spec, so later
runs, other seeds and folds of the same images, and later epochs never decode a JPEG again.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.model_selection import StratifiedKFold, train_test_split
from tqdm.auto import tqdm

from contract.preprocessing import ImageError, image_to_pixels, load_pixels
from training.files import written_whole
from training.tasks import TaskSpec

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".dcm"}  # .dcm: DICOM, as served
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "training_set": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
    "test_set": "test",
}
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    pass


@dataclass(frozen=True)
class Item:
    """One labelled sample before decoding; ``digest`` is the hash of its content, used to find duplicates."""

    id: str
    label: str
    digest: str
    pixels: Callable[[], np.ndarray]


@dataclass
class Split:
    pixels: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N,)
    ids: list[str]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    classes: list[str]
    splits: dict[str, Split]
    fingerprint: str
    notes: list[str] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        return {name: len(split) for name, split in self.splits.items()}

    def class_counts(self, split: str) -> dict[str, int]:
        counts = np.bincount(self.splits[split].labels, minlength=len(self.classes))
        return dict(zip(self.classes, counts.tolist(), strict=True))


# --- sources: each returns {split name: [Item, ...]} for whichever splits the data has ---------------------------


def image_files(class_dir: Path) -> list[Path]:
    """The images in a class folder and its subfolders (a folder per patient or study, as hospital exports come),
    leaving out hidden files and folders (``.DS_Store``, ``._x.jpg`` resource forks, ``.ipynb_checkpoints``).
    Symbolic links to folders are not followed (logged); a link to a file that is gone is a DataError."""
    files = []
    for folder, subfolders, names in os.walk(class_dir):
        for name in [n for n in subfolders if not n.startswith(".") and os.path.islink(os.path.join(folder, n))]:
            log.warning("not following the link to a folder %s", os.path.join(folder, name))
        subfolders[:] = sorted(n for n in subfolders if not n.startswith("."))
        files += [Path(folder, n) for n in names if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_SUFFIXES]
    if broken := [str(path) for path in files if not path.exists()]:
        raise DataError(f"{len(broken)} links in {class_dir} point to no file: {', '.join(broken[:10])}")
    return sorted(files)


def _log_subfolders(files: list[tuple[Path, str]], split_dir: Path) -> None:
    """Images below a class folder's subfolders are read too: say from which, so that masks or thumbnails kept
    beside the images (``<class>/images``, ``<class>/masks``) are not trained on unnoticed."""
    nested = Counter(
        "/".join(path.relative_to(split_dir).parts[:2])
        for path, _ in files
        if len(path.relative_to(split_dir).parts) > 2
    )
    if nested:
        named = ", ".join(f"{name} ({count})" for name, count in nested.most_common(5))
        more = f" and {len(nested) - 5} more" if len(nested) > 5 else ""
        log.info(
            "%s: %d images read from %d subfolders of the class folders, each as an image of its class: %s%s",
            split_dir, sum(nested.values()), len(nested), named, more,
        )  # fmt: skip


def split_folders(root: Path) -> dict[str, Path]:
    """Split name → its folder under `root`; ``{"train": root}`` when `root` has no split folders."""
    found = {
        SPLIT_ALIASES[d.name.lower()]: d
        for d in sorted(root.iterdir())
        if d.is_dir() and d.name.lower() in SPLIT_ALIASES
    }
    return found or {"train": root}


def class_folders(split_dir: Path) -> list[Path]:
    """The class folders of a split folder (hidden ones, such as ``.ipynb_checkpoints``, are not classes)."""
    return sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def read_image_folders(spec: TaskSpec, root: Path, cache_dir: Path) -> dict[str, list[Item]]:
    """``<root>/<split>/<class>/**/*.<image>``, or ``<root>/<class>/**/*`` when there are no split folders."""
    items: dict[str, list[Item]] = {}
    folders: set[str] = set()
    for split, folder in split_folders(root).items():
        files = []
        for class_dir in class_folders(folder):
            folders.add(class_dir.name)
            label = class_dir.name if spec.class_map is None else spec.class_map.get(class_dir.name)
            if label is None:
                continue
            files += [(p, label) for p in image_files(class_dir)]
        _log_subfolders(files, folder)
        items[split] = [
            _file_item(path, label, root, spec) for path, label in tqdm(files, desc=f"hash {split}", leave=False)
        ]
    if spec.class_map is not None:  # a misspelt folder name would silently leave a whole class out
        if missing := sorted(set(spec.class_map) - folders):
            raise DataError(
                f"class_map names folders that are not in {root}: {missing}; its folders: {sorted(folders)}"
            )
        if left_out := sorted(folders - set(spec.class_map)):
            log.info("folders left out (not in class_map): %s", ", ".join(left_out))
    return items


def _file_item(path: Path, label: str, root: Path, spec: TaskSpec) -> Item:
    """The file hashed now and decoded later, read again then: a large dataset's bytes are not all held at once."""
    return Item(
        id=path.relative_to(root).as_posix(),  # "/" on every system, as group patterns and cards expect
        label=label,
        digest=hashlib.sha256(path.read_bytes()).hexdigest(),
        pixels=lambda: load_pixels(path.read_bytes(), spec.input, dicom=path.suffix.lower() == ".dcm"),
    )


def read_mnist_idx(spec: TaskSpec, root: Path, cache_dir: Path) -> dict[str, list[Item]]:
    """torchvision's ``MNIST/raw`` layout of the four IDX files (``.gz`` or extracted); no download."""
    from torchvision.datasets import MNIST

    raw = root / "MNIST" / "raw"
    if not raw.is_dir():
        raise DataError(f"{root} has no MNIST/raw folder with the four IDX files")
    work = cache_dir / "mnist"
    (work / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
    for source in raw.iterdir():
        target = work / "MNIST" / "raw" / source.name.removesuffix(".gz")
        if not target.exists():
            with gzip.open(source) if source.suffix == ".gz" else open(source, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    items: dict[str, list[Item]] = {}
    for split, train in (("train", True), ("test", False)):
        mnist = MNIST(str(work), train=train, download=False)
        images, targets = mnist.data.numpy(), mnist.targets.numpy()
        items[split] = [
            Item(
                id=f"{split}/{i}",
                label=mnist.classes[t].split(" ")[0],
                digest=hashlib.sha256(images[i].tobytes()).hexdigest(),
                pixels=lambda a=images[i]: image_to_pixels(Image.fromarray(a), spec.input),
            )
            for i, t in enumerate(targets)
        ]
    return items


SOURCES: dict[str, Callable[[TaskSpec, Path, Path], dict[str, list[Item]]]] = {
    "image_folders": read_image_folders,
    "mnist_idx": read_mnist_idx,
}


# --- splitting ------------------------------------------------------------------------------------------------------


class Grouping:
    """Which images must share a split: identical copies of an image, and with the task's ``group_pattern`` the
    images whose paths give the same match (a patient ID, say)."""

    def __init__(self, pattern: str | None) -> None:
        self.pattern = re.compile(pattern) if pattern else None

    def group_key(self, item: Item) -> str | None:
        """The pattern's match in the item's path (its group's, if it has one); None without a (non-empty) match."""
        match = self.pattern.search(item.id) if self.pattern else None
        if match is None:
            return None
        return match.group(1 if self.pattern.groups else 0) or None

    def keys(self, item: Item) -> list[str]:
        group = self.group_key(item)
        return [f"sha256:{item.digest}"] + ([f"group:{group}"] if group else [])

    def groups(self, items: list[Item]) -> dict[str, list[Item]]:
        """Items linked by any shared key (union-find), each group under its root key, in the items' order."""
        parent: dict[str, str] = {}

        def root(key: str) -> str:
            while parent.setdefault(key, key) != key:
                parent[key] = parent[parent[key]]
                key = parent[key]
            return key

        for item in items:
            first, *others = self.keys(item)
            for key in others:
                parent[root(key)] = root(first)
        groups: dict[str, list[Item]] = {}
        for item in items:
            groups.setdefault(root(self.keys(item)[0]), []).append(item)
        return groups


def _drop_conflicts_and_leaks(
    items: dict[str, list[Item]], grouping: Grouping, notes: list[str]
) -> dict[str, list[Item]]:
    """No image (nor, with a group pattern, group) in two splits; copies with conflicting labels dropped altogether."""
    labels_by_digest: dict[str, set[str]] = {}
    for split_items in items.values():
        for item in split_items:
            labels_by_digest.setdefault(item.digest, set()).add(item.label)
    conflicting = {d for d, labels in labels_by_digest.items() if len(labels) > 1}
    if conflicting:
        notes.append(f"dropped {len(conflicting)} images whose identical copies carry different labels")
    what = "an identical copy or an image of its group (group_pattern)" if grouping.pattern else "an identical copy"
    cleaned = {split: [i for i in split_items if i.digest not in conflicting] for split, split_items in items.items()}
    everything = [item for split_items in cleaned.values() for item in split_items]
    group_of = {id(item): key for key, members in grouping.groups(everything).items() for item in members}
    for split, held_out in (("train", ("val", "test")), ("val", ("test",))):
        taken = {group_of[id(item)] for other in held_out for item in cleaned.get(other, [])}
        if split not in cleaned or not taken:
            continue
        keep = [i for i in cleaned[split] if group_of[id(i)] not in taken]
        if dropped := len(cleaned[split]) - len(keep):
            noun = "training" if split == "train" else "validation"
            notes.append(f"dropped {dropped} {noun} images with {what} in {'/'.join(held_out)}")
        cleaned[split] = keep
    return cleaned


def _carve(items: list[Item], fraction: float, seed: int, grouping: Grouping) -> tuple[list[Item], list[Item]]:
    """Split off ``fraction`` of the groups (Grouping), stratified by label; a group's images stay together."""
    groups = grouping.groups(items)
    keys = sorted(groups)
    labels = [groups[k][0].label for k in keys]
    stratify = labels if min(Counter(labels).values()) >= 2 else None
    try:
        rest, taken = train_test_split(keys, test_size=fraction, random_state=seed, stratify=stratify)
    except ValueError:  # too few samples per class for stratification: fall back to a plain random split
        try:
            rest, taken = train_test_split(keys, test_size=fraction, random_state=seed)
        except ValueError as error:
            kind = "groups (group_pattern)" if grouping.pattern else "distinct images"
            raise DataError(f"cannot carve a held-out split out of {len(keys)} {kind}: {error}") from None
    return [i for k in sorted(rest) for i in groups[k]], [i for k in sorted(taken) for i in groups[k]]


def _fold(items: list[Item], fold: tuple[int, int], seed: int, grouping: Grouping) -> tuple[list[Item], list[Item]]:
    """The rest, and the k-th of n folds of the groups (Grouping), stratified by label, as the held-out part."""
    k, n = fold
    groups = grouping.groups(items)
    keys = sorted(groups)
    labels = [groups[key][0].label for key in keys]
    if few := {label: count for label, count in Counter(labels).items() if count < n}:
        kind = "groups (group_pattern)" if grouping.pattern else "distinct images"
        raise DataError(f"cannot cut the {kind} into {n} folds that each hold every class: {few} has fewer than {n}")
    folds = list(StratifiedKFold(n, shuffle=True, random_state=seed).split(keys, labels))
    held_out = {keys[i] for i in folds[k - 1][1]}
    rest = [i for key in keys if key not in held_out for i in groups[key]]
    return rest, [i for key in keys if key in held_out for i in groups[key]]


def assign_splits(items: dict[str, list[Item]], spec: TaskSpec, seed: int, notes: list[str]) -> dict[str, list[Item]]:
    grouping = Grouping(spec.group_pattern)
    if spec.test_fold is not None:  # the splits given are pooled, then cut into folds
        items = {"train": [item for split_items in items.values() for item in split_items]}
    items = _drop_conflicts_and_leaks(items, grouping, notes)
    if "train" not in items or not items["train"]:
        raise DataError("no training images found")
    total = sum(len(v) for v in items.values())
    by = "groups (group_pattern) kept together, " if spec.group_pattern else ""
    if spec.test_fold is not None:
        items["train"], items["test"] = _fold(items["train"], spec.test_fold, seed, grouping)
        k, n = spec.test_fold
        notes.append(f"test split: fold {k} of {n} of all images ({by}stratified, --seed {seed})")
    for split, fraction, split_seed in (("test", spec.test_fraction, seed), ("val", spec.val_fraction, seed + 1)):
        if not items.get(split):
            share = fraction * total / len(items["train"])
            items["train"], items[split] = _carve(items["train"], share, split_seed, grouping)
            notes.append(
                f"{split} split carved from train ({fraction:.0%} of all images, {by}stratified, --seed {seed})"
            )
    if spec.group_pattern:
        matched = sum(grouping.group_key(i) is not None for split_items in items.values() for i in split_items)
        notes.append(f"group_pattern matched {matched} of {sum(len(v) for v in items.values())} images")
    return {split: items[split] for split in SPLITS}


# --- decoding and cache -----------------------------------------------------------------------------------------------


def _decode(items: list[Item]) -> np.ndarray:
    """The items' pixels, stacked; DataError counting the files that cannot be decoded, naming ten."""

    def pixels(item: Item) -> np.ndarray | Exception:
        try:
            return item.pixels()
        except ImageError as error:
            return error

    with ThreadPoolExecutor() as pool:  # Pillow releases the GIL while decoding
        results = list(tqdm(pool.map(pixels, items), total=len(items), desc="decode", leave=False))
    failed = [f"{item.id} ({e})" for item, e in zip(items, results, strict=True) if isinstance(e, Exception)]
    if failed:
        shown = "; ".join(failed[:10]) + (f"; and {len(failed) - 10} more" if len(failed) > 10 else "")
        raise DataError(f"{len(failed)} image files cannot be decoded; remove or replace them: {shown}")
    return np.stack(results)


def _cached_pixels(images: list[Item], spec: TaskSpec, cache_dir: Path) -> np.ndarray:
    """The images' pixels in their order, decoded once per image set and input contract, whatever split each image
    is in: another seed or fold of the same images reads the same file. Memory-mapped: the splits copy what they
    take from it, without a second copy of everything in memory."""
    content = json.dumps([(item.id, item.digest) for item in images]) + spec.input.model_dump_json()
    cache_file = cache_dir / f"{spec.name}-{hashlib.sha256(content.encode()).hexdigest()[:16]}.npy"
    if cache_file.exists():
        try:
            pixels = np.load(cache_file, mmap_mode="r", allow_pickle=False)
            log.info("loaded decoded images from cache %s", cache_file)
            return pixels
        except (OSError, ValueError) as error:
            log.warning("the cache %s cannot be read (%s): decoding the images again", cache_file, error)
    pixels = _decode(images)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with written_whole(cache_file) as file:  # runs started together (a cross-validation's folds) each write it whole
        np.save(file, pixels)
    return np.load(cache_file, mmap_mode="r", allow_pickle=False)


def load_dataset(spec: TaskSpec, root: Path, seed: int = 0, cache_dir: Path = Path(".cache")) -> Dataset:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist. Expected layout: {spec.data_hint}")
    raw_items = SOURCES[spec.source](spec, root, cache_dir)
    if not any(raw_items.values()):
        raise DataError(f"no images found under {root}. Expected layout: {spec.data_hint}")

    notes: list[str] = []
    items = assign_splits(raw_items, spec, seed, notes)
    found = sorted({i.label for split in items.values() for i in split})
    classes = list(spec.classes) if spec.classes else found
    missing = set(found) - set(classes)
    if missing or len(classes) < 2:
        raise DataError(f"found classes {found}, expected {classes}")
    if without := [name for name in classes if name not in {i.label for i in items["train"]}]:
        raise DataError(
            f"no training images of {without}; the classes with some: {sorted({i.label for i in items['train']})}"
        )
    if spec.positive_class is not None and spec.positive_class not in classes:
        raise DataError(f"the positive class {spec.positive_class!r} is not one of the classes {classes}: rename it")
    if spec.positive_class is not None and len(classes) != 2:
        raise DataError(
            f"a positive class (and its threshold) is for two classes, and there are {len(classes)}, {classes}: leave "
            "positive_class out (the label is then the most probable class), or merge folders with class_map"
        )

    manifest = sorted((split, i.id, i.label, i.digest) for split, lst in items.items() for i in lst)
    fingerprint = hashlib.sha256(json.dumps(manifest).encode()).hexdigest()
    images = sorted((item for split in SPLITS for item in items[split]), key=lambda item: item.id)
    row = {item.id: n for n, item in enumerate(images)}
    if len(row) != len(images):  # a source must name each image once: the cache's rows are found by name
        raise DataError(f"{len(images) - len(row)} images share their id with another: {spec.source} named them twice")
    pixels = _cached_pixels(images, spec, Path(cache_dir))
    index = {c: n for n, c in enumerate(classes)}
    splits = {
        split: Split(
            pixels=pixels[[row[i.id] for i in items[split]]],  # a copy in memory, in the split's order
            labels=np.array([index[i.label] for i in items[split]], dtype=np.int64),
            ids=[i.id for i in items[split]],
        )
        for split in SPLITS
    }
    return Dataset(classes=classes, splits=splits, fingerprint=fingerprint, notes=notes)
