"""Every task spec trains, evaluates, exports and publishes on tiny generated data (never ../shared).

The tiny models are trained once per session (``trained`` fixture) into one model repository, which
tests/test_end_to_end.py then serves over HTTP.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from contract.card import ModelCard, sha256_file
from tests.synthetic import make_image_folder, make_mnist_idx
from tests.tiny_tasks import TINY, Trained, train
from training import run
from training.files import sole_writer
from training.tasks import TASKS


def assert_published(models: Path, name: str, kind: str, version: str = "1") -> ModelCard:
    folder = models / name / version
    card = ModelCard.load(folder)
    assert card.kind == kind
    assert card.onnx.sha256 == sha256_file(folder / "model.onnx")
    assert card.onnx.parity_max_abs_diff is not None and card.onnx.parity_max_abs_diff <= 1e-4
    assert card.onnx.inputs[0].shape[0] == -1, "the batch dimension must be dynamic"
    assert sum(card.splits.values()) > 0 and card.dataset["fingerprint"]
    assert (folder / "report").is_dir()
    return card


@pytest.mark.parametrize("task", sorted(TINY))
def test_image_task_trains_and_exports(task: str, trained: Trained) -> None:
    card = assert_published(trained.models, task, "classifier")
    assert card.input.channels == TASKS[task].input.channels
    assert card.explanation is not None and card.explanation.parity_max_rel_diff <= 1e-4  # class activation maps
    assert [o.name for o in card.onnx.outputs] == ["probabilities", card.explanation.output]
    metrics = card.metrics["test"]
    for key in ("accuracy", "precision", "recall", "f1", "specificity", "roc_auc", "pr_auc", "confusion_matrix"):
        assert key in metrics
    report = trained.models / task / "1" / "report"
    for name in ("metrics.json", "curves.png", "roc.png", "pr.png", "confusion.png", "history.csv"):
        assert (report / name).stat().st_size > 0, name
    if TASKS[task].positive_class:
        assert card.positive_class == TASKS[task].positive_class and 0 <= card.threshold <= 1
    checkpoint = next((trained.runs / task).glob("*/best.pt"))
    state = torch.load(checkpoint, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state["state_dict"].values())
    assert np.isfinite(state["val_loss"])


def test_alzheimer_class_map_is_data(trained: Trained) -> None:
    """NonDemented is left out and the three dementia stages collapse onto MCI / AD, as the spec declares."""
    card = ModelCard.load(trained.models / "alzheimer" / "1")
    assert card.classes == ["MCI", "AD"] and card.positive_class == "AD"
    assert set(card.dataset["class_counts"]["train"]) == {"MCI", "AD"}
    total = sum(sum(counts.values()) for counts in card.dataset["class_counts"].values())
    assert total == 3 * TINY["alzheimer"]["per_class"], "NonDemented images must be left out"


def test_mnist_exports_classifier_and_autoencoder(trained: Trained) -> None:
    classifier = assert_published(trained.models, "mnist", "classifier")
    assert "input pixels" in classifier.explanation.layer  # a dense network: gradient x input
    assert classifier.classes == [str(d) for d in range(10)]
    assert "frozen_encoder_accuracy" in classifier.metrics["test"]
    autoencoder = assert_published(trained.models, "mnist_autoencoder", "autoencoder")
    assert [o.name for o in autoencoder.onnx.outputs] == ["reconstruction", "code"]
    assert autoencoder.onnx.outputs[1].shape == [-1, 30]
    assert 0 <= autoencoder.metrics["test"]["reconstruction_mse"] < 1
    assert (trained.models / "mnist_autoencoder" / "1" / "report" / "reconstructions.png").exists()


def test_mnist_run_reexports_from_its_checkpoints(trained: Trained, tmp_path: Path) -> None:
    """`--checkpoint <run>/best-autoencoder.pt --epochs 0` adopts every stage's checkpoint: same models, no training."""
    checkpoint = next((trained.runs / "mnist").glob("*/best-autoencoder.pt"))
    command = ["mnist", "--data", str(trained.data["mnist"]), "--epochs", "0", "--checkpoint", str(checkpoint),
               "--out", str(tmp_path / "models"), "--runs-dir", str(tmp_path / "runs"),
               "--cache-dir", str(trained.cache)]  # fmt: skip
    assert run.main(command) == 0
    for name, metric in (("mnist", "accuracy"), ("mnist_autoencoder", "reconstruction_mse")):
        before = ModelCard.load(trained.models / name / "1").metrics["test"][metric]
        after = ModelCard.load(tmp_path / "models" / name / "1").metrics["test"][metric]
        assert after == pytest.approx(before, abs=1e-6), name
    assert run.main([*command[:3], "--epochs", "1", *command[5:]]) != 0  # training on from it is not supported


def test_missing_data_folder_is_a_clear_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert train("chest_xray", tmp_path / "nowhere", tmp_path) == 2
    assert "does not exist" in caplog.text and "NORMAL" in caplog.text


def test_undecodable_files_are_named_all_at_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = make_image_folder(tmp_path / "data", ["COVID", "NORMAL"], per_class=8, size=32, splits=("train", "test"))
    (data / "train" / "COVID" / "notes.png").write_bytes(b"not an image at all")
    (data / "test" / "NORMAL" / "cut.png").write_bytes((data / "test" / "NORMAL" / "NORMAL_0.png").read_bytes()[:60])
    assert train("covid", data, tmp_path, "--arch", "compact_cnn", "--image-size", "32", "--no-export") == 2
    assert "2 image files cannot be decoded" in caplog.text
    assert "train/COVID/notes.png" in caplog.text and "test/NORMAL/cut.png (the image data is truncated" in caplog.text


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


def test_mirror_averaged_export_is_flip_invariant(tmp_path: Path) -> None:
    import onnxruntime as ort

    data = make_image_folder(tmp_path / "data", ["cats", "dogs"], per_class=12, size=40, mode="RGB")
    assert train("cats_dogs", data, tmp_path, "--image-size", "32", "--mirror-average") == 0
    card = assert_published(tmp_path / "models", "cats_dogs", "classifier")
    assert card.training["mirror_average"] is True and "mirror" in card.explanation.layer
    session = ort.InferenceSession(str(tmp_path / "models/cats_dogs/1/model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    probabilities, cam = session.run(None, {"input": x})
    mirror_probabilities, mirror_cam = session.run(None, {"input": x[..., ::-1].copy()})
    np.testing.assert_allclose(mirror_probabilities, probabilities, atol=1e-6)
    np.testing.assert_allclose(mirror_cam, cam[..., ::-1], atol=1e-5 * float(np.abs(cam).max()) + 1e-7)


def test_checkpoints_export_as_one_ensemble(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`--checkpoint A B --epochs 0`: one graph whose probabilities are the mean of the members', with maps."""
    import onnxruntime as ort

    from training.architectures import create_model

    data = make_image_folder(tmp_path / "data", ["COVID", "NORMAL"], per_class=12, size=40)
    common = ["--arch", "compact_cnn", "--image-size", "32"]
    checkpoints = []
    for lr in ("1e-3", "1e-2"):  # two different members
        assert train("covid", data, tmp_path / lr, *common, "--lr", lr, "--no-export") == 0
        checkpoints.append(str(next((tmp_path / lr / "runs" / "covid").glob("*/best.pt"))))
    assert train("covid", data, tmp_path, *common, "--checkpoint", *checkpoints) == 2  # epochs 1: refused
    assert "--epochs 0" in caplog.text
    assert train("covid", data, tmp_path, *common, "--epochs", "0", "--checkpoint", *checkpoints) == 0
    card = assert_published(tmp_path / "models", "covid", "classifier")
    assert card.architecture == "ensemble of 2 x compact_cnn" and "2 ensemble members" in card.explanation.layer
    assert sorted(p.name for p in (tmp_path / "runs" / "covid").glob("*/member*-best.pt")) == [
        "member1-best.pt",
        "member2-best.pt",
    ]

    x = np.random.default_rng(0).random((4, 1, 32, 32), dtype=np.float32)
    members = []
    for path in checkpoints:
        member = create_model("compact_cnn", in_chans=1, num_classes=2, image_size=32, pretrained=False).eval()
        member.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
        members.append(member)
    with torch.no_grad():
        expected = torch.stack([m(torch.from_numpy(x)).softmax(1) for m in members]).mean(0).numpy()
    session = ort.InferenceSession(str(tmp_path / "models/covid/1/model.onnx"), providers=["CPUExecutionProvider"])
    probabilities, cam = session.run(None, {"input": x})
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert cam.shape == (4, 2, 32, 32)

    # --half-weights: the same ensemble with its weights stored in float16, about half the file, same answers
    half = ["--epochs", "0", "--checkpoint", *checkpoints, "--half-weights", "--version", "2"]
    assert train("covid", data, tmp_path, *common, *half) == 0
    half_card = assert_published(tmp_path / "models", "covid", "classifier", version="2")
    assert half_card.training["half_weights"] is True
    full_size, half_size = ((tmp_path / f"models/covid/{v}/model.onnx").stat().st_size for v in ("1", "2"))
    assert half_size < 0.6 * full_size
    session = ort.InferenceSession(str(tmp_path / "models/covid/2/model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x})[0], expected, atol=2e-3)


def test_an_ensemble_member_is_built_as_its_run_built_it(tmp_path: Path) -> None:
    """A member whose run trained at 24 px with 3 stages joins a 32-px ensemble of 4-stage nets: it is built with 3
    stages, and the graph resizes the input to 24 px for it."""
    import onnxruntime as ort
    import torch.nn.functional as functional

    from training.architectures import create_model

    data = make_image_folder(tmp_path / "data", ["COVID", "NORMAL"], per_class=12, size=40)
    checkpoints, members = [], []
    for size, depth in ((32, 4), (24, 3)):
        assert train("covid", data, tmp_path / str(size), "--arch", "compact_cnn", "--image-size", str(size),
                     "--depth", str(depth), "--no-export") == 0  # fmt: skip
        checkpoints.append(str(next((tmp_path / str(size) / "runs" / "covid").glob("*/best.pt"))))
        member = create_model("compact_cnn", in_chans=1, num_classes=2, image_size=size, pretrained=False, depth=depth)
        member.eval()
        member.load_state_dict(torch.load(checkpoints[-1], weights_only=True)["state_dict"])
        members.append(member)
    common = ["--arch", "compact_cnn", "--image-size", "32", "--depth", "4", "--epochs", "0"]
    common += ["--checkpoint", *checkpoints]
    assert train("covid", data, tmp_path, *common) == 0
    card = assert_published(tmp_path / "models", "covid", "classifier")
    assert card.architecture == (
        "ensemble of 2 x compact_cnn; member 2 with depth=3; member 2 trained at 24 px, its input resized in the graph"
    )
    # the card keeps how each member was trained, not only the settings of the export
    assert [run["arch_options"]["depth"] for run in card.training["trained_by"]] == [4, 3]

    x = torch.from_numpy(np.random.default_rng(0).random((4, 1, 32, 32), dtype=np.float32))
    small = functional.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False)
    with torch.no_grad():
        expected = ((members[0](x).softmax(1) + members[1](small).softmax(1)) / 2).numpy()
    session = ort.InferenceSession(str(tmp_path / "models/covid/1/model.onnx"), providers=["CPUExecutionProvider"])
    probabilities, cam = session.run(None, {"input": x.numpy()})
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert cam.shape == (4, 2, 32, 32) and np.isfinite(cam).all()


def test_checkpoint_best_can_monitor_validation_accuracy(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", ["COVID", "NORMAL"], per_class=16, size=40)
    assert train("covid", data, tmp_path, "--arch", "compact_cnn", "--image-size", "32", "--epochs", "4",
                 "--recipe", "monitor=val_acc", "--no-export") == 0  # fmt: skip
    run_dir = next((tmp_path / "runs" / "covid").iterdir())
    with open(run_dir / "history.csv") as handle:
        accuracies = [float(row["val_acc"]) for row in csv.DictReader(handle)]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["training"]["best_epoch"] == 1 + accuracies.index(max(accuracies))  # the first best accuracy


def test_a_time_limit_ends_training_before_an_epoch_that_would_overrun_it(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", ["COVID", "NORMAL"], per_class=16, size=40)
    assert train("covid", data, tmp_path, "--arch", "compact_cnn", "--image-size", "32", "--epochs", "5",
                 "--time-limit", "0.0001", "--no-export") == 0  # fmt: skip
    run_dir = next((tmp_path / "runs" / "covid").iterdir())
    assert len((run_dir / "history.csv").read_text().splitlines()) == 1 + 1  # the header and one epoch
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["training"]["epochs_run"] == 1 and "accuracy" in metrics["test"]


def test_a_resumed_fit_ends_where_an_uninterrupted_one_does(tmp_path: Path) -> None:
    """Four epochs straight, and two then two more in a fresh model, optimizer and loader (as a new process has,
    its random state elsewhere): the same weights, learning-rate schedule, early-stopping state and history."""
    from training.data import Split
    from training.engine import classification, fit, make_loader
    from training.tasks import Augment, Recipe

    spec = TASKS["covid"].input.model_copy(update={"height": 16, "width": 16})
    rng = np.random.default_rng(0)
    train_split = Split(rng.integers(0, 256, (48, 1, 16, 16), dtype=np.uint8), np.arange(48) % 2, [""] * 48)
    val_split = Split(rng.integers(0, 256, (16, 1, 16, 16), dtype=np.uint8), np.arange(16) % 2, [""] * 16)
    # every epoch after the first a plateau (threshold 50 %): the learning rate falls from the second on
    recipe = Recipe(epochs=4, batch_size=16, lr=0.05, plateau_patience=0, plateau_threshold=0.5)

    def session(run_dir: Path, epochs: int, seed: int, resume: bool = False) -> None:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(), torch.nn.Linear(4, 2),
        )  # fmt: skip
        train = make_loader(train_split, spec, 16, Augment(rotation=10, hflip=True), 0, True, 0)
        val = make_loader(val_split, spec, 16, None, 0, False, 0)
        recipe_now = dataclasses.replace(recipe, epochs=epochs)
        fit(model, train, val, classification(None), recipe_now, torch.device("cpu"), run_dir, resume=resume)

    def history(run_dir: Path) -> list[dict]:
        with open(run_dir / "history.csv") as handle:
            return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir(), resumed.mkdir()
    session(straight, 4, seed=0)
    session(resumed, 2, seed=0)
    session(resumed, 4, seed=1, resume=True)  # another seed: the random state must come from last.pt

    ends = [torch.load(d / "last.pt", weights_only=True) for d in (straight, resumed)]
    for name, weights in ends[0]["state_dict"].items():
        assert torch.equal(weights, ends[1]["state_dict"][name]), name
    assert ends[0]["scheduler"] == ends[1]["scheduler"]
    first, second = ({k: v for k, v in end["progress"].items() if k not in ("seconds",)} for end in ends)
    assert first == second and first["epoch"] == 4 and first["images"] == 4 * 48
    assert history(straight) == history(resumed) and len(history(resumed)) == 4
    assert [float(row["lr"]) for row in history(resumed)] == [0.05, 0.05, 0.01, 0.002]  # restored after epoch 2


def test_a_run_stopped_by_its_time_limit_goes_on_with_resume(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    data = make_image_folder(tmp_path / "data", ["COVID", "NORMAL"], per_class=16, size=40)
    assert train("covid", data, tmp_path, "--arch", "compact_cnn", "--image-size", "32", "--epochs", "3",
                 "--time-limit", "0.0001", "--no-export") == 0  # fmt: skip
    run_dir = next((tmp_path / "runs" / "covid").iterdir())
    assert json.loads((run_dir / "metrics.json").read_text())["training"]["epochs_run"] == 1

    assert run.main(["--resume", str(run_dir), "--time-limit", "0"]) == 0  # no limit this time
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["training"]["epochs_run"] == 3 and "accuracy" in metrics["test"]
    assert len((run_dir / "history.csv").read_text().splitlines()) == 1 + 3
    config = json.loads((run_dir / "config.json").read_text())
    assert config["resumes"] == 1 and config["recipe"]["time_limit_minutes"] == 0 and config["data_fingerprint"]
    assert list((tmp_path / "runs" / "covid").iterdir()) == [run_dir]  # no second run folder
    with sole_writer(run_dir):  # as if that run were still going: a second process must not write beside it
        assert run.main(["--resume", str(run_dir)]) == 2 and "in use by another training process" in caplog.text
    assert json.loads((run_dir / "config.json").read_text())["resumes"] == 1

    assert run.main(["--resume", str(run_dir), "--workers", "0"]) == 0  # finished: evaluates its best again
    assert "training resumed after epoch 3: nothing more to train" in capsys.readouterr().out

    with pytest.raises(SystemExit):  # settings are the run's own
        run.main(["--resume", str(run_dir), "--lr", "0.1"])
    assert "--lr cannot change" in capsys.readouterr().err
    assert run.main(["--resume", str(run_dir), "--epochs", "0"]) == 2 and "--checkpoint" in caplog.text
    (data / "train" / "COVID" / "extra.png").write_bytes((data / "train" / "NORMAL").iterdir().__next__().read_bytes())
    assert run.main(["--resume", str(run_dir), "--epochs", "4"]) == 2
    assert "not those the run started with" in caplog.text
    assert run.main(["--resume", str(tmp_path)]) == 2 and "no config.json there" in caplog.text


def test_a_resumed_fit_keeps_best_and_last_in_agreement(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A new best is written as best.pt.pending, then the epoch's last.pt, then renamed: a run stopped between
    the two files keeps the pending best if its last.pt was written (its epoch counts) and drops it otherwise; a run
    from before last.pt existed cannot be resumed (its best.pt would be overwritten from scratch)."""
    data = make_image_folder(tmp_path / "data", ["COVID", "NORMAL"], per_class=8, size=32)
    assert train("covid", data, tmp_path, "--arch", "compact_cnn", "--image-size", "32", "--epochs", "2",
                 "--no-export") == 0  # fmt: skip
    run_dir = next((tmp_path / "runs" / "covid").iterdir())
    best, pending = run_dir / "best.pt", run_dir / "best.pt.pending"
    state = torch.load(best, weights_only=True)
    zeros = {name: torch.zeros_like(weights) for name, weights in state["state_dict"].items()}

    def best_is_zeros() -> bool:
        weights = torch.load(best, weights_only=True)["state_dict"]
        return all(torch.equal(weights[name], zeros[name]) for name in zeros)

    torch.save(state | {"state_dict": zeros, "epoch": 3}, pending)  # from an epoch 3 that never finished
    assert run.main(["--resume", str(run_dir)]) == 0
    assert not pending.exists() and not best_is_zeros()
    torch.save(state | {"state_dict": zeros}, pending)  # from the best epoch, whose last.pt was written
    assert run.main(["--resume", str(run_dir)]) == 0
    assert not pending.exists() and best_is_zeros()

    (run_dir / "last.pt").unlink()
    assert run.main(["--resume", str(run_dir)]) == 2 and "cannot be resumed" in caplog.text
    assert best_is_zeros()


def test_a_resumed_task_in_stages_extends_only_its_latest_stage(tmp_path: Path) -> None:
    """mnist trains an autoencoder, a classifier on its code, then fine-tunes both: a stage that a later one started
    from is final, so more --epochs on --resume go to the stage that was running (the fine-tuning has its own)."""
    data = make_mnist_idx(tmp_path / "data", train=300, test=60)
    assert train("mnist", data, tmp_path, "--no-export", "--recipe", "finetune_epochs=2") == 0
    run_dir = next((tmp_path / "runs" / "mnist").iterdir())

    def epochs() -> list[int]:
        files = ("history-autoencoder.csv", "history.csv", "history-finetune.csv")
        return [len((run_dir / f).read_text().splitlines()) - 1 for f in files]

    assert run.main(["--resume", str(run_dir), "--epochs", "2"]) == 0
    assert epochs() == [1, 1, 2]  # every stage had finished
    for name in ("last-finetune.pt", "best-finetune.pt", "history-finetune.csv"):
        (run_dir / name).unlink()  # as if stopped before the fine-tuning's first epoch ended
    assert run.main(["--resume", str(run_dir), "--epochs", "2"]) == 0
    assert epochs() == [1, 2, 2]


def test_a_negative_time_limit_is_refused_before_any_data_is_read(caplog: pytest.LogCaptureFixture) -> None:
    assert run.main(["covid", "--data", "no/such/folder", "--time-limit", "-5"]) == 2
    assert "time limit" in caplog.text


def test_an_adopted_checkpoint_counts_every_epoch_of_its_history(tmp_path: Path) -> None:
    """Best at epoch 2 of a run of 4: the card records 4 epochs run and their time, not the best epoch's."""
    from training.engine import adopt_checkpoint

    model = torch.nn.Linear(2, 2)
    source = tmp_path / "run" / "best.pt"
    source.parent.mkdir()
    torch.save({"state_dict": model.state_dict(), "epoch": 2, "val_loss": 0.5}, source)
    rows = "".join(f"{e},0.001,0.9,0.5,0.8,0.6,{e * 10}\n" for e in range(1, 5))
    (tmp_path / "run" / "history.csv").write_text("epoch,lr,train_loss,train_acc,val_loss,val_acc,seconds\n" + rows)
    (tmp_path / "new").mkdir()
    result = adopt_checkpoint(model, source, tmp_path / "new", torch.device("cpu"))
    assert (result.best_epoch, result.epochs_run, result.seconds) == (2, 4, 100.0)


def test_a_checkpoint_adopted_without_its_history_exports(tmp_path: Path) -> None:
    """`--checkpoint elsewhere/model.pt --epochs 0`: no history.csv beside it, so no curves and no train accuracy."""
    import shutil

    data = make_image_folder(tmp_path / "data", ["COVID", "NORMAL"], per_class=8, size=32)
    common = ("--arch", "compact_cnn", "--image-size", "32")
    assert train("covid", data, tmp_path / "first", *common, "--no-export") == 0
    lone = tmp_path / "elsewhere" / "model.pt"
    lone.parent.mkdir()
    shutil.copyfile(next((tmp_path / "first" / "runs" / "covid").glob("*/best.pt")), lone)
    assert train("covid", data, tmp_path, *common, "--epochs", "0", "--checkpoint", str(lone)) == 0
    card = ModelCard.load(tmp_path / "models" / "covid" / "1")
    assert card.metrics["training"]["train_accuracy"] is None and card.metrics["test"]["n"] > 0


def test_epochs_zero_without_a_checkpoint_is_refused_before_any_data_is_read(caplog: pytest.LogCaptureFixture) -> None:
    assert run.main(["covid", "--data", "no/such/folder", "--epochs", "0"]) == 2
    assert "--epochs 0 evaluates and exports a --checkpoint" in caplog.text
    assert run.main(["covid", "--data", "no/such/folder", "--epochs", "-1"]) == 2
    assert "epochs must be 0" in caplog.text and "does not exist" not in caplog.text


def test_a_diverged_training_is_a_clear_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every validation loss NaN: no checkpoint was ever the best, and the run says why instead of a traceback."""
    data = make_image_folder(tmp_path / "data", ["COVID", "NORMAL"], per_class=8, size=32)
    assert train("covid", data, tmp_path, "--arch", "compact_cnn", "--image-size", "32", "--lr", "1e30") == 2
    assert "training diverged" in caplog.text


def test_recipe_and_augment_overrides_are_typed_and_recorded() -> None:
    args = run.parse_args(
        ["emotion", "--data", "x", "--recipe", "optimizer=adamw", "--recipe", "plateau_patience=8"]
        + ["--recipe", "weight_decay=5e-4", "--no-class-weights", "--label-smoothing", "0.1"]
        + ["--augment", "hflip=false", "--augment", "zoom=0.2", "--lr", "0.01"]
    )
    spec, config = run.resolve(args)
    recipe = spec.recipe
    assert (recipe.optimizer, recipe.plateau_patience, recipe.weight_decay) == ("adamw", 8, 5e-4)
    assert isinstance(recipe.plateau_patience, int) and recipe.lr == 0.01
    assert (recipe.class_weights, recipe.label_smoothing) == (False, 0.1)
    assert (spec.augment.hflip, spec.augment.zoom, spec.augment.rotation) == (False, 0.2, 20)
    assert config.recipe["optimizer"] == "adamw" and config.augmentation["zoom"] == 0.2  # written into the card


def test_photometric_augmentation_and_random_erasing() -> None:
    from training.engine import build_augmentation
    from training.tasks import Augment

    image = torch.full((1, 32, 32), 128, dtype=torch.uint8)
    torch.manual_seed(0)
    erased = build_augmentation(Augment(erasing=1.0), (32, 32))(image)
    assert erased.dtype == torch.uint8 and erased.shape == image.shape
    assert (erased == 0).any() and (erased == 128).any()  # one rectangle blanked, the rest untouched
    jitter = build_augmentation(Augment(brightness=0.5, contrast=0.5), (32, 32))
    assert len({float(jitter(image).float().mean()) for _ in range(8)}) > 1
    spec, _ = run.resolve(run.parse_args(["emotion", "--data", "x", "--augment", "erasing=0.25"]))
    assert spec.augment.erasing == 0.25


@pytest.mark.parametrize("setting", ["crop=1.5", "erasing=2", "zoom=-0.1", "brightness=3"])
def test_an_impossible_augmentation_is_refused_before_any_data_is_read(
    setting: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert run.main(["cats_dogs", "--data", "no/such/folder", "--augment", setting]) == 2
    assert f"augmentation {setting.split('=')[0]} must be between" in caplog.text
    assert "no/such/folder" not in caplog.text


def test_random_resized_crop_keeps_the_input_size() -> None:
    from training.engine import build_augmentation
    from training.tasks import Augment

    image = torch.arange(3 * 40 * 32, dtype=torch.float32).reshape(3, 40, 32).to(torch.uint8)
    torch.manual_seed(0)
    crop = build_augmentation(Augment(crop=0.3), (40, 32))
    views = [crop(image) for _ in range(4)]
    assert all(v.shape == image.shape and v.dtype == torch.uint8 for v in views)
    assert any(not torch.equal(v, image) for v in views)  # a patch, zoomed back to the full size


@pytest.mark.parametrize("setting", ["optimizer=lion", "no_such_key=1", "plateau_patience=", "epochs=ten"])
def test_bad_recipe_override_is_a_clear_error(setting: str, caplog: pytest.LogCaptureFixture) -> None:
    assert run.main(["emotion", "--data", "x", "--recipe", setting]) == 2
    assert "--recipe" in caplog.text


def test_an_option_the_architecture_lacks_fails_before_any_data_is_read(caplog: pytest.LogCaptureFixture) -> None:
    # covid's default architecture is the pretrained Lite0, which has no depth: --depth needs --arch covid_cnn
    assert run.main(["covid", "--data", "no/such/folder", "--depth", "3"]) == 2
    assert "--arch efficientnet_lite0 has no option --depth; it takes --freeze" in caplog.text
    assert "no/such/folder" not in caplog.text
    spec, config = run.resolve(run.parse_args(["covid", "--data", "x", "--arch", "covid_cnn", "--depth", "3"]))
    assert config.arch_options == {"depth": 3}


def test_compare_writes_one_table(tmp_path: Path) -> None:
    from training import compare

    data = make_image_folder(tmp_path / "data", ["COVID", "NORMAL"], per_class=16, size=40)
    code = compare.main(
        [
            "covid",
            "--data",
            str(data),
            "--vary",
            "depth",
            "1",
            "2",
            "--out",
            str(tmp_path / "cmp"),
            "--",
            "--arch",
            "covid_cnn",
            "--epochs",
            "1",
            "--image-size",
            "32",
            "--workers",
            "0",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert code == 0
    table = (tmp_path / "cmp" / "covid" / "depth.md").read_text()
    assert "depth=1" in table and "depth=2" in table and "test_acc" in table
    rows = json.dumps((tmp_path / "cmp" / "covid" / "depth.csv").read_text())
    assert rows.count("depth=") == 2


def test_compare_cross_validates_with_folds(tmp_path: Path) -> None:
    from training import compare

    data = make_image_folder(tmp_path / "data", ["COVID", "NORMAL"], per_class=16, size=40)
    extra = ["--arch", "compact_cnn", "--epochs", "1", "--image-size", "32", "--workers", "0"]
    code = compare.main(["covid", "--data", str(data), "--folds", "2", "--out", str(tmp_path / "cv"), "--", *extra,
                         "--cache-dir", str(tmp_path / "cache")])  # fmt: skip
    assert code == 0
    table = (tmp_path / "cv" / "covid" / "fold.md").read_text()
    assert "2-fold cross-validation" in table and "| fold=1/2 |" in table and "| fold=2/2 |" in table
    with open(tmp_path / "cv" / "covid" / "fold.csv") as handle:
        rows = {row["variant"]: row for row in csv.DictReader(handle)}
    folds = [float(rows[f"fold={k}/2"]["test_acc"]) for k in (1, 2)]
    assert float(rows["mean"]["test_acc"]) == pytest.approx(sum(folds) / 2)
    assert float(rows["sd"]["test_acc"]) == pytest.approx(abs(folds[0] - folds[1]) / 2**0.5)
    tested = [json.loads(p.read_text())["test"]["n"] for p in (tmp_path / "cv").glob("covid/fold/*/*/*/metrics.json")]
    assert sorted(tested) == [16, 16]  # the 32 images, each tested once


def test_a_test_fold_from_a_task_file_is_not_exported_either(tmp_path: Path) -> None:
    task = tmp_path / "covid_fold.toml"
    task.write_text('base = "covid"\ndescription = "d"\nintended_input = "i"\ntest_fold = [2, 5]\n')
    spec, config = run.resolve(run.parse_args([str(task), "--data", "x"]))
    assert spec.test_fold == (2, 5) and not config.export
    with pytest.raises(ValueError, match="--test-fraction has no part in it"):
        run.resolve(run.parse_args([str(task), "--data", "x", "--test-fraction", "0.2"]))


def test_occlusion_scores_the_cards_test_split_with_parts_blacked_out(trained: Trained) -> None:
    """`python -m training.occlusion`: the whole images score the card's test figures; the variants are as named."""
    from training.occlusion import occluded, occlusion_report

    pixels = np.full((1, 1, 10, 10), 7, np.uint8)
    assert occluded(pixels, 0.6, keep_centre=False)[0, 0].sum() == 7 * (100 - 36)  # a frame of 2 pixels left
    assert occluded(pixels, 0.6, keep_centre=True)[0, 0, 2:8, 2:8].all() and occluded(pixels, 0.6, True).sum() == 7 * 36
    folder = trained.models / "alzheimer" / "1"
    rows = occlusion_report(folder, trained.data["alzheimer"], trained.cache, [0.5])
    assert [row["images"] for row in rows] == ["whole image", "centre 50% blacked out", "only the centre 50% kept"]
    test = ModelCard.load(folder).metrics["test"]
    assert rows[0]["accuracy"] == test["accuracy"] and rows[0]["roc_auc"] == pytest.approx(test["roc_auc"])


def test_split_folder_holds_the_cards_test_split_by_class(trained: Trained, tmp_path: Path) -> None:
    """`python -m training.split_folder`: the images the card's test metrics were measured on, a folder per class."""
    from training import split_folder

    card = ModelCard.load(trained.models / "alzheimer" / "1")
    out = tmp_path / "alzheimer-test"
    command = ["alzheimer", "--data", str(trained.data["alzheimer"]), "--models-dir", str(trained.models),
               "--cache-dir", str(trained.cache), "--out", str(out)]  # fmt: skip
    assert split_folder.main(command) == 0
    found = {folder.name: len(list(folder.iterdir())) for folder in out.iterdir()}
    assert found == {name: n for name, n in card.dataset["class_counts"]["test"].items() if n}
    link = next((out / "AD").iterdir())
    assert link.is_symlink() and link.resolve().is_relative_to(trained.data["alzheimer"].resolve())
    assert split_folder.main(command) == 2, "a folder that is not empty is refused"
