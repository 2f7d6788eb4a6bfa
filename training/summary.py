"""Print the README's table of shipped models from their cards, next to the reference reports' results.

python -m training.summary [--models models]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from contract.card import ModelCard, version_folders
from training.tasks import recorded_task


def latest_cards(models: Path) -> list[ModelCard]:
    cards = []
    for folder in sorted(p for p in models.iterdir() if p.is_dir()):
        found = version_folders(folder)
        if found:
            cards.append(ModelCard.load(folder / found[-1]))
    return cards


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def row(card: ModelCard) -> str:
    test = card.metrics.get("test", {})
    training = card.metrics.get("training", {})
    minutes = training.get("seconds")
    if card.kind == "autoencoder":
        quality = f"reconstruction MSE {test['reconstruction_mse']:.4f}"
        cells = ["–"] * 6
    else:
        cells = [_fmt(test.get(k)) for k in ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "roc_auc")]
        cells.append(_fmt(test.get("f1")))
        notes = []
        if card.threshold is not None:
            notes.append(f"threshold {card.threshold:.3f}")
        if "frozen_encoder_accuracy" in test:
            notes.append(f"frozen-encoder acc {test['frozen_encoder_accuracy']:.3f}")
        if card.training.get("mirror_average"):
            notes.append("mean of image and mirror image")
        if card.training.get("half_weights"):
            notes.append("float16 weights")
        if card.quantized is not None and card.quantized.served:
            notes.append(f"int8 served: {card.quantized.test_accuracy:.3f}")
        if card.limitations:
            notes.append(f"{len(card.limitations)} measured limitation(s) in its card")
        quality = "; ".join(notes)
    try:
        task = recorded_task(card)
    except ValueError:  # a task spec recorded by another version of this code: the reference is a nicety
        task = None
    reference = ""
    if task is not None:
        from_scratch = not card.training.get("pretrained")
        reference = task.scratch_reference if from_scratch and task.scratch_reference else task.reference
    arch = card.architecture + (" (ImageNet)" if card.training.get("pretrained") else "")
    return " | ".join(
        [f"`{card.name}` v{card.version}", arch, str(card.splits.get("test", "")), *cells, quality,
         f"{minutes / 60:.0f}{' (GPU)' if training.get('device', '').startswith('cuda') else ''}" if minutes else "–",
         reference]
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.summary", description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("models"))
    args = parser.parse_args(argv)
    header = [
        "model", "architecture", "test n", "accuracy", "balanced acc", "sensitivity", "specificity", "ROC-AUC", "F1",
        "notes", "train min", "reference report",
    ]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for card in latest_cards(args.models):
        print(f"| {row(card)} |")


if __name__ == "__main__":
    main()
