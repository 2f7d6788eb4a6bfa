"""The model card: the JSON file beside every ONNX model in models/<name>/<version>/.

It is the whole contract a served model has with the world: what it expects as input (and so how preprocessing
builds that input), what it outputs, how it was trained and how good it is on held-out data.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CARD_FILE = "model.json"
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
MODEL_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"  # a model's name: its folder in models/ and its routes
VERSION_PATTERN = r"^[0-9]+$"  # a version: its folder in models/<name>/


class InputSpec(BaseModel):
    """How an image becomes the model's input tensor, float32 NCHW."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: Literal[1, 3]
    height: int = Field(gt=0, le=4096)
    width: int = Field(gt=0, le=4096)
    resize: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bilinear"
    normalization: Literal["scale", "mean_std", "minmax"] = "scale"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    polarity: Literal["as_is", "dark_background"] = "as_is"

    @model_validator(mode="after")
    def _mean_std_match_channels(self) -> InputSpec:
        if self.normalization == "mean_std":
            if self.mean is None or self.std is None:
                raise ValueError("mean_std normalization needs mean and std")
            if len(self.mean) != self.channels or len(self.std) != self.channels:
                raise ValueError("mean and std need one value per channel")
            if min(self.std) <= 0:
                raise ValueError("std must be positive")
        return self

    def describe(self) -> str:
        norm = {
            "scale": "scaled to [0, 1]",
            "minmax": "min-max normalised per image to [0, 1]",
            "mean_std": f"scaled to [0, 1], minus mean {self.mean}, divided by std {self.std}",
        }[self.normalization]
        mode = "grayscale" if self.channels == 1 else "RGB"
        return f"{mode} {self.width}x{self.height} ({self.resize} resize), {norm}"


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int]  # -1 marks the dynamic batch dimension
    description: str = ""


class OnnxInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str = ONNX_FILE
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    opset: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parity_max_abs_diff: float | None = None


class ExplanationInfo(BaseModel):
    """Which ONNX output explains a classifier's decision, and how it was computed (serving reads this, not code)."""

    model_config = ConfigDict(extra="forbid")

    output: str = "cam"  # float32 [N, classes, H, W]: one non-negative map per class, at the input resolution
    method: Literal["cam"] = "cam"
    layer: str  # the feature map the maps are computed on, e.g. "last spatial feature map, 4x4 cells"
    description: str = ""
    parity_max_rel_diff: float | None = None  # ONNX vs PyTorch, relative to the largest value of the maps


INT8_MAX_ACCURACY_DROP = 0.01  # an int8 model is served only within 1 accuracy point of its fp32 model


class QuantizedInfo(BaseModel):
    """A statically quantized (int8) copy of the model beside the fp32 file, and how it compares on held-out data."""

    model_config = ConfigDict(extra="forbid")

    file: str = INT8_FILE
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    calibration_images: int = Field(gt=0)  # validation images the activation ranges were calibrated on
    test_accuracy: float = Field(ge=0.0, le=1.0)  # on the card's test split, with the card's decision rule
    fp32_test_accuracy: float = Field(ge=0.0, le=1.0)  # the fp32 ONNX model, same images, same rule
    speedup: float = Field(gt=0.0)  # fp32 seconds / int8 seconds, batches of 32, on the CPU that quantized it
    speedup_single: float | None = Field(default=None, gt=0.0)  # the same for one image at a time
    served: bool  # serving may use the int8 file (within 1 accuracy point and faster)

    @model_validator(mode="after")
    def _served_only_if_close(self) -> QuantizedInfo:
        if self.served and self.test_accuracy < self.fp32_test_accuracy - INT8_MAX_ACCURACY_DROP - 1e-9:
            raise ValueError("an int8 model more than 1 accuracy point below fp32 cannot be marked served")
        return self


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=MODEL_NAME_PATTERN)
    version: str = Field(pattern=VERSION_PATTERN)
    kind: Literal["classifier", "autoencoder"]
    task: str
    description: str = ""
    intended_input: str = ""
    # what the model cannot be trusted with, measured: the service shows these with the card (GET /models, the page)
    limitations: list[str] = Field(default_factory=list)
    classes: list[str] = Field(default_factory=list)
    positive_class: str | None = None
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    threshold_rule: str | None = None
    input: InputSpec
    onnx: OnnxInfo
    architecture: str
    parameters: int
    metrics: dict[str, Any] = Field(default_factory=dict)
    splits: dict[str, int] = Field(default_factory=dict)
    dataset: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    quantized: QuantizedInfo | None = None  # written by `python -m training.quantize`
    explanation: ExplanationInfo | None = None  # None: exported without one, POST /<model>/explain answers 409
    created: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        if self.kind == "classifier":
            if len(self.classes) < 2:
                raise ValueError("a classifier needs at least two classes")
            if len(set(self.classes)) != len(self.classes):
                raise ValueError("class names must be unique")
        if self.positive_class is not None and self.positive_class not in self.classes:
            raise ValueError(f"positive_class {self.positive_class!r} is not one of the classes")
        if (self.threshold is None) != (self.positive_class is None):
            raise ValueError("threshold and positive_class go together")
        if self.threshold is not None and len(self.classes) != 2:
            raise ValueError("a decision threshold is for two classes (contract.decision)")
        if self.explanation is not None and self.kind != "classifier":
            raise ValueError("only a classifier can carry an explanation output")
        return self

    @property
    def positive_index(self) -> int | None:
        """The positive class's output index (binary models with a threshold; see contract.decision)."""
        return None if self.positive_class is None else self.classes.index(self.positive_class)

    def save(self, folder: Path) -> Path:
        path = Path(folder) / CARD_FILE
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: Path) -> ModelCard:
        return cls.model_validate_json((Path(folder) / CARD_FILE).read_text())


def version_folders(model_dir: Path) -> list[str]:
    """The version folders of models/<name>/, oldest first (by number: 10 after 9); none if it does not exist."""
    if not model_dir.is_dir():
        return []
    found = (p.name for p in model_dir.iterdir() if p.is_dir() and re.fullmatch(VERSION_PATTERN, p.name))
    return sorted(found, key=int)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
