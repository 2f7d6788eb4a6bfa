"""A published model's held-out split as a folder per class, to score the running service on exactly what the card
measured.

    python -m training.split_folder chest_xray --data ../shared/datasets/chest_xray --out /tmp/chest_xray-test
    python tools/http_eval.py chest_xray /tmp/chest_xray-test

The split is rebuilt from ``--data`` as the card records it (the dataset fingerprint must match), and each of its
files is linked (or, with ``--copy``, copied) as ``<out>/<class>/<its path, / → __>``, named by the model's class, so
that ``tools/http_eval.py`` needs no ``--map``. Over HTTP the service should then reproduce the card's accuracy to
the last image; a difference is train/serve skew.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from contract.card import ModelCard
from contract.cli import HelpFormatter
from training.data import DataError
from training.published import add_published_model_arguments, card_dataset, published_model_folder

log = logging.getLogger("training.split_folder")


def write_split_folder(folder: Path, data_root: Path, out: Path, split: str, copy: bool, cache_dir: Path) -> int:
    """Link (or copy) the model's `split` into `out`/<class>/; the number of files."""
    if out.exists() and any(out.iterdir()):  # said before the dataset is read
        raise FileExistsError(f"{out} is not empty: give a new folder")
    data = card_dataset(ModelCard.load(folder), data_root, cache_dir)
    images = data.splits[split]
    for item_id, label in zip(images.ids, images.labels, strict=True):
        target = out / data.classes[label] / item_id.replace("/", "__")
        target.parent.mkdir(parents=True, exist_ok=True)
        source = (data_root / item_id).resolve()
        if copy:
            shutil.copyfile(source, target)
        else:
            target.symlink_to(source)
    return len(images.ids)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(
        prog="python -m training.split_folder", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    add_published_model_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, help="a new folder: <out>/<class>/<image>")
    parser.add_argument("--split", choices=("val", "test"), default="test", help="which held-out split")
    parser.add_argument("--copy", action="store_true", help="copy the files instead of linking them")
    args = parser.parse_args(argv)
    try:
        folder = published_model_folder(args)
        count = write_split_folder(folder, args.data, args.out, args.split, args.copy, args.cache_dir)
    except (DataError, FileNotFoundError, FileExistsError, ValueError) as error:
        log.error("%s", error)
        return 2
    log.info("%d %s images of %s in %s: python tools/http_eval.py %s %s", count, args.split, folder, args.out,
             folder.parent.name, args.out)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
