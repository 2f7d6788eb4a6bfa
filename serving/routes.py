"""The public HTTP routes, mounted on the BentoML service as a Starlette app.

Each route looks the model up among those loaded at startup, reads the upload (bounded), runs the one
preprocessing of contract.preprocessing, and hands the tensor to the service's batchable ``infer`` API,
which batches concurrent requests. Every failure answers ``{"error": {"code", "message"}}``; client
mistakes are 4xx, never 500.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from bentoml import get_current_service  # bound once: each `bentoml.x` runs its lazy __getattr__ (7 µs)
from bentoml.exceptions import BentoMLException
from PIL import Image
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from contract.card import InputSpec, ModelCard
from contract.decision import predicted_classes
from contract.preprocessing import DICOM_MEDIA_TYPE, ImageError, TooManyPixels, load_pixels, normalize, preprocess
from serving.batching import PREPROCESS_SECONDS, InferItem, Overloaded, for_model
from serving.explain import overlay_png, scaled_map
from serving.openapi import openapi_document
from serving.repository import AUTOENCODER_OUTPUTS, CLASSIFIER_OUTPUT, ModelEntry, ModelRunner
from serving.threads import in_thread

if TYPE_CHECKING:
    from serving.service import ImageAI

logger = logging.getLogger("bentoml.imageai")

UPLOAD_FIELD = "image"
UI_PAGE = Path(__file__).parent / "static" / "ui.html"
# the page's script and styles are inline; nothing else may load (no third-party code near clinical images)
UI_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src 'self' blob: data:",
    "X-Content-Type-Options": "nosniff",
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.message, self.headers)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def overloaded() -> ApiError:
    """The 503 of every overload refusal: the door, admission, the queue's deadline, BentoML's dispatcher."""
    return ApiError(503, "overloaded", "the server is too busy to answer in time; retry shortly", {"Retry-After": "1"})


def current_service() -> ImageAI:
    return get_current_service()


def _endpoint(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Turn ApiError into its JSON answer, and anything unexpected into a logged 500 that reveals nothing."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as error:
            return error.response()
        except Exception:
            logger.exception("unexpected error on %s %s", request.method, request.url.path)
            return error_response(500, "internal_error", "an unexpected error occurred; it has been logged")

    return wrapped


def available_runner(entry: ModelEntry | None, name: str, what: str) -> ModelRunner:
    if entry is None:
        raise ApiError(404, "unknown_model", f"there is no {what} named {name[:64]!r}; GET /models lists them")
    if entry.runner is None:
        raise ApiError(503, "model_unavailable", f"model {entry.name} is unavailable: {entry.problem}")
    return entry.runner


def _classifier(request: Request) -> ModelRunner:
    name = request.path_params["model"]
    entry = current_service().repository.get(name)
    if entry is not None and entry.kind == "autoencoder":
        entry = None
    return available_runner(entry, name, "classifier")


def _autoencoder(request: Request) -> ModelRunner:
    name = request.path_params["name"]
    return available_runner(current_service().repository.autoencoder(name), name, "autoencoder")


async def bounded_stream(request: Request, limit: int) -> AsyncIterator[bytes]:
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "payload_too_large", f"the request body is over the limit of {limit} bytes")
        yield chunk


@dataclass(frozen=True)
class Upload:
    data: bytes
    media_type: str
    filename: str | None


async def refuse_when_overloaded() -> None:
    """503 before the body is read when the batcher is shedding load and does not drain in time (Batcher.room): a
    flood of requests that would be refused anyway must not spend the CPU on the parsing and decoding that the
    admitted ones need."""
    batcher = current_service().batcher
    if batcher is not None and not await batcher.room():
        raise overloaded()


async def _uploads(request: Request, max_files: int) -> list[Upload]:
    """The file fields `image` of a multipart body, refusing oversized bodies unread, and every body while the
    batcher sheds load (`refuse_when_overloaded`)."""
    await refuse_when_overloaded()
    limit = current_service().settings.max_upload_bytes
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type", f"send multipart/form-data with a file field {UPLOAD_FIELD!r}")
    declared = request.headers.get("content-length", "")
    if declared.isdecimal() and int(declared) > limit:
        raise ApiError(413, "payload_too_large", f"the request body is over the limit of {limit} bytes")
    parser = MultiPartParser(request.headers, bounded_stream(request, limit), max_files=max_files, max_fields=16)
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise ApiError(400, "invalid_multipart", f"the multipart body cannot be parsed: {error.message}") from None
    try:
        fields = form.getlist(UPLOAD_FIELD)
        if any(isinstance(field, str) for field in fields):
            raise ApiError(400, "missing_image", f"{UPLOAD_FIELD!r} is a text field; send the image as a file")
        if not fields:
            raise ApiError(400, "missing_image", f"the request has no file field named {UPLOAD_FIELD!r}")
        return [
            Upload(await field.read(), (field.content_type or "").split(";")[0].strip().lower(), field.filename)
            for field in fields
        ]
    finally:
        await form.close()


def _convert(convert: Callable[..., np.ndarray], upload: Upload, card: ModelCard, max_pixels: int) -> np.ndarray:
    """`convert` (preprocess, or load_pixels) on one upload for `card`'s model, timed; decoding problems become 4xx.

    DICOM is recognised by its content, or by the part's declared type application/dicom (files without preamble).
    """
    started = time.perf_counter()
    try:
        converted = convert(upload.data, card.input, max_pixels, upload.media_type == DICOM_MEDIA_TYPE)
    except TooManyPixels as error:
        raise ApiError(413, error.code, str(error)) from None
    except ImageError as error:
        raise ApiError(422, error.code, str(error)) from None
    except (OSError, ValueError, SyntaxError):
        logger.warning("an upload decoded but could not be converted", exc_info=True)
        raise ApiError(422, ImageError.code, "the image could not be converted to the model's input") from None
    for_model(PREPROCESS_SECONDS, card.name).observe(time.perf_counter() - started)
    return converted


def _convert_each(uploads: list[Upload], card: ModelCard, max_pixels: int) -> list[np.ndarray | ApiError]:
    """Preprocess the images of a batch request; a bad image is an error of its own, not of the request."""
    converted: list[np.ndarray | ApiError] = []
    for upload in uploads:
        try:
            converted.append(_convert(preprocess, upload, card, max_pixels))
        except ApiError as error:
            converted.append(error)
    return converted


def admitted(runner: ModelRunner, images: int) -> contextlib.AbstractContextManager:
    """The batcher's admission of a request's images before they are decoded (503 `overloaded` when the work ahead
    would exceed the latency budget); inside the block they count as queued, and they must be queued right after it
    with ``admit=False``. BentoML's dispatcher (IMAGEAI_BATCHING=bentoml) admits on its own."""
    batcher = current_service().batcher
    if batcher is None:
        return contextlib.nullcontext()
    try:
        return batcher.reserve(runner, images)
    except Overloaded:
        raise overloaded() from None


async def _decoded(request: Request, runner: ModelRunner, convert: Callable[..., np.ndarray]) -> np.ndarray:
    """The (last) upload of a single-image request through `convert`, in a thread, once `runner` admits it."""
    upload = (await _uploads(request, max_files=4))[-1]
    max_pixels = current_service().settings.max_pixels
    with admitted(runner, 1):
        return await in_thread(_convert, convert, upload, runner.card, max_pixels)


async def _infer_upload(request: Request, runner: ModelRunner) -> dict[str, np.ndarray]:
    """The outputs of `runner` for the request's image: read, admitted, preprocessed, then batched."""
    return await infer_one(runner, await _decoded(request, runner, preprocess), admit=False)


async def infer_one(runner: ModelRunner, tensor: np.ndarray, admit: bool = True) -> dict[str, np.ndarray]:
    [outputs] = await infer_many(runner, [tensor], admit)
    return outputs


async def infer_many(runner: ModelRunner, tensors: list[np.ndarray], admit: bool = True) -> list[dict[str, np.ndarray]]:
    """Images of one request through the batcher: in-process (IMAGEAI_BATCHING=direct) or BentoML's dispatcher.
    Without `admit` the batcher takes them unjudged: they were admitted before decoding (`admitted`)."""
    batcher = current_service().batcher
    if batcher is not None:
        try:
            return await batcher.infer_many(runner, tensors, admit)
        except Overloaded:
            raise overloaded() from None
    try:
        results = await current_service().to_async.infer([InferItem.of(runner.card.name, t) for t in tensors])
    except BentoMLException as error:
        if error.error_code == HTTPStatus.SERVICE_UNAVAILABLE:
            raise overloaded() from None
        raise
    for result in results:
        if result.error is not None:
            raise RuntimeError(f"batched inference failed: {result.error}")
    return [
        {name: np.asarray(values, dtype=np.float32) for name, values in result.outputs.items()} for result in results
    ]


def by_class(card: ModelCard, probabilities: np.ndarray) -> dict[str, float]:
    return dict(zip(card.classes, map(float, probabilities), strict=True))


def decide(card: ModelCard, probabilities: np.ndarray) -> tuple[str, float]:
    """The label and its probability, by the rule training evaluated with (contract.decision)."""
    index = int(predicted_classes(probabilities, card.positive_index, card.threshold))
    return card.classes[index], float(probabilities[index])


def to_png(reconstruction: np.ndarray, spec: InputSpec) -> bytes:
    """A reconstruction in [0, 1], shaped like the model input, as an 8-bit PNG (grayscale or RGB)."""
    pixels = np.clip(reconstruction.reshape(spec.channels, spec.height, spec.width) * 255.0 + 0.5, 0, 255)
    pixels = pixels.astype(np.uint8)
    image = Image.fromarray(pixels[0] if spec.channels == 1 else pixels.transpose(1, 2, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@_endpoint
async def list_models(request: Request) -> Response:
    return JSONResponse({"models": [entry.describe() for entry in current_service().repository]})


@_endpoint
async def public_openapi(request: Request) -> Response:
    return JSONResponse(openapi_document(current_service().repository))


def _prediction(card: ModelCard, probabilities: np.ndarray) -> dict[str, Any]:
    label, confidence = decide(card, probabilities)
    return {"label": label, "confidence": confidence}


def _probabilities(card: ModelCard, probabilities: np.ndarray) -> dict[str, Any]:
    return {"probabilities": by_class(card, probabilities)}


Answer = Callable[[ModelCard, np.ndarray], dict[str, Any]]  # the fields of one image's answer: _prediction, ...


def _model_header(card: ModelCard, with_threshold: bool) -> dict[str, Any]:
    """The fields every answer of a model starts with; predictions also name the decision threshold, if any."""
    header: dict[str, Any] = {"model": card.name, "version": card.version}
    if with_threshold and card.threshold is not None:
        header["threshold"] = card.threshold
    return header


async def _answer_one(request: Request, answer: Answer) -> Response:
    runner = _classifier(request)
    card = runner.card
    probabilities = (await _infer_upload(request, runner))[CLASSIFIER_OUTPUT]
    return JSONResponse({**_model_header(card, with_threshold=answer is _prediction), **answer(card, probabilities)})


async def _answer_batch(request: Request, answer: Answer) -> Response:
    """Up to IMAGEAI_MAX_IMAGES_PER_REQUEST images in one request: one result per image, in order, each with its
    file name; an image that cannot be decoded gets its own error and does not fail the others."""
    runner = _classifier(request)
    card = runner.card
    settings = current_service().settings
    uploads = await _uploads(request, max_files=settings.max_images_per_request)
    with admitted(runner, len(uploads)):
        converted = await in_thread(_convert_each, uploads, card, settings.max_pixels)
    tensors = [item for item in converted if not isinstance(item, ApiError)]
    outputs = iter(await infer_many(runner, tensors, admit=False) if tensors else [])
    results: list[dict[str, Any]] = []
    for upload, item in zip(uploads, converted, strict=True):
        if isinstance(item, ApiError):
            results.append({"filename": upload.filename, "error": {"code": item.code, "message": item.message}})
        else:
            results.append({"filename": upload.filename, **answer(card, next(outputs)[CLASSIFIER_OUTPUT])})
    return JSONResponse({**_model_header(card, with_threshold=answer is _prediction), "results": results})


@_endpoint
async def predict(request: Request) -> Response:
    return await _answer_one(request, _prediction)


@_endpoint
async def proba(request: Request) -> Response:
    return await _answer_one(request, _probabilities)


@_endpoint
async def predict_batch(request: Request) -> Response:
    return await _answer_batch(request, _prediction)


@_endpoint
async def proba_batch(request: Request) -> Response:
    return await _answer_batch(request, _probabilities)


@_endpoint
async def reconstruct(request: Request) -> Response:
    runner = _autoencoder(request)
    card = runner.card
    reconstruction = (await _infer_upload(request, runner))[AUTOENCODER_OUTPUTS[0]]
    headers = {"X-Model": card.name, "X-Model-Version": card.version}
    return Response(to_png(reconstruction, card.input), media_type="image/png", headers=headers)


@_endpoint
async def encode(request: Request) -> Response:
    runner = _autoencoder(request)
    card = runner.card
    code = (await _infer_upload(request, runner))[AUTOENCODER_OUTPUTS[1]]
    return JSONResponse({"model": card.name, "version": card.version, "code": code.tolist()})


def _wants_png(request: Request) -> bool:
    """`?format=png|json` decides; without it, an Accept header asking for image/png and not JSON."""
    chosen = request.query_params.get("format")
    if chosen is not None:
        if chosen not in ("json", "png"):
            raise ApiError(400, "invalid_format", "format must be json or png")
        return chosen == "png"
    accept = request.headers.get("accept", "")
    return "image/png" in accept and "application/json" not in accept


async def _explained(explainer: ModelRunner, tensor: np.ndarray) -> dict[str, np.ndarray]:
    """Probabilities and maps of one image: through the batcher, or alone with IMAGEAI_BATCHING=bentoml, whose
    batch API names a model and always runs its prediction outputs only."""
    if current_service().batcher is not None:
        return await infer_one(explainer, tensor, admit=False)
    outputs = await in_thread(explainer.run, tensor[None])
    return {name: value[0] for name, value in outputs.items()}


@_endpoint
async def explain(request: Request) -> Response:
    runner = _classifier(request)
    card = runner.card
    as_png = _wants_png(request)
    if runner.explainer is None or card.explanation is None:
        raise ApiError(
            409,
            "explanation_unavailable",
            f"model {card.name} version {card.version} was exported without an explanation output; re-export it "
            f"from its checkpoint: python -m training.run {card.task} (or its task file) --data DATA --checkpoint "
            "RUN/best.pt --epochs 0",
        )
    pixels = await _decoded(request, runner.explainer, load_pixels)
    outputs = await _explained(runner.explainer, normalize(pixels, card.input))
    probabilities = outputs[CLASSIFIER_OUTPUT].ravel()
    prediction = _prediction(card, probabilities)
    label = prediction["label"]
    maps = outputs[card.explanation.output].reshape(len(card.classes), card.input.height, card.input.width)
    heat = scaled_map(maps[card.classes.index(label)])
    if as_png:
        headers = {"X-Model": card.name, "X-Model-Version": card.version, "X-Label": label}
        return Response(overlay_png(pixels, heat), media_type="image/png", headers=headers)
    explanation = {
        "method": card.explanation.method,
        "layer": card.explanation.layer,
        "class": label,
        "height": card.input.height,
        "width": card.input.width,
        "map": np.round(heat, 4).tolist(),
    }
    return JSONResponse(
        {
            **_model_header(card, with_threshold=True),
            **prediction,
            **_probabilities(card, probabilities),
            "explanation": explanation,
        }
    )


@_endpoint
async def ui(request: Request) -> Response:
    return HTMLResponse(UI_PAGE.read_text(encoding="utf-8"), headers=UI_HEADERS)


async def http_error(request: Request, error: Exception) -> Response:
    """Routing errors (405 on a known path) in the same JSON shape as everything else."""
    assert isinstance(error, HTTPException)
    code = HTTPStatus(error.status_code).phrase.lower().replace(" ", "_")
    return error_response(error.status_code, code, str(error.detail), error.headers)


ROUTES = [
    Route("/ui", ui, methods=["GET"]),
    Route("/models", list_models, methods=["GET"]),
    Route("/openapi-public.json", public_openapi, methods=["GET"]),
    Route("/{model}/predict", predict, methods=["POST"]),
    Route("/{model}/proba", proba, methods=["POST"]),
    Route("/{model}/predict/batch", predict_batch, methods=["POST"]),
    Route("/{model}/proba/batch", proba_batch, methods=["POST"]),
    Route("/{model}/explain", explain, methods=["POST"]),
    Route("/{name}/reconstruct", reconstruct, methods=["POST"]),
    Route("/{name}/encode", encode, methods=["POST"]),
]
