"""Fixtures for the serving tests: a tiny model repository built with onnx.helper (no torch, no training)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
# the project is not pip-installed: import contract/ and serving/ from this checkout
sys.path.insert(0, str(REPO_ROOT))

from contract.card import (  # noqa: E402
    ONNX_FILE,
    ExplanationInfo,
    InputSpec,
    ModelCard,
    OnnxInfo,
    TensorSpec,
    sha256_file,
)
from load_tests.local_service import free_port  # noqa: E402  (re-exported for the tests)

OPSET = 17
BIN = Path(sys.executable).parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: starts real processes (bentoml serve, bentoml build, locust)")


def _save(graph: onnx.GraphProto, folder: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ONNX_FILE
    onnx.save_model(model, path)
    return path


def classifier_graph(
    channels: int, size: int, weights: np.ndarray, bias: np.ndarray, cam: bool = False
) -> onnx.GraphProto:
    """GlobalAveragePool → Flatten → Gemm → Softmax: class scores are affine in each channel's mean.

    With `cam`, also the class activation maps ReLU(sum_c W[c, k] * input_c) as output "cam" [N, classes, H, W].
    """
    classes = weights.shape[1]
    explain = [
        helper.make_node("Einsum", ["input", "W"], ["evidence"], equation="nchw,ck->nkhw"),
        helper.make_node("Relu", ["evidence"], ["cam"]),
    ]
    return helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
            helper.make_node("Gemm", ["features", "W", "B"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
            *(explain if cam else []),
        ],
        "classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, size, size])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes]),
            *([helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", classes, size, size])] if cam else []),
        ],
        initializer=[
            numpy_helper.from_array(weights.astype(np.float32), "W"),
            numpy_helper.from_array(bias.astype(np.float32), "B"),
        ],
    )


def autoencoder_graph(size: int = 28, code: int = 30) -> onnx.GraphProto:
    """Flatten → Gemm (code) → Gemm → Sigmoid → Reshape: outputs `reconstruction` and `code`."""
    rng = np.random.default_rng(0)
    pixels = size * size
    return helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "W1", "B1"], ["code"]),
            helper.make_node("Gemm", ["code", "W2", "B2"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], ["flat_out"]),
            helper.make_node("Reshape", ["flat_out", "shape"], ["reconstruction"]),
        ],
        "autoencoder",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, size, size])],
        [
            helper.make_tensor_value_info("reconstruction", TensorProto.FLOAT, ["N", 1, size, size]),
            helper.make_tensor_value_info("code", TensorProto.FLOAT, ["N", code]),
        ],
        initializer=[
            numpy_helper.from_array(rng.normal(0, 0.05, (pixels, code)).astype(np.float32), "W1"),
            numpy_helper.from_array(np.zeros(code, np.float32), "B1"),
            numpy_helper.from_array(rng.normal(0, 0.05, (code, pixels)).astype(np.float32), "W2"),
            numpy_helper.from_array(np.zeros(pixels, np.float32), "B2"),
            numpy_helper.from_array(np.array([-1, 1, size, size], np.int64), "shape"),
        ],
    )


def write_card(folder: Path, *, name: str, version: str, kind: str, spec: InputSpec, **fields: object) -> ModelCard:
    """A valid card for the ONNX file already in `folder`, with its real sha256."""
    chw = [spec.channels, spec.height, spec.width]
    if kind == "classifier":
        outputs = [TensorSpec(name="probabilities", shape=[-1, len(fields["classes"])])]  # type: ignore[arg-type]
        if fields.get("explanation"):
            outputs.append(TensorSpec(name="cam", shape=[-1, len(fields["classes"]), *chw[1:]]))  # type: ignore
    else:
        outputs = [
            TensorSpec(name="reconstruction", shape=[-1, *chw]),
            TensorSpec(name="code", shape=[-1, 30]),
        ]
    card = ModelCard(
        name=name,
        version=version,
        kind=kind,  # type: ignore[arg-type]
        task=f"test {kind}",
        input=spec,
        onnx=OnnxInfo(
            sha256=sha256_file(folder / ONNX_FILE),
            opset=OPSET,
            inputs=[TensorSpec(name="input", shape=[-1, *chw])],
            outputs=outputs,
        ),
        architecture="tiny test graph",
        parameters=0,
        metrics={"test": {"accuracy": 1.0}},
        **fields,  # type: ignore[arg-type]
    )
    card.save(folder)
    return card


def build_model_repository(root: Path) -> Path:
    """models/ with:
    - chest_xray v1 and v2 (binary, gray 16x16, threshold 0.5): dark images → pneumonia, bright → normal; v2 with
      class activation maps (bright pixels are the evidence for normal);
    - rgb v1 and v2 (3 classes, RGB 8x8): the dominant channel wins;
    - mnist_autoencoder v1 (gray 28x28, code of 30);
    - tampered v1: a valid classifier whose card carries a wrong sha256.
    """
    gray = InputSpec(channels=1, height=16, width=16)
    for version in ("1", "2"):
        folder = root / "chest_xray" / version
        explained = version == "2"
        _save(classifier_graph(1, 16, np.array([[8.0, -8.0]]), np.array([-4.0, 4.0]), cam=explained), folder)
        write_card(
            folder,
            name="chest_xray",
            version=version,
            kind="classifier",
            spec=gray,
            classes=["normal", "pneumonia"],
            positive_class="pneumonia",
            threshold=0.5,
            explanation=ExplanationInfo(layer="the input pixels, 16x16 cells") if explained else None,
        )
    rgb = InputSpec(channels=3, height=8, width=8)
    for version in ("1", "2"):
        folder = root / "rgb" / version
        _save(classifier_graph(3, 8, np.eye(3) * 10.0, np.zeros(3)), folder)
        write_card(folder, name="rgb", version=version, kind="classifier", spec=rgb, classes=["red", "green", "blue"])
    folder = root / "mnist_autoencoder" / "1"
    _save(autoencoder_graph(), folder)
    write_card(
        folder,
        name="mnist_autoencoder",
        version="1",
        kind="autoencoder",
        spec=InputSpec(channels=1, height=28, width=28, polarity="dark_background"),
    )
    folder = root / "tampered" / "1"
    _save(classifier_graph(1, 16, np.array([[1.0, -1.0]]), np.zeros(2)), folder)
    card = write_card(folder, name="tampered", version="1", kind="classifier", spec=gray, classes=["a", "b"])
    card.onnx.sha256 = "0" * 64
    card.save(folder)
    return root


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_repository(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def png() -> Callable[..., bytes]:
    """png(color, size=(w, h), mode="L") → PNG bytes of a uniform image."""

    def make(color: int | tuple[int, ...] = 0, size: tuple[int, int] = (32, 32), mode: str = "L") -> bytes:
        buffer = io.BytesIO()
        Image.new(mode, size, color).save(buffer, format="PNG")
        return buffer.getvalue()

    return make


@dataclass
class Server:
    """A `bentoml serve serving.service:ImageAI` subprocess."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def wait(self, path: str, timeout: float = 90.0) -> None:
        """Wait until GET path answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{path} not 200 after {timeout} s:\n{self.log.read_text()}")

    def wait_for_log(self, text: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise TimeoutError(f"{text!r} never logged:\n{self.log.read_text()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop the whole process group the server started (arbiter and workers)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_server(models_dir: Path, workdir: Path, **settings: str) -> Server:
    """Start the service on a free port with IMAGEAI_* settings (given without the prefix)."""
    port = free_port()
    env = {
        **os.environ,
        "BENTOML_HOME": str(workdir / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "IMAGEAI_MODELS_DIR": str(models_dir),
        "IMAGEAI_WORKERS": "1",  # one process: every request meets the same batcher, metrics and limits
        **{f"IMAGEAI_{key.upper()}": value for key, value in settings.items()},
    }
    log = workdir / "server.log"
    command = [
        str(BIN / "bentoml"),
        "serve",
        "serving.service:ImageAI",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Server(f"http://127.0.0.1:{port}", process, log)


# The shared test server: lenient readiness (the tampered model must not hold it back), rgb pinned to
# version 1, and small limits so that the oversized-input cases stay cheap.
SERVER_SETTINGS = {
    "readiness": "lenient",
    "model_versions": "rgb=1",
    "max_upload_bytes": str(1_000_000),
    "max_pixels": str(1_000_000),
}


@pytest.fixture(scope="session")
def server(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(model_repository, tmp_path_factory.mktemp("server"), **SERVER_SETTINGS)
    try:
        running.wait("/readyz")
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """Every task trained for one epoch on tiny generated data, published into one model repository."""
    from tests.tiny_tasks import train_all

    return train_all(tmp_path_factory.mktemp("trained"))
