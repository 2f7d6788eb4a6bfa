"""int8 static quantization: the file, the card entry, and when serving uses it (a tiny CNN, about 10 s)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from pydantic import ValidationError

from contract.card import ModelCard, QuantizedInfo, sha256_file
from contract.preprocessing import normalize
from serving.config import Settings
from serving.repository import ModelRepository
from tests.synthetic import make_image_folder
from tests.tiny_tasks import train


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A compact CNN trained for one epoch on generated chest_xray-style data, then quantized."""
    from training.quantize import quantize

    root = tmp_path_factory.mktemp("quantize")
    data = make_image_folder(root / "data", ["NORMAL", "PNEUMONIA"], per_class=30, size=40)
    extra = ("--image-size", "32", "--arch", "compact_cnn", "--no-pretrained", "--width", "8")
    assert train("chest_xray", data, root, *extra) == 0
    folder = root / "models" / "chest_xray" / "1"
    quantize(folder, data, calibration_images=16, timing_seconds=0.2, cache_dir=root / "cache")
    return folder, data


def test_quantize_writes_int8_file_and_card_entry(quantized: tuple[Path, Path]) -> None:
    folder, _ = quantized
    card = ModelCard.load(folder)
    info = card.quantized
    assert info is not None and (folder / info.file).is_file()
    assert info.sha256 == sha256_file(folder / info.file)
    assert 0.0 <= info.test_accuracy <= 1.0 and 0.0 <= info.fp32_test_accuracy <= 1.0
    assert info.speedup > 0 and info.calibration_images > 0
    close = info.test_accuracy >= info.fp32_test_accuracy - 0.01
    assert info.served == (close and info.speedup >= 1.1)
    assert card.onnx.sha256 == sha256_file(folder / card.onnx.file)  # the fp32 model is untouched
    assert card.explanation is not None
    int8_outputs = [output.name for output in onnx.load(str(folder / info.file)).graph.output]
    assert int8_outputs == [output.name for output in card.onnx.outputs]  # the explanation output survives


def test_card_refuses_served_int8_more_than_one_point_below_fp32() -> None:
    fields = dict(sha256="0" * 64, calibration_images=8, fp32_test_accuracy=0.90, speedup=2.0)
    assert QuantizedInfo(**fields, test_accuracy=0.895, served=True).served
    assert not QuantizedInfo(**fields, test_accuracy=0.80, served=False).served
    with pytest.raises(ValidationError, match="1 accuracy point"):
        QuantizedInfo(**fields, test_accuracy=0.88, served=True)


def _serve(models: Path, **settings: str) -> tuple[str, np.ndarray]:
    entry = ModelRepository.load(Settings(models_dir=models, **settings)).get("chest_xray")
    assert entry is not None and entry.runner is not None
    pixels = np.random.default_rng(0).integers(0, 255, (4, *entry.runner.input_shape), dtype=np.uint8)
    return entry.runner.precision, entry.runner.proba(normalize(pixels, entry.runner.card.input))


def test_serving_uses_int8_only_when_marked_served_and_verified(quantized: tuple[Path, Path], tmp_path: Path) -> None:
    models = tmp_path / "models"
    folder = models / "chest_xray" / "1"
    shutil.copytree(quantized[0], folder)
    card = ModelCard.load(folder)
    assert card.quantized is not None

    card.quantized = card.quantized.model_copy(update={"served": False})
    card.save(folder)
    assert _serve(models)[0] == "fp32"

    card.quantized = card.quantized.model_copy(
        update={"served": True, "test_accuracy": card.quantized.fp32_test_accuracy}
    )
    card.save(folder)
    precision, int8 = _serve(models)
    assert precision == "int8"
    off_precision, fp32 = _serve(models, int8="off")
    assert off_precision == "fp32"
    assert np.abs(int8 - fp32).max() < 0.2  # quantized, not another model

    (folder / card.quantized.file).write_bytes(b"not the file the card describes")
    assert _serve(models)[0] == "fp32"  # a mismatching int8 file is ignored, the verified fp32 model serves
