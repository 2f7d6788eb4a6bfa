"""`python -m training.halve`: a published classifier re-stored with float16 weights, as a new version judged on its
own splits (a tiny CNN, a few seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from contract.card import ModelCard, sha256_file
from serving.config import Settings
from serving.repository import ModelRepository
from tests.synthetic import make_image_folder
from tests.tiny_tasks import train


def test_halve_publishes_a_smaller_version_with_its_own_metrics(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from training.halve import main
    from training.quantize import quantize

    data = make_image_folder(tmp_path / "data", ["NORMAL", "PNEUMONIA"], per_class=30, size=40)
    extra = ("--image-size", "32", "--arch", "compact_cnn", "--no-pretrained", "--width", "16")
    assert train("chest_xray", data, tmp_path, *extra) == 0
    models = tmp_path / "models"
    quantize(models / "chest_xray" / "1", data, calibration_images=16, timing_seconds=0.2, cache_dir=tmp_path / "cache")
    command = ["chest_xray", "--data", str(data), "--models-dir", str(models), "--cache-dir", str(tmp_path / "cache")]
    assert main(command) == 0

    full, half = ModelCard.load(models / "chest_xray" / "1"), ModelCard.load(models / "chest_xray" / "2")
    assert half.version == "2" and half.training["half_weights"] is True and half.training["half_weights_of"] == "1"
    assert half.onnx.sha256 == sha256_file(models / "chest_xray" / "2" / half.onnx.file) != full.onnx.sha256
    size = {
        card.version: (models / "chest_xray" / card.version / card.onnx.file).stat().st_size for card in (full, half)
    }
    assert size["2"] < 0.7 * size["1"]
    assert 0 < half.training["half_weights_max_probability_change"] < 1e-2
    assert half.threshold == full.threshold and half.metrics["test"]["n"] == full.metrics["test"]["n"]
    assert abs(half.metrics["test"]["accuracy"] - full.metrics["test"]["accuracy"]) <= 2 / full.metrics["test"]["n"]
    assert (models / "chest_xray" / "2" / "report" / "roc.png").is_file()
    # v1's int8 file was quantized from the float32 weights: it must not be served as (or beside) v2
    assert full.quantized is not None and half.quantized is None
    assert not (models / "chest_xray" / "2" / full.quantized.file).exists()

    entry = ModelRepository.load(Settings(models_dir=models)).get("chest_xray")
    assert entry.ready and entry.version == "2" and entry.runner.precision == "fp32"  # verified against its card

    assert main(command) == 2 and "already stores its weights in float16" in caplog.text
    assert main([*command, "--data", str(tmp_path / "elsewhere")]) == 2
