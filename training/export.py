"""ONNX export, verified against PyTorch on real validation images, and publication into the model repository."""

from __future__ import annotations

import platform
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper
from torch import nn

from contract.card import ONNX_FILE, ExplanationInfo, ModelCard, OnnxInfo, TensorSpec, sha256_file, version_folders
from contract.preprocessing import normalize

OPSET = 18
PARITY_ATOL = 1e-4  # max |p_onnx - p_torch| for probabilities / reconstructions
EXPLANATION_PARITY_RTOL = 1e-2  # class activation maps: max |diff| / the maps' largest value (see verify_parity)


class ExportError(RuntimeError):
    pass


class WithSoftmax(nn.Module):
    """The served graph outputs probabilities, so serving needs no knowledge of the head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).softmax(dim=1)


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, output_names: list[str]) -> None:
    """Export with a dynamic batch dimension into one self-contained file and run onnx.checker on it."""
    module = module.eval().cpu()
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (example.cpu(),),
            dynamo=True,
            opset_version=OPSET,
            input_names=["input"],
            output_names=output_names,
            dynamic_shapes=({0: batch},),
            external_data=False,
            verbose=False,
        )
    program.save(str(path), external_data=False)
    onnx.checker.check_model(str(path), full_check=True)


HALF_MIN_ELEMENTS = 1024  # weights this large are stored in float16; smaller tensors (biases, constants) stay float32


def round_weights_to_half(model: nn.Module) -> nn.Module:
    """Round every float parameter and buffer to the nearest float16 value (kept in float32), in place.

    Done before evaluation when the ONNX file will store its weights in float16, so that the metrics, the parity
    check and serving all see the very same weights.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    return model


def store_weights_in_half(path: Path) -> None:
    """Store the graph's large float32 weights as float16, each behind a Cast back to float32.

    Half the file. onnxruntime folds the casts when it loads the graph, so inference still runs in float32, on the
    weights :func:`round_weights_to_half` rounded (lossless then, which the parity check confirms).
    """
    model = onnx.load(str(path))
    graph, casts = model.graph, []
    for initializer in graph.initializer:
        if initializer.data_type != onnx.TensorProto.FLOAT or np.prod(initializer.dims) < HALF_MIN_ELEMENTS:
            continue
        half = numpy_helper.from_array(
            numpy_helper.to_array(initializer).astype(np.float16), f"{initializer.name}_fp16"
        )
        casts.append(helper.make_node("Cast", [half.name], [initializer.name], to=onnx.TensorProto.FLOAT))
        initializer.CopyFrom(half)
    nodes = [*casts, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def verify_parity(module: nn.Module, path: Path, pixels: np.ndarray, spec, explanation: bool = False) -> list[float]:
    """onnxruntime must agree with PyTorch on real images: same argmax everywhere, every output within PARITY_ATOL
    of its scale (absolute for probabilities and reconstructions, relative to the largest value for larger maps).

    With `explanation`, the last output holds class activation maps, checked relative to their largest value within
    EXPLANATION_PARITY_RTOL: serving rescales each map to [0, 1], and the map's sum over channels of gradient x
    activation cancels terms, which makes it less exact than the probabilities (an ensemble of four EfficientNet-
    Lite0 at 224 px: 4e-3 of the map's range, where its probabilities agree within 1e-6).

    Returns the difference per output, in the graph's output order.
    """
    inputs = normalize(pixels, spec)
    with torch.no_grad():
        expected = module.eval().cpu()(torch.from_numpy(inputs))
    expected = [t.numpy() for t in (expected if isinstance(expected, tuple) else (expected,))]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = session.run(None, {"input": inputs})
    diffs = [
        float(np.abs(a - e).max()) / max(1.0, float(np.abs(e).max())) for a, e in zip(actual, expected, strict=True)
    ]
    tolerances = [PARITY_ATOL] * len(diffs)
    if explanation:
        maps, expected_maps = actual[-1], expected[-1]
        diffs[-1] = float(np.abs(maps - expected_maps).max()) / max(float(np.abs(expected_maps).max()), 1e-12)
        tolerances[-1] = EXPLANATION_PARITY_RTOL
    for diff, tolerance in zip(diffs, tolerances, strict=True):
        if diff > tolerance:
            raise ExportError(f"ONNX output differs from PyTorch by {diff:.2e} (> {tolerance:g}) on validation images")
    if expected[0].ndim == 2 and not np.array_equal(actual[0].argmax(1), expected[0].argmax(1)):
        raise ExportError("ONNX and PyTorch predict different classes for some validation images")
    return diffs


def onnx_tensors(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    graph = onnx.load(str(path)).graph

    def specs(values) -> list[TensorSpec]:
        return [
            TensorSpec(
                name=v.name,
                shape=[d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim],
            )
            for v in values
        ]

    return specs(graph.input), specs(graph.output)


def replacement_problem(models_dir: Path, name: str, kind: str, classes: list[str]) -> str | None:
    """Why a `kind` model predicting `classes` must not become the next version of `name` (None: it may): the
    service answers with a name's newest version, so its clients would silently get another kind or other labels."""
    found = version_folders(models_dir / name)
    if not found:
        return None
    newest = ModelCard.load(models_dir / name / found[-1])
    if (newest.kind, newest.classes) == (kind, classes):
        return None
    return (
        f"{models_dir / name} v{found[-1]}: {newest.kind}, classes {newest.classes}; this run's model: {kind}, classes "
        f"{classes}. The service serves a name's newest version, so its clients would get other answers: publish "
        f"under another --name, or give --version to replace it deliberately"
    )


def next_version(models_dir: Path, name: str) -> str:
    existing = version_folders(models_dir / name)
    return str(int(existing[-1]) + 1 if existing else 1)


def library_versions() -> dict[str, str]:
    import sklearn
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
    }


def publish(
    onnx_path: Path,
    card_fields: dict,
    models_dir: Path,
    report_files: list[Path],
    parity: float,
    version: str | None = None,
    explanation: ExplanationInfo | None = None,
) -> Path:
    """Copy the verified ONNX file into models/<name>/<version>/ and write its card and run report beside it."""
    name = card_fields["name"]
    version = version or next_version(models_dir, name)
    target = models_dir / name / version
    if target.exists():
        raise ExportError(f"{target} already exists; pass another --version or remove it")
    target.mkdir(parents=True)
    shutil.copyfile(onnx_path, target / ONNX_FILE)
    inputs, outputs = onnx_tensors(target / ONNX_FILE)
    card = ModelCard(
        version=version,
        onnx=OnnxInfo(
            sha256=sha256_file(target / ONNX_FILE),
            opset=OPSET,
            inputs=inputs,
            outputs=outputs,
            parity_max_abs_diff=parity,
        ),
        versions=library_versions(),
        explanation=explanation,
        **card_fields,
    )
    card.save(target)
    report = target / "report"
    report.mkdir()
    for file in report_files:
        if file.exists():
            shutil.copyfile(file, report / file.name)
    ModelCard.load(target)  # the card must round-trip: what serving will read is what was written
    return target
