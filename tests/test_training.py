"""Every task spec trains, evaluates, exports and publishes on tiny generated data (never ../shared)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from contract.card import ModelCard, sha256_file
from tests.synthetic import make_image_folder, make_mnist_idx
from training import run
from training.tasks import TASKS

# Small inputs and a single epoch keep each task to seconds; the folder layout mirrors each real dataset.
TINY = {
    "chest_xray": dict(classes=["NORMAL", "PNEUMONIA"], splits=("train",), size="32"),
    "alzheimer": dict(
        classes=["NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"],
        splits=("train",),
        size="32",
    ),
    "covid": dict(classes=["COVID", "NORMAL"], splits=("train",), size="32"),
    "emotion": dict(classes=["angry", "happy", "sad"], splits=("train", "val"), size="32"),
    "cats_dogs": dict(classes=["cats", "dogs"], splits=("train",), size="32", mode="RGB"),
}


def train(task: str, data: Path, tmp_path: Path, *extra: str) -> int:
    return run.main(
        [
            task,
            "--data",
            str(data),
            "--epochs",
            "1",
            "--workers",
            "0",
            "--batch-size",
            "16",
            "--out",
            str(tmp_path / "models"),
            "--runs-dir",
            str(tmp_path / "runs"),
            "--cache-dir",
            str(tmp_path / "cache"),
            *extra,
        ]
    )


def assert_published(models: Path, name: str, kind: str) -> ModelCard:
    folder = models / name / "1"
    card = ModelCard.load(folder)
    assert card.kind == kind
    assert card.onnx.sha256 == sha256_file(folder / "model.onnx")
    assert card.onnx.parity_max_abs_diff is not None and card.onnx.parity_max_abs_diff <= 1e-4
    assert card.onnx.inputs[0].shape[0] == -1, "the batch dimension must be dynamic"
    assert sum(card.splits.values()) > 0 and card.dataset["fingerprint"]
    assert (folder / "report").is_dir()
    return card


@pytest.mark.parametrize("task", sorted(TINY))
def test_image_task_trains_and_exports(task: str, tmp_path: Path) -> None:
    spec = TINY[task]
    data = make_image_folder(
        tmp_path / "data",
        spec["classes"],
        per_class=24,
        size=48,
        mode=spec.get("mode", "L"),
        splits=spec["splits"],
    )
    assert train(task, data, tmp_path, "--image-size", spec["size"]) == 0
    card = assert_published(tmp_path / "models", task, "classifier")
    assert card.input.channels == TASKS[task].input.channels
    metrics = card.metrics["test"]
    for key in (
        "accuracy",
        "precision",
        "recall",
        "f1",
        "specificity",
        "roc_auc",
        "pr_auc",
        "confusion_matrix",
    ):
        assert key in metrics
    report = tmp_path / "models" / task / "1" / "report"
    for name in ("metrics.json", "curves.png", "roc.png", "pr.png", "confusion.png", "history.csv"):
        assert (report / name).stat().st_size > 0, name
    if TASKS[task].positive_class:
        assert card.positive_class == TASKS[task].positive_class and 0 <= card.threshold <= 1
    checkpoint = next((tmp_path / "runs" / task).glob("*/best.pt"))
    assert "state_dict" in torch.load(checkpoint, weights_only=True)


def test_alzheimer_class_map_is_data(tmp_path: Path) -> None:
    """NonDemented is left out and the three dementia stages collapse onto MCI / AD, as the spec declares."""
    data = make_image_folder(
        tmp_path / "data",
        ["NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"],
        per_class=20,
        size=40,
    )
    assert train("alzheimer", data, tmp_path, "--image-size", "32", "--no-export") == 0
    metrics = json.loads(next((tmp_path / "runs" / "alzheimer").glob("*/metrics.json")).read_text())
    assert set(metrics["test"]["per_class"]) == {"MCI", "AD"}
    assert sum(c["support"] for c in metrics["test"]["per_class"].values()) > 0


def test_mnist_exports_classifier_and_autoencoder(tmp_path: Path) -> None:
    data = make_mnist_idx(tmp_path / "mnist", train=300, test=60)
    assert train("mnist", data, tmp_path) == 0
    classifier = assert_published(tmp_path / "models", "mnist", "classifier")
    assert classifier.classes == [str(d) for d in range(10)]
    autoencoder = assert_published(tmp_path / "models", "mnist_autoencoder", "autoencoder")
    assert [o.name for o in autoencoder.onnx.outputs] == ["reconstruction", "code"]
    assert autoencoder.onnx.outputs[1].shape == [-1, 30]
    assert 0 <= autoencoder.metrics["test"]["reconstruction_mse"] < 1


def test_missing_data_folder_is_a_clear_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert train("chest_xray", tmp_path / "nowhere", tmp_path) == 2
    assert "does not exist" in caplog.text and "NORMAL" in caplog.text


def test_checkpoint_loads_without_pickle(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", ["NORMAL", "PNEUMONIA"], per_class=16, size=40)
    assert (
        train(
            "chest_xray",
            data,
            tmp_path,
            "--image-size",
            "32",
            "--arch",
            "compact_cnn",
            "--no-pretrained",
            "--no-export",
        )
        == 0
    )
    state = torch.load(next((tmp_path / "runs").rglob("best.pt")), weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state["state_dict"].values())
    assert np.isfinite(state["val_loss"])


def test_offline_pretrained_weights_fail_with_a_clear_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import urllib.error

    from torchvision.models import EfficientNet_B2_Weights

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(EfficientNet_B2_Weights, "get_state_dict", offline)
    data = make_image_folder(tmp_path / "data", ["NORMAL", "PNEUMONIA"], per_class=10, size=32)
    assert train("chest_xray", data, tmp_path, "--arch", "efficientnet_b2", "--pretrained", "--no-export") == 2
    assert "could not load ImageNet weights" in caplog.text and "efficientnet_lite0" in caplog.text
