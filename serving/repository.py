"""The model repository: models/<name>/<version>/{model.onnx, model.json}, loaded, verified and run.

A model is served only after its ONNX file matches the card's sha256 and its graph matches the card's
input contract. A model failing a check is kept as an unavailable entry with the reason, so that the others
still serve and clients learn why. Nothing here unpickles: cards are JSON and models are ONNX protobuf.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from pydantic import ValidationError

from contract.card import CARD_FILE, ModelCard, version_folders
from serving.config import Settings

logger = logging.getLogger("bentoml.imageai")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
CLASSIFIER_OUTPUT = "probabilities"
AUTOENCODER_OUTPUTS = ("reconstruction", "code")
_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class ModelProblem(Exception):
    """Why a model cannot be served, in words fit for the /models listing (file names, never full paths)."""


def _read_card(folder: Path) -> ModelCard:
    try:
        return ModelCard.load(folder)
    except FileNotFoundError:
        raise ModelProblem(f"{CARD_FILE} is missing") from None
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(map(str, first["loc"])) or "card"
        raise ModelProblem(f"{CARD_FILE} is not a valid model card: {where}: {first['msg']}") from None
    except (OSError, ValueError) as error:
        raise ModelProblem(f"{CARD_FILE} cannot be read: {type(error).__name__}") from None


def _read_verified_onnx(folder: Path, card: ModelCard) -> bytes:
    """The ONNX bytes, checked against the card's sha256. The session is built from these very bytes."""
    file_name = card.onnx.file
    if Path(file_name).name != file_name:
        raise ModelProblem(f"onnx.file {file_name!r} must be a file name inside the version folder")
    try:
        data = (folder / file_name).read_bytes()
    except OSError:
        raise ModelProblem(f"{file_name} is missing or unreadable") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != card.onnx.sha256:
        raise ModelProblem(
            f"sha256 of {file_name} is {digest[:12]}…, the card says {card.onnx.sha256[:12]}…: "
            "the file is corrupt or not the one the card describes"
        )
    return data


def _read_int8(folder: Path, card: ModelCard) -> bytes | None:
    """The int8 file's bytes when the card marks it served (within 1 accuracy point, faster) and its sha256 matches."""
    info = card.quantized
    if info is None or not info.served:
        return None
    # (an int8 entry more than 1 accuracy point below fp32 never gets here: ModelCard refuses to load it)
    if Path(info.file).name != info.file:
        logger.warning("model %s: the card's int8 file is not a plain file name; serving fp32", card.name)
        return None
    try:
        data = (folder / info.file).read_bytes()
    except OSError:
        logger.warning("model %s: %s is missing or unreadable; serving fp32", card.name, info.file)
        return None
    if hashlib.sha256(data).hexdigest() != info.sha256:
        logger.warning("model %s: sha256 of %s does not match the card; serving fp32", card.name, info.file)
        return None
    return data


def _create_session(
    data: bytes, file_name: str, device: str, threads: int, optimization: str, memory_arena: bool
) -> tuple[ort.InferenceSession, str | None]:
    """The session, and why it runs on CPU although IMAGEAI_DEVICE=auto (None when it runs where asked)."""
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = memory_arena
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle onnxruntime threads spin by default, taking the cores that decoding and the event loop need: on a
    # 2-core box turning that off gave ~18% more throughput and lower latency (ResNet-18, 224x224).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = _OPTIMIZATION[optimization]
    want_cuda = device != "cpu" and CUDA in ort.get_available_providers()
    # cuDNN's exhaustive algorithm search runs again for every new input shape, and adaptive batches come in every
    # size from 1 to max_batch_size: take cuDNN's heuristic choice instead (docs/performance.md, GPU)
    providers = [(CUDA, {"cudnn_conv_algo_search": "HEURISTIC"}), CPU] if want_cuda else [CPU]
    fallback = None
    if device == "auto" and not want_cuda:
        fallback = "this onnxruntime build has no CUDA provider"
    try:
        session = ort.InferenceSession(data, options, providers=providers)
    except Exception as error:  # onnxruntime raises its own exception types for every kind of bad graph
        message = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        if not (want_cuda and device == "auto"):
            raise ModelProblem(f"onnxruntime cannot load {file_name}: {message}") from None
        # the CUDA provider can fail while creating the session (driver, out of memory): retry on CPU
        fallback = f"the CUDA provider failed to start the session: {message}"
        logger.warning("%s; retrying on CPU", fallback)
        try:
            session = ort.InferenceSession(data, options, providers=[CPU])
        except Exception as cpu_error:
            message = str(cpu_error).splitlines()[0][:200] if str(cpu_error) else type(cpu_error).__name__
            raise ModelProblem(f"onnxruntime cannot load {file_name}: {message}") from None
    # onnxruntime-gpu lists CUDA even where its libraries are missing and silently falls back to CPU.
    active = session.get_providers()[0]
    if device == "cuda" and active != CUDA:
        raise ModelProblem("IMAGEAI_DEVICE=cuda but onnxruntime could not start the CUDA provider")
    if want_cuda and active != CUDA and fallback is None:
        fallback = "the CUDA provider is listed but did not start (CUDA/cuDNN libraries missing?)"
        logger.warning("%s; using CPU", fallback)
    return session, fallback


def _dims_match(actual: Sequence[Any], expected: Sequence[int | None]) -> bool:
    """Compare an ONNX shape with an expected one; None (or a symbolic ONNX dim) matches anything."""
    return len(actual) == len(expected) and all(
        want is None or not isinstance(have, int) or have == want for have, want in zip(actual, expected, strict=True)
    )


def _check_signature(card: ModelCard, session: ort.InferenceSession) -> list[str]:
    """Check the graph against the card; return the output names serving reads, in order."""
    spec = card.input
    chw = (spec.channels, spec.height, spec.width)
    inputs = {node.name: node for node in session.get_inputs()}
    name = card.onnx.inputs[0].name if card.onnx.inputs else "input"
    if len(inputs) != 1 or name not in inputs:
        raise ModelProblem(f"the graph must have exactly one input named {name!r}, it has {sorted(inputs)}")
    node = inputs[name]
    if node.type != "tensor(float)":
        raise ModelProblem(f"input {name!r} is {node.type}, serving sends tensor(float)")
    if not _dims_match(node.shape, (None, *chw)):
        raise ModelProblem(
            f"input {name!r} has shape {node.shape}, the card's input contract is [N, {', '.join(map(str, chw))}]"
        )
    if isinstance(node.shape[0], int):
        raise ModelProblem(f"input {name!r} has a fixed batch size {node.shape[0]}; export a dynamic batch")
    if card.onnx.inputs and not _dims_match(card.onnx.inputs[0].shape, (-1, *chw)):
        raise ModelProblem(f"card tensor spec {card.onnx.inputs[0].shape} contradicts its input contract {chw}")

    outputs = {node.name: node.shape for node in session.get_outputs()}
    if card.kind == "classifier":
        expected = {CLASSIFIER_OUTPUT: (None, len(card.classes))}
    else:
        expected = {AUTOENCODER_OUTPUTS[0]: (None, *chw), AUTOENCODER_OUTPUTS[1]: (None, None)}
    for output, shape in expected.items():
        if output not in outputs:
            raise ModelProblem(f"a {card.kind} needs an output named {output!r}, the graph has {sorted(outputs)}")
        if not _dims_match(outputs[output], shape):
            raise ModelProblem(f"output {output!r} has shape {outputs[output]}, expected {list(shape)}")
    if card.explanation is not None:
        cam, shape = card.explanation.output, (None, len(card.classes), spec.height, spec.width)
        if cam not in outputs or not _dims_match(outputs[cam], shape):
            raise ModelProblem(f"the card's explanation output {cam!r} is not in the graph with shape {list(shape)}")
    return list(expected)


class ModelRunner:
    """A verified model: its card and one onnxruntime session, shared by all threads (run is thread-safe)."""

    def __init__(
        self,
        card: ModelCard,
        session: ort.InferenceSession,
        output_names: list[str],
        fallback_reason: str | None = None,
    ) -> None:
        self.card = card
        self.session = session
        self.output_names = output_names
        self.input_name = session.get_inputs()[0].name
        self.provider: str = session.get_providers()[0]
        # why the model runs on CPU although IMAGEAI_DEVICE=auto could have used CUDA; shown in GET /models
        self.fallback_reason = fallback_reason
        self.precision = "fp32"  # "int8" when the card's quantized file is served (IMAGEAI_INT8)
        # CUDA: batches are padded up to the next of these sizes, the ones warm_up ran. Every new input shape costs
        # the CUDA provider a first run (cuDNN algorithm choice and plans, memory), and adaptive batches come in every
        # size from 1 to max_batch_size. On CPU the cost is linear in the batch: no padding.
        self.padded_sizes: tuple[int, ...] = ()
        # the same session asked for the class activation maps too (POST /{model}/explain); predict never runs them
        self.explainer: ModelRunner | None = None
        if card.explanation is not None:
            self.explainer = copy.copy(self)
            self.explainer.output_names = [*output_names, card.explanation.output]

    @classmethod
    def load(
        cls,
        folder: Path,
        *,
        device: str = "cpu",
        threads: int = 1,
        optimization: str = "all",
        int8: bool = False,
        memory_arena: bool = False,
    ) -> ModelRunner:
        """Load and verify one version folder; raises ModelProblem saying what is wrong.

        With `int8`, the card's quantized file replaces the fp32 one when the card marks it served and it passes
        the same checks; otherwise (with a warning) the verified fp32 file serves.
        """
        card = _read_card(folder)
        fp32 = _read_verified_onnx(folder, card)
        quantized = _read_int8(folder, card) if int8 else None
        if quantized is not None:
            try:
                session, fallback_reason = _create_session(
                    quantized, card.quantized.file, device, threads, optimization, memory_arena
                )
                runner = cls(card, session, _check_signature(card, session), fallback_reason)
                runner.precision = "int8"
                return runner
            except ModelProblem as problem:
                logger.warning("model %s: the int8 file cannot serve (%s); serving fp32", card.name, problem)
        session, fallback_reason = _create_session(fp32, card.onnx.file, device, threads, optimization, memory_arena)
        return cls(card, session, _check_signature(card, session), fallback_reason)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        spec = self.card.input
        return spec.channels, spec.height, spec.width

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """float32 (N, C, H, W), built by contract.preprocessing → the outputs by name, N rows each."""
        rows = len(batch)
        size = next((size for size in self.padded_sizes if size >= rows), rows)
        if size > rows:
            batch = np.concatenate([batch, np.zeros((size - rows, *batch.shape[1:]), dtype=batch.dtype)])
        feed = {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}
        outputs = self.session.run(self.output_names, feed)
        return {name: value[:rows] for name, value in zip(self.output_names, outputs, strict=True)}

    def proba(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities (N, K) of a classifier, in the order of card.classes."""
        if self.card.kind != "classifier":
            raise TypeError(f"{self.card.name} is an {self.card.kind}, not a classifier")
        return self.run(batch)[CLASSIFIER_OUTPUT]

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        """Run once per batch size so that no client pays for onnxruntime's first-run allocations."""
        for size in batch_sizes:
            self.run(np.zeros((size, *self.input_shape), dtype=np.float32))
        if self.provider == CUDA:
            self.padded_sizes = tuple(sorted(batch_sizes))
        if self.explainer is not None:
            self.explainer.run(np.zeros((1, *self.input_shape), dtype=np.float32))


@dataclass(frozen=True)
class ModelEntry:
    """One served model name: either a runner or the problem that keeps it unavailable."""

    name: str
    version: str | None
    runner: ModelRunner | None = None
    problem: str | None = None

    @property
    def ready(self) -> bool:
        return self.runner is not None

    @property
    def kind(self) -> str | None:
        return self.runner.card.kind if self.runner else None

    def describe(self) -> dict[str, Any]:
        """The /models view of this entry."""
        info: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "status": "ready" if self.ready else "unavailable",
            "reason": self.problem,
            "provider": self.runner.provider if self.runner else None,
            "fallback_reason": self.runner.fallback_reason if self.runner else None,
            "precision": self.runner.precision if self.runner else None,
        }
        if self.runner:
            card = self.runner.card
            info["card"] = {
                **card.model_dump(
                    mode="json",
                    include={
                        "kind",
                        "task",
                        "description",
                        "intended_input",
                        "limitations",
                        "classes",
                        "positive_class",
                        "threshold",
                        "threshold_rule",
                        "explanation",
                        "architecture",
                        "parameters",
                        "metrics",
                        "created",
                    },
                ),
                "input": {**card.input.model_dump(mode="json"), "description": card.input.describe()},
                "outputs": [tensor.model_dump(mode="json") for tensor in card.onnx.outputs],
            }
        return info


class ModelRepository:
    """The models loaded at startup, by name. Request paths are only ever looked up here, never on disk."""

    def __init__(self, entries: Sequence[ModelEntry]) -> None:
        self._entries = {entry.name: entry for entry in sorted(entries, key=lambda entry: entry.name)}

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self._entries.values())

    def get(self, name: str) -> ModelEntry | None:
        return self._entries.get(name)

    def autoencoder(self, name: str) -> ModelEntry | None:
        """`/{name}/reconstruct` serves model `{name}_autoencoder`, or `{name}` if that is an autoencoder."""
        for candidate in (f"{name}_autoencoder", name):
            entry = self._entries.get(candidate)
            if entry is not None and entry.kind in ("autoencoder", None):
                return entry
        return None

    @classmethod
    def load(cls, settings: Settings) -> ModelRepository:
        root = settings.models_dir
        if not root.is_dir():
            logger.error("models directory %s does not exist; serving no models", root)
            return cls([])
        folders = sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))
        if not folders:
            logger.error("no models in %s (expected <name>/<version>/model.onnx and model.json)", root)
        for name in sorted(set(settings.model_versions) - {folder.name for folder in folders}):
            logger.warning("IMAGEAI_MODEL_VERSIONS pins %r, which is not in %s", name, root)
        return cls([_load_entry(folder, settings) for folder in folders])


def _load_entry(model_dir: Path, settings: Settings) -> ModelEntry:
    name = model_dir.name
    found = version_folders(model_dir)
    version = settings.model_versions.get(name) or (found[-1] if found else None)
    try:
        if version is None:
            raise ModelProblem("no version folders (models/<name>/<integer>/)")
        if version not in found:
            raise ModelProblem(f"configured version {version} does not exist (found: {', '.join(found)})")
        runner = ModelRunner.load(
            model_dir / version,
            device=settings.device,
            threads=settings.threads_per_session,
            optimization=settings.graph_optimization,
            int8=settings.int8 == "auto",
            memory_arena=settings.cpu_memory_arena,
        )
        if (runner.card.name, runner.card.version) != (name, version):
            raise ModelProblem(
                f"the card describes {runner.card.name} version {runner.card.version}, but lies in {name}/{version}"
            )
    except ModelProblem as problem:
        logger.error("model %s is UNAVAILABLE: %s (%s)", name, problem, model_dir / (version or ""))
        return ModelEntry(name, version, problem=str(problem))
    logger.info(
        "model %s version %s (%s) ready on %s%s (%d intra-op threads, optimization %s)",
        name,
        version,
        runner.precision,
        runner.provider,
        f" (CPU fallback: {runner.fallback_reason})" if runner.fallback_reason else "",
        settings.threads_per_session,
        settings.graph_optimization,
    )
    return ModelEntry(name, version, runner=runner)
