"""The naive alternative for load_tests/bench.py: the per-request server a user would write by hand.

Starlette + uvicorn + onnxruntime, no batching: each request reads its upload, runs the project's one
preprocessing (``contract.preprocessing.preprocess``) and one ``session.run`` on a batch of one, in the thread
pool so that the event loop keeps accepting requests. No upload limits, no error handling beyond 422: it is a
baseline, not a server to deploy. Two ways to run it (load_tests/bench.py measures both):

- as written by hand: one uvicorn process and ``ort.InferenceSession(path)`` with onnxruntime's defaults
  (``--ort-defaults``: one intra-op thread per core, idle threads spinning);
- tuned like the service: its worker processes and session settings (intra-op threads, no spinning, graph
  optimisation), so that what the comparison measures is batching and the framework alone.

    python load_tests/naive_server.py --model-dir models/chest_xray/3 --port 8001 [--workers 1] [--threads 2]

Routes: ``POST /{model}/predict`` and ``POST /{model}/proba`` (multipart field ``image``), ``GET /readyz``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from contract.card import ModelCard, version_folders  # noqa: E402
from contract.preprocessing import ImageError, preprocess  # noqa: E402

DEFAULT_MODEL = REPO_ROOT / "models" / "chest_xray"

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _session() -> tuple[ModelCard, ort.InferenceSession]:
    """Configured through the environment, so that uvicorn's worker processes see it too."""
    model_dir = Path(os.environ["NAIVE_MODEL_DIR"])
    card = ModelCard.load(model_dir)
    file = os.environ.get("NAIVE_ONNX_FILE") or card.onnx.file
    cuda = os.environ.get("NAIVE_DEVICE", "cpu") == "cuda"
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    if os.environ.get("NAIVE_ORT_DEFAULTS") == "1":
        return card, ort.InferenceSession(str(model_dir / file), providers=providers)
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("NAIVE_THREADS", "0"))
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = LEVELS[os.environ.get("NAIVE_GRAPH_OPTIMIZATION", "all")]
    return card, ort.InferenceSession(str(model_dir / file), options, providers=providers)


CARD: ModelCard
SESSION: ort.InferenceSession


@contextlib.asynccontextmanager
async def _load(_: Starlette) -> AsyncIterator[None]:
    """Load the model in each worker process, from the environment that main() sets."""
    global CARD, SESSION
    CARD, SESSION = _session()
    yield


def _infer(data: bytes) -> np.ndarray:
    tensor = preprocess(data, CARD.input)[None]
    return SESSION.run(["probabilities"], {SESSION.get_inputs()[0].name: tensor})[0][0]


async def _probabilities(request: Request) -> dict[str, float] | JSONResponse:
    form = await request.form()
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        return JSONResponse({"error": "no file field 'image'"}, status_code=400)
    data = await upload.read()
    try:
        probabilities = await run_in_threadpool(_infer, data)
    except ImageError as error:
        return JSONResponse({"error": str(error)}, status_code=422)
    return dict(zip(CARD.classes, map(float, probabilities), strict=True))


async def predict(request: Request) -> JSONResponse:
    scores = await _probabilities(request)
    if isinstance(scores, JSONResponse):
        return scores
    label = max(scores, key=scores.__getitem__)
    return JSONResponse({"model": CARD.name, "version": CARD.version, "label": label, "confidence": scores[label]})


async def proba(request: Request) -> JSONResponse:
    scores = await _probabilities(request)
    if isinstance(scores, JSONResponse):
        return scores
    return JSONResponse({"model": CARD.name, "version": CARD.version, "probabilities": scores})


async def readyz(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ready")


app = Starlette(
    routes=[
        Route("/{model}/predict", predict, methods=["POST"]),
        Route("/{model}/proba", proba, methods=["POST"]),
        Route("/readyz", readyz, methods=["GET"]),
    ],
    lifespan=_load,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=DEFAULT_MODEL / (version_folders(DEFAULT_MODEL) or ["1"])[-1],
        help="a version folder (default: chest_xray's newest)",
    )
    parser.add_argument("--onnx-file", default="", help="file in the version folder (default: the card's fp32 file)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: one per core)")
    parser.add_argument("--ort-defaults", action="store_true", help="a plain InferenceSession(path): no options")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--graph-optimization", choices=sorted(LEVELS), default="all")
    args = parser.parse_args()
    os.environ.update(
        NAIVE_MODEL_DIR=str(args.model_dir.resolve()),
        NAIVE_THREADS=str(args.threads),
        NAIVE_DEVICE=args.device,
        NAIVE_GRAPH_OPTIMIZATION=args.graph_optimization,
        NAIVE_ONNX_FILE=args.onnx_file,
        NAIVE_ORT_DEFAULTS="1" if args.ort_defaults else "0",
    )
    import uvicorn

    # an import string, so that the workers (and this process) build the app from the environment set above
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    uvicorn.run(
        "naive_server:app", host=args.host, port=args.port, workers=args.workers, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
