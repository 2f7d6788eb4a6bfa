"""Does a published model look where it should? Its test metrics with the centre of every image blacked out.

    python -m training.occlusion covid --data ../shared/datasets/covid

The card's test split, rebuilt from ``--data``, is scored by the model's ONNX file as it is, then with the central
part of every image blacked out (a frame of the border left) and with only that central part kept. A chest
radiograph model that still tells the classes apart from a 10 % frame, with no lung field in it, has learnt cues
outside the anatomy it is meant to read (markers, collimation, the scanner or hospital the images came from), which
another site's images will not share: measure before deploying there. Blacked-out images are unlike any the model
saw, so read the figures as a comparison between models and regions, not as accuracies to expect.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from contract.card import ModelCard
from contract.cli import HelpFormatter
from training.data import DataError
from training.evaluate import classification_metrics
from training.published import (
    add_published_model_arguments,
    card_dataset,
    probabilities,
    published_model_folder,
    session,
)

log = logging.getLogger("training.occlusion")


def occluded(pixels: np.ndarray, fraction: float, keep_centre: bool) -> np.ndarray:
    """`pixels` (N, C, H, W) with the central `fraction` of the height and width blacked out, or all but it."""
    height, width = pixels.shape[-2:]
    top, left = round(height * (1 - fraction) / 2), round(width * (1 - fraction) / 2)
    centre = (..., slice(top, height - top), slice(left, width - left))
    result = np.zeros_like(pixels) if keep_centre else pixels.copy()
    result[centre] = pixels[centre] if keep_centre else 0
    return result


def occlusion_report(folder: Path, data_root: Path, cache_dir: Path, fractions: list[float]) -> list[dict]:
    """One row per variant of the test images: its name, accuracy, balanced accuracy and ROC-AUC."""
    card = ModelCard.load(folder)
    if card.kind != "classifier":
        raise ValueError(f"{card.name} is an {card.kind}: the occlusion check scores classifiers")
    test = card_dataset(card, data_root, cache_dir).splits["test"]
    model = session(folder / "model.onnx")
    variants = {"whole image": test.pixels}
    for fraction in fractions:
        variants[f"centre {fraction:.0%} blacked out"] = occluded(test.pixels, fraction, keep_centre=False)
        variants[f"only the centre {fraction:.0%} kept"] = occluded(test.pixels, fraction, keep_centre=True)
    rows = []
    for name, pixels in variants.items():
        scores = probabilities(model, pixels, card.input)
        metrics = classification_metrics(test.labels, scores, card.classes, card.positive_index, card.threshold)
        rows.append({"images": name} | {key: metrics[key] for key in ("accuracy", "balanced_accuracy", "roc_auc")})
    return rows


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(
        prog="python -m training.occlusion", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    add_published_model_arguments(parser)
    parser.add_argument(
        "--fractions", default="0.6,0.8", help="central parts to black out, as fractions of the side (comma-separated)"
    )
    args = parser.parse_args(argv)
    try:
        fractions = [float(part) for part in args.fractions.split(",")]
        if not all(0 < fraction < 1 for fraction in fractions):
            raise ValueError(f"--fractions must lie between 0 and 1, got {args.fractions}")
        folder = published_model_folder(args)
        rows = occlusion_report(folder, args.data, args.cache_dir, fractions)
    except (DataError, FileNotFoundError, ValueError) as error:
        log.error("%s", error)
        return 2
    print(f"{folder}, test split ({args.data}):")
    print(f"{'images':<34} {'accuracy':>9} {'balanced':>9} {'ROC-AUC':>8}")
    for row in rows:
        auc = "-" if row["roc_auc"] is None else f"{row['roc_auc']:.3f}"
        print(f"{row['images']:<34} {row['accuracy']:>9.3f} {row['balanced_accuracy']:>9.3f} {auc:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
