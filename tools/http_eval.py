"""Evaluate a running service over HTTP on a labelled image folder, as an independent evaluator would.

    python tools/http_eval.py emotion ../shared/datasets/emotion/val --url http://localhost:3000
    python tools/http_eval.py alzheimer ../shared/datasets/alzheimer/test --map VeryMildDemented=MCI \
        --map MildDemented=AD --map ModerateDemented=AD

Every image in ``<folder>/<class>/`` is posted to ``POST /<model>/predict`` as it is on disk (the service decodes
and preprocesses it), and the returned labels are scored against the folder names: accuracy, balanced accuracy,
per-class recall and the confusion matrix, printed beside the metrics in the model's card. Folders whose name is
neither a class of the model nor mapped to one with ``--map`` are skipped. Needs only httpx (which bentoml
installs) and the standard library, so it runs from the serving environment.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".dcm"}


def labelled_images(folder: Path, classes: list[str], mapping: dict[str, str]) -> list[tuple[Path, str]]:
    images, skipped = [], []
    for class_folder in sorted(p for p in folder.iterdir() if p.is_dir()):
        label = mapping.get(class_folder.name, class_folder.name)
        if label not in classes:
            skipped.append(class_folder.name)
            continue
        images += [(path, label) for path in sorted(class_folder.iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]
    if skipped:
        print(f"skipped folders that are not classes of the model: {', '.join(skipped)}", file=sys.stderr)
    return images


def score(truth: list[str], predicted: list[str], classes: list[str]) -> dict:
    pairs = Counter(zip(truth, predicted, strict=True))
    confusion = [[pairs[t, p] for p in classes] for t in classes]
    recall = {c: row[i] / sum(row) for i, (c, row) in enumerate(zip(classes, confusion, strict=True)) if sum(row)}
    return {
        "n": len(truth),
        "accuracy": sum(t == p for t, p in zip(truth, predicted, strict=True)) / len(truth),
        "balanced_accuracy": sum(recall.values()) / len(recall),
        "recall": recall,
        "classes": classes,
        "confusion_matrix": confusion,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python tools/http_eval.py",
        description="Score a running service's POST /<model>/predict on a labelled folder <folder>/<class>/*.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("model", help="model name, as in GET /models")
    parser.add_argument("folder", type=Path, help="labelled images: <folder>/<class>/<image>")
    parser.add_argument("--url", default="http://localhost:3000", help="the service")
    parser.add_argument("--map", action="append", default=[], metavar="FOLDER=CLASS", help="folder name → class")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--out", type=Path, help="also write the result here (JSON)")
    args = parser.parse_args(argv)
    mapping = dict(item.split("=", 1) for item in args.map)

    with httpx.Client(base_url=args.url, timeout=60) as client:
        entries = {entry["name"]: entry for entry in client.get("/models").raise_for_status().json()["models"]}
        if args.model not in entries:
            parser.error(f"the service has no model {args.model!r}; it has {', '.join(sorted(entries))}")
        version, card = entries[args.model]["version"], entries[args.model]["card"]
        images = labelled_images(args.folder, card["classes"], mapping)
        if not images:
            parser.error(f"no images of the model's classes {card['classes']} under {args.folder}")

        def predict(path: Path) -> str:
            response = client.post(f"/{args.model}/predict", files={"image": (path.name, path.read_bytes())})
            if response.status_code != 200:
                raise SystemExit(f"{path}: HTTP {response.status_code} {response.text[:300]}")
            return response.json()["label"]

        with ThreadPoolExecutor(args.concurrency) as pool:
            predicted = list(pool.map(predict, (path for path, _ in images)))

    result = score([label for _, label in images], predicted, card["classes"])
    result.update(model=args.model, version=version, folder=str(args.folder))
    print(f"{args.model} v{version} over HTTP on {result['n']} images of {args.folder}:")
    print(f"  accuracy {result['accuracy']:.4f}, balanced accuracy {result['balanced_accuracy']:.4f}")
    print("  recall " + ", ".join(f"{c} {r:.3f}" for c, r in result["recall"].items()))
    for split in ("val", "test"):
        metrics = card.get("metrics", {}).get(split)
        if metrics and "accuracy" in metrics:
            print(f"  card, {split} split: accuracy {metrics['accuracy']:.4f} on {metrics.get('n')} images")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
