"""Tiny versions of every task: generated data in each real dataset's layout, one epoch, small inputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.synthetic import make_image_folder, make_mnist_idx
from training import run

TINY = {
    "chest_xray": dict(classes=["NORMAL", "PNEUMONIA"], splits=("train",), per_class=24),
    "alzheimer": dict(
        classes=["NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"], splits=("train",), per_class=20
    ),
    "covid": dict(classes=["COVID", "NORMAL"], splits=("train",), per_class=24),
    "emotion": dict(classes=["angry", "happy", "sad"], splits=("train", "val"), per_class=20),
    "cats_dogs": dict(classes=["cats", "dogs"], splits=("train",), per_class=24, mode="RGB"),
}


@dataclass
class Trained:
    models: Path
    runs: Path
    data: dict[str, Path]
    cache: Path


def train(task: str, data: Path, tmp_path: Path, *extra: str) -> int:
    return run.main(
        [task, "--data", str(data), "--epochs", "1", "--workers", "0", "--batch-size", "16",
         "--out", str(tmp_path / "models"), "--runs-dir", str(tmp_path / "runs"),
         "--cache-dir", str(tmp_path / "cache"), *extra]
    )  # fmt: skip


def train_all(root: Path) -> Trained:
    """Train every task once into one model repository (about a minute on two cores)."""
    data = {}
    for task, spec in TINY.items():
        data[task] = make_image_folder(root / "data" / task, spec["classes"], per_class=spec["per_class"], size=48,
                                       mode=spec.get("mode", "L"), splits=spec["splits"])  # fmt: skip
        assert train(task, data[task], root, "--image-size", "32") == 0, task
    data["mnist"] = make_mnist_idx(root / "data" / "mnist", train=300, test=60)
    assert train("mnist", data["mnist"], root) == 0
    return Trained(models=root / "models", runs=root / "runs", data=data, cache=root / "cache")
