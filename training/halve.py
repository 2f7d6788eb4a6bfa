"""Store a published classifier's weights in float16, as a new version judged on its own held-out splits.

    python -m training.halve covid --data ../shared/datasets/covid

``training.run --half-weights`` does this at export, from the checkpoint; this tool does it for a model already in
the repository, without its checkpoint. The graph's large weights are stored in float16 behind
Cast nodes (:func:`training.export.store_weights_in_half`: about half the file; onnxruntime folds the casts at load,
so inference still runs in float32 on the rounded weights). The new version is evaluated with onnxruntime on the
card's validation and test splits (rebuilt from ``--data``; the dataset fingerprint must match) with the card's
decision threshold, and its card gets those metrics, the new sha256 and the largest change of any probability
against the float32 graph; the report's plots are redrawn. An int8 copy of the old version is not carried over (it
was quantized from the float32 weights, not these): run ``training.quantize`` on the new version for one.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from contract.card import ModelCard, sha256_file
from contract.cli import HelpFormatter
from training.data import DataError
from training.evaluate import held_out_metrics, plot_test_results
from training.export import next_version, store_weights_in_half
from training.published import (
    add_published_model_arguments,
    card_dataset,
    probabilities,
    published_model_folder,
    session,
)

log = logging.getLogger("training.halve")


class HalveError(RuntimeError):
    pass


def halve(folder: Path, data_root: Path, cache_dir: Path = Path(".cache")) -> Path:
    """Publish `folder`'s model with float16 weight storage as the next version; returns the new folder."""
    original = ModelCard.load(folder)
    card = original.model_copy(deep=True)
    if card.kind != "classifier":
        raise HalveError(f"{card.name} is an {card.kind}; the tool re-judges classifiers by their metrics")
    if card.training.get("half_weights"):
        raise HalveError(f"{card.name} v{card.version} already stores its weights in float16")
    data = card_dataset(card, data_root, cache_dir)
    target = folder.parent / next_version(folder.parent.parent, card.name)
    int8_file = [card.quantized.file] if card.quantized else []
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns(*int8_file))
    try:
        store_weights_in_half(target / card.onnx.file)
        full, half = session(folder / card.onnx.file), session(target / card.onnx.file)
        splits = {split: data.splits[split] for split in ("val", "test")}
        half_probs = {split: probabilities(half, part.pixels, card.input) for split, part in splits.items()}
        change = max(
            float(np.abs(half_probs[split] - probabilities(full, part.pixels, card.input)).max())
            for split, part in splits.items()
        )
        positive = card.classes.index(card.positive_class) if card.positive_class is not None else None
        metrics = held_out_metrics(
            splits["val"].labels, half_probs["val"], splits["test"].labels, half_probs["test"], card.classes,
            positive, card.threshold,
        )  # fmt: skip
        card.version = target.name
        card.onnx.sha256 = sha256_file(target / card.onnx.file)
        card.metrics = {**card.metrics, **metrics}
        card.quantized = None
        card.training = {
            **card.training,
            "half_weights": True,
            "half_weights_of": folder.name,
            "half_weights_max_probability_change": change,
        }
        card.created = datetime.now(timezone.utc)
        card.save(target)
        report = target / "report"
        (report / "metrics.json").write_text(json.dumps(card.metrics, indent=2) + "\n")
        plot_test_results(splits["test"].labels, half_probs["test"], card.classes, positive, metrics, report, card.name)
    except BaseException:
        shutil.rmtree(target)
        raise
    ModelCard.load(target)  # the card must round-trip
    log.info(
        "published %s: %s v%s with float16 weights (%.1f MB, was %.1f MB); test accuracy %.4f (was %.4f), val %.4f "
        "(was %.4f); largest probability change %.1e",
        target, card.name, card.version, (target / card.onnx.file).stat().st_size / 1e6,
        (folder / card.onnx.file).stat().st_size / 1e6, metrics["test"]["accuracy"],
        original.metrics["test"]["accuracy"], metrics["val"]["accuracy"], original.metrics["val"]["accuracy"], change,
    )  # fmt: skip
    if int8_file:
        log.info("v%s's int8 file was left behind (made from other weights); quantize v%s anew if wanted: "
                 "python -m training.quantize %s --data %s --version %s",
                 folder.name, card.version, card.name, data_root, card.version)  # fmt: skip
    return target


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(
        prog="python -m training.halve",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    add_published_model_arguments(parser)
    args = parser.parse_args(argv)
    try:
        halve(published_model_folder(args), args.data, args.cache_dir)
    except (HalveError, DataError, FileNotFoundError, ValueError) as error:
        log.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
