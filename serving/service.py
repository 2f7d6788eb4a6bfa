"""The BentoML service: `bentoml serve serving.service:ImageAI`.

Public routes (serving.routes) are a Starlette app mounted on the service; they preprocess each upload and
call the batchable `infer` API through `self.to_async`, which goes through BentoML's adaptive-batching
dispatcher, so concurrent single-image requests run as one onnxruntime batch per model.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from http import HTTPStatus

import bentoml
import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware

from serving import metrics_labels
from serving.batching import Batcher, InferItem, InferOutput, run_batch
from serving.config import Settings
from serving.guard import AdmissionGuard
from serving.keepalive import ConnectionRecycler
from serving.repository import ModelRepository
from serving.routes import ROUTES, current_service, http_error
from serving.threads import in_thread
from serving.v2 import V2_ROUTES

logger = logging.getLogger("bentoml.imageai")

settings = Settings.from_env()


@contextlib.asynccontextmanager
async def _warm_up_in_background(_: Starlette) -> AsyncIterator[None]:
    """Entered by BentoML after the service instance exists; /readyz stays 503 until warm-up ends."""
    task = asyncio.create_task(current_service().warm_up())
    yield
    task.cancel()


routes_app = Starlette(
    routes=[*ROUTES, *V2_ROUTES],  # the Open Inference Protocol beside our own routes
    exception_handlers={HTTPException: http_error},
    lifespan=_warm_up_in_background,
    middleware=[
        Middleware(
            ConnectionRecycler,
            max_requests=settings.keepalive_max_requests,
            rebalance_interval_s=settings.keepalive_rebalance_ms / 1000,
        ),
        Middleware(AdmissionGuard, max_in_flight=settings.max_in_flight, rate_limit_rps=settings.rate_limit_rps),
    ],
)


def _known_model(name: str, action: str) -> bool:
    """Whether /{name}/{action} reaches a loaded model (bounded metrics labels, serving.metrics_labels)."""
    try:
        repository = current_service().repository
    except Exception:  # not instantiated yet
        return False
    entry = repository.autoencoder(name) if action in ("reconstruct", "encode") else repository.get(name)
    return entry is not None


metrics_labels.install(_known_model)


@bentoml.service(name="imageai", **settings.bentoml_options)
@bentoml.asgi_app(routes_app)
class ImageAI:
    """Image classifiers and autoencoders from the ONNX model repository, with adaptive batching."""

    def __init__(self) -> None:
        self.settings = settings
        self.repository = ModelRepository.load(settings)
        self.warmed_up = False
        # IMAGEAI_BATCHING=direct: the routes batch in-process; bentoml: through self.to_async and the `infer` API
        self.batcher = (
            Batcher(settings.max_batch_size, settings.max_latency_ms, settings.batches_in_flight)
            if settings.batching == "direct"
            else None
        )

    @bentoml.api(batchable=True, max_batch_size=settings.max_batch_size, max_latency_ms=settings.max_latency_ms)
    def infer(self, items: list[InferItem]) -> list[InferOutput]:
        """Preprocessed tensors in, model outputs out; called by the upload routes, batched."""
        return run_batch(self.repository, items)

    async def warm_up(self) -> None:
        """Run every model at each batch size, then train the dispatcher's cost model with real calls."""
        sizes = self.settings.warmup_batch_sizes
        runners = [entry.runner for entry in self.repository if entry.runner is not None]
        try:
            for runner in runners:
                await in_thread(runner.warm_up, sizes)
            for runner in runners:
                item = InferItem.of(runner.card.name, np.zeros(runner.input_shape, dtype=np.float32))
                for size in sizes:
                    if self.batcher is not None:
                        zeros = np.zeros(runner.input_shape, dtype=np.float32)
                        await asyncio.gather(*(self.batcher.infer(runner, zeros, admit=False) for _ in range(size)))
                    else:
                        await self._burst(item, size)
        except Exception:
            logger.exception("warm-up failed; /readyz stays unready")
            return
        # Everything allocated so far (BentoML, onnxruntime, the models) lives as long as the process: move it out
        # of the collector's reach, or each full collection walks it while a request waits. Measured: p99 at one
        # connection 44 → 4.5 ms, at eight 115 → 24 ms (docs/performance.md).
        gc.collect()
        gc.freeze()
        self.warmed_up = True
        logger.info("warm-up done for %d model(s) at batch sizes %s", len(runners), sizes)

    async def _burst(self, item: InferItem, size: int) -> None:
        """`size` concurrent single-image calls through the dispatcher; only deadline shedding (503) is fine."""
        for result in await asyncio.gather(*(self.to_async.infer([item]) for _ in range(size)), return_exceptions=True):
            if isinstance(result, BaseException):
                if getattr(result, "error_code", None) != HTTPStatus.SERVICE_UNAVAILABLE:
                    raise result
            elif result[0].error:
                raise RuntimeError(result[0].error)

    async def __is_ready__(self) -> bool:
        """Ready once warm; strict: every model must be ready, lenient: at least one."""
        if not self.warmed_up:
            return False
        states = [entry.ready for entry in self.repository]
        return any(states) and (self.settings.readiness == "lenient" or all(states))
