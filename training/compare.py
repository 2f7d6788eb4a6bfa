"""Train variants of one task and write one comparison table, to reproduce the reference reports' experiments; or
cross-validate one recipe (--folds N: one run per fold, then the folds' mean and standard deviation).

python -m training.compare emotion --data ../shared/datasets/emotion --vary arch emotion_alexnet emotion_vgg mobilenet
python -m training.compare cats_dogs --data ../shared/datasets/cats_dogs --vary augment on off -- --arch compact_cnn
python -m training.compare covid --data ../shared/datasets/covid --vary depth 1 2 3 4 5 -- --arch covid_cnn --epochs 5
python -m training.compare chest_xray --data ../shared/datasets/chest_xray --folds 5 -- --freeze 0.2
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

from training import run
from training.task_files import TASK_HELP, resolve_task, task_argument

COLUMNS = (
    "variant",
    "parameters",
    "train_acc",
    "val_acc",
    "test_acc",
    "balanced_acc",
    "roc_auc",
    "f1",
    "ms_per_image",
    "epochs",
    "seconds",
)


def variant_args(option: str, value: str) -> list[str]:
    """Turn one ``--vary`` value into training.run flags: on/off switches for augment and pretrained."""
    if option in ("augment", "pretrained"):
        on = value.lower() in ("on", "true", "yes", "1")
        if option == "augment":
            return [] if on else ["--no-augment"]
        return ["--pretrained" if on else "--no-pretrained"]
    return [f"--{option.replace('_', '-')}", value]


def summarise(variant: str, metrics: dict) -> dict:
    test, val, training = metrics["test"], metrics["val"], metrics["training"]
    return {
        "variant": variant,
        "parameters": training.get("parameters"),
        "train_acc": training.get("train_accuracy"),
        "val_acc": val["accuracy"],
        "test_acc": test["accuracy"],
        "balanced_acc": test["balanced_accuracy"],
        "roc_auc": test.get("roc_auc"),
        "f1": test.get("f1"),
        "ms_per_image": training.get("ms_per_image"),
        "epochs": training["epochs_run"],
        "seconds": training["seconds"],
    }


def spread(rows: list[dict]) -> list[dict]:
    """Rows "mean" and "sd" (sample standard deviation) of the numeric columns: cross-validation's summary."""
    numbers = {c: [row[c] for row in rows if isinstance(row[c], int | float)] for c in COLUMNS[1:]}
    return [
        {"variant": "mean"} | {c: statistics.fmean(v) if v else None for c, v in numbers.items()},
        {"variant": "sd"} | {c: statistics.stdev(v) if len(v) > 1 else None for c, v in numbers.items()},
    ]


def markdown(rows: list[dict]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4f}" if value < 10 else f"{value:.0f}"
        return "" if value is None else f"{value:,}" if isinstance(value, int) else str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        prog="python -m training.compare",
        description="Train one variant per value of an option (--vary), or one run per fold of a cross-validation "
        "(--folds), and write a comparison table (Markdown and CSV). Arguments after -- go to every training.run call "
        "(for example --epochs 5).",
    )
    parser.add_argument("task", type=task_argument, metavar="TASK", help=TASK_HELP)
    parser.add_argument("--data", required=True, type=Path)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--vary",
        nargs="+",
        metavar=("OPTION", "VALUE"),
        help="an option of training.run (arch, depth, dropout, init, width, image-size, "
        "test-fraction, ...; or augment/pretrained with on/off) followed by its values",
    )
    what.add_argument(
        "--folds",
        type=int,
        metavar="N",
        help="cross-validate: one run per fold (training.run --fold 1/N ... N/N, each testing on its fold of all the "
        "images, a task's group_pattern keeping patients whole), then the folds' mean and standard deviation",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="where runs and the table go")
    args = parser.parse_args(argv)
    if args.folds is not None:
        if args.folds < 2:
            parser.error(f"--folds takes 2 or more; got {args.folds}")
        option, values = "fold", [f"{k}/{args.folds}" for k in range(1, args.folds + 1)]
    else:
        option, values = args.vary[0], args.vary[1:]
    if not values:
        parser.error("--vary needs an option followed by at least one value")
    try:
        name = resolve_task(args.task).name
    except ValueError as error:
        parser.error(str(error))
    rows = []
    for value in values:
        variant = f"{option}={value}"
        runs_dir = args.out / name / option / value.replace("/", "-of-")
        code = run.main(
            [
                args.task,
                "--data",
                str(args.data),
                "--no-export",
                "--runs-dir",
                str(runs_dir),
                *variant_args(option, value),
                *passthrough,
            ]
        )
        if code != 0:
            print(f"variant {variant} failed (exit {code})", file=sys.stderr)
            continue
        latest = max(runs_dir.glob("*/*/metrics.json"), key=lambda p: p.stat().st_mtime)
        rows.append(summarise(variant, json.loads(latest.read_text())))
    failed = len(values) - len(rows)
    if args.folds is not None and len(rows) > 1:
        rows += spread(rows)
    title = f"{args.folds}-fold cross-validation" if args.folds is not None else f"varying {option}"
    title += f" ({failed} of the runs failed)" if failed else ""
    table = args.out / name / f"{option}.md"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(f"# {name}: {title}\n\n{markdown(rows)}\n")
    with open(table.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(markdown(rows))
    print(f"\ntable written to {table} and {table.with_suffix('.csv')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
