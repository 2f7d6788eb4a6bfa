"""The Open Inference Protocol v2 (KServe v2, Triton's HTTP protocol) for every loaded model.

Standard clients (``tritonclient[http]``, Triton's ``perf_analyzer -i http``, KServe tooling) talk to these routes.
``infer`` takes the *preprocessed* FP32 input tensor, i.e. what contract.preprocessing builds from an image, as JSON
``data`` or, with the protocol's binary tensor data extension (the Triton client's default), as raw little-endian
bytes after the JSON header. Each image of a request goes through the same batcher as the upload routes, so v2
requests share batches with them. Errors answer ``{"error": "<message>"}``; client mistakes are 4xx.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from serving.repository import ModelRunner
from serving.routes import (
    ApiError,
    available_runner,
    bounded_stream,
    current_service,
    infer_many,
    refuse_when_overloaded,
)

logger = logging.getLogger("bentoml.imageai")

HEADER_LENGTH = "Inference-Header-Content-Length"  # binary tensor data extension: size of the JSON part
DATATYPE = "FP32"
EXTENSIONS = ["binary_tensor_data", "model_configuration"]  # Triton's, as its server metadata names them


class V2Error(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _endpoint(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """The protocol's error shape for our own errors and those of the shared helpers; unexpected ones are logged."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except V2Error as error:
            return _error(error.status, error.message)
        except ApiError as error:
            return _error(error.status, error.message, error.headers)
        except Exception:
            logger.exception("unexpected error on %s %s", request.method, request.url.path)
            return _error(500, "an unexpected error occurred; it has been logged")

    return wrapped


# ------------------------------------------------------------------------------------------------ request body


class _Tensor(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = None


class _Requested(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class _InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[_Tensor] = Field(min_length=1)
    outputs: list[_Requested] | None = None


async def _read_request(request: Request) -> tuple[_InferenceRequest, bytes]:
    """The JSON header and the binary part after it (empty without the binary extension)."""
    if request.headers.get("content-encoding", "identity") != "identity":
        raise V2Error(415, "compressed requests are not supported; send the body uncompressed")
    body = b"".join([chunk async for chunk in bounded_stream(request, current_service().settings.max_upload_bytes)])
    split = request.headers.get(HEADER_LENGTH)
    if split is None:
        split = str(len(body))
    if not split.isdecimal() or int(split) > len(body):  # isdigit() would let "²" through to int()
        raise V2Error(400, f"{HEADER_LENGTH} must be an integer no larger than the body ({len(body)} bytes)")
    try:
        return _InferenceRequest.model_validate_json(body[: int(split)]), body[int(split) :]
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(map(str, first["loc"])) or "body"
        raise V2Error(400, f"invalid inference request: {where}: {first['msg']}") from None


def _input_batch(inference: _InferenceRequest, binary: bytes, runner: ModelRunner) -> np.ndarray:
    """The one FP32 input as an (N, C, H, W) array, checked against the model and the batch-size limit."""
    expected = [-1, *runner.input_shape]
    if len(inference.inputs) != 1 or inference.inputs[0].name != runner.input_name:
        names = [tensor.name for tensor in inference.inputs]
        raise V2Error(400, f"expected one input named {runner.input_name!r}, got {names}")
    tensor = inference.inputs[0]
    if tensor.datatype != DATATYPE:
        raise V2Error(400, f"input {tensor.name!r} has datatype {DATATYPE}, got {tensor.datatype!r}")
    if len(tensor.shape) != len(expected) or tensor.shape[1:] != expected[1:] or tensor.shape[0] < 1:
        raise V2Error(400, f"input {tensor.name!r} has shape {expected}, got {tensor.shape}")
    limit = current_service().settings.max_batch_size
    if tensor.shape[0] > limit:
        raise V2Error(400, f"a request holds at most {limit} images (IMAGEAI_MAX_BATCH_SIZE), got {tensor.shape[0]}")
    count = math.prod(tensor.shape)
    size = tensor.parameters.get("binary_data_size")
    if size is not None:
        if tensor.data is not None or size != len(binary) or size != 4 * count:
            raise V2Error(400, f"binary_data_size must be {4 * count} (the tensor's bytes) and match the binary body")
        array = np.frombuffer(binary, dtype="<f4")
    elif tensor.data is None or binary:
        raise V2Error(400, f"input {tensor.name!r} needs either data or binary_data_size")
    else:
        try:
            array = np.asarray(tensor.data, dtype=np.float32)
        except (TypeError, ValueError, OverflowError):
            raise V2Error(400, f"the data of {tensor.name!r} must be numbers, flat or nested row-major") from None
        if array.size != count:
            raise V2Error(400, f"input {tensor.name!r} of shape {tensor.shape} needs {count} values, got {array.size}")
    if not np.isfinite(array).all():
        raise V2Error(400, f"input {tensor.name!r} contains NaN or infinite values")
    return array.reshape(tensor.shape)


# ------------------------------------------------------------------------------------------------ model lookup


def _model(request: Request) -> ModelRunner:
    """The runner named in the path (404 unknown, 503 unavailable); a version, if given, must be the served one."""
    name = request.path_params["model"]
    entry = current_service().repository.get(name)
    wanted = request.path_params.get("version")
    if entry is not None and wanted is not None and wanted != entry.version:
        raise V2Error(404, f"model {name!r} is served at version {entry.version}, not {wanted[:16]!r}")
    return available_runner(entry, name, "model")


def _tensor_metadata(runner: ModelRunner) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Input and output tensors (all FP32: outputs are sent as float32); -1 for the batch and any dynamic dimension."""
    inputs = [{"name": runner.input_name, "datatype": DATATYPE, "shape": [-1, *runner.input_shape]}]
    graph = {node.name: node for node in runner.session.get_outputs()}
    outputs = [
        {
            "name": name,
            "datatype": DATATYPE,
            "shape": [-1] + [dim if isinstance(dim, int) else -1 for dim in graph[name].shape[1:]],
        }
        for name in runner.output_names
    ]
    return inputs, outputs


# ------------------------------------------------------------------------------------------------ endpoints


def _package_version() -> str:
    try:
        return version("imageai")
    except PackageNotFoundError:  # in a Bento the code is packed, not installed
        return "unknown"


@_endpoint
async def server_metadata(request: Request) -> Response:
    return JSONResponse({"name": "imageai", "version": _package_version(), "extensions": EXTENSIONS})


@_endpoint
async def server_live(request: Request) -> Response:
    return Response(status_code=200)


@_endpoint
async def server_ready(request: Request) -> Response:
    """The protocol answers readiness with 200 or a 4xx; same rule as /readyz (IMAGEAI_READINESS)."""
    if not await current_service().__is_ready__():
        raise V2Error(400, "not ready: warming up, or a model is unavailable (GET /models says why)")
    return Response(status_code=200)


@_endpoint
async def model_ready(request: Request) -> Response:
    try:
        _model(request)
    except ApiError as error:
        if error.status == HTTPStatus.NOT_FOUND:
            raise
        raise V2Error(400, error.message) from None
    if not current_service().warmed_up:
        raise V2Error(400, "not ready: warming up")
    return Response(status_code=200)


@_endpoint
async def model_metadata(request: Request) -> Response:
    runner = _model(request)
    inputs, outputs = _tensor_metadata(runner)
    card = runner.card
    body = {
        "name": card.name,
        "versions": [card.version],
        "platform": "onnxruntime_onnx",
        "inputs": inputs,
        "outputs": outputs,
    }
    return JSONResponse(body)


@_endpoint
async def model_config(request: Request) -> Response:
    """Triton's model configuration extension, which perf_analyzer reads: with max_batch_size > 0, dims exclude N."""
    runner = _model(request)
    inputs, outputs = _tensor_metadata(runner)

    def config(tensors: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"name": t["name"], "data_type": f"TYPE_{t['datatype']}", "dims": t["shape"][1:]} for t in tensors]

    body = {
        "name": runner.card.name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "max_batch_size": current_service().settings.max_batch_size,
        "input": config(inputs),
        "output": config(outputs),
        "dynamic_batching": {},  # the batcher of serving.batching
    }
    return JSONResponse(body)


@_endpoint
async def infer(request: Request) -> Response:
    runner = _model(request)
    await refuse_when_overloaded()
    inference, binary = await _read_request(request)
    batch = _input_batch(inference, binary, runner)
    _, metadata = _tensor_metadata(runner)
    shapes = {output["name"]: output["shape"] for output in metadata}
    requested = inference.outputs or [_Requested(name=name) for name in runner.output_names]
    unknown = [output.name for output in requested if output.name not in shapes]
    if unknown:
        raise V2Error(400, f"unknown outputs {unknown}; the model has {list(shapes)}")
    results = await infer_many(runner, list(batch))

    binary_default = bool(inference.parameters.get("binary_data_output", False))
    tensors, blobs = [], []
    for output in requested:
        values = np.stack([result[output.name] for result in results]).astype("<f4")
        values = values.reshape(len(batch), *shapes[output.name][1:])
        tensor: dict[str, Any] = {"name": output.name, "datatype": DATATYPE, "shape": list(values.shape)}
        if output.parameters.get("binary_data", binary_default):
            blobs.append(values.tobytes())
            tensor["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            tensor["data"] = values.ravel().tolist()
        tensors.append(tensor)
    answer: dict[str, Any] = {"model_name": runner.card.name, "model_version": runner.card.version, "outputs": tensors}
    if inference.id is not None:
        answer["id"] = inference.id
    header = json.dumps(answer).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    headers = {HEADER_LENGTH: str(len(header))}
    return Response(b"".join([header, *blobs]), media_type="application/octet-stream", headers=headers)


async def _http_error(request: Request, error: Exception) -> Response:
    """Routing errors under /v2 (404, 405) in the protocol's shape."""
    assert isinstance(error, HTTPException)
    return _error(error.status_code, str(error.detail), error.headers)


_MODEL = "/models/{model}"
_VERSION = "/models/{model}/versions/{version}"
_v2_app = Starlette(
    routes=[
        Route("/health/live", server_live, methods=["GET"]),
        Route("/health/ready", server_ready, methods=["GET"]),
        *(
            route
            for prefix in (_MODEL, _VERSION)
            for route in (
                Route(prefix, model_metadata, methods=["GET"]),
                Route(prefix + "/ready", model_ready, methods=["GET"]),
                Route(prefix + "/config", model_config, methods=["GET"]),
                Route(prefix + "/infer", infer, methods=["POST"]),
            )
        ),
    ],
    exception_handlers={HTTPException: _http_error},
)

# Mounted after serving.routes.ROUTES, so that a model named "v2" keeps its /v2/predict; /v2 itself is not under Mount
V2_ROUTES = [Route("/v2", server_metadata, methods=["GET"]), Mount("/v2", app=_v2_app)]
