"""Batched inference: the in-process batcher the routes use, and the batchable API behind BentoML's dispatcher.

Two ways to batch concurrent single-image requests (``IMAGEAI_BATCHING``):

- ``direct`` (:class:`Batcher`): the routes put each tensor in a queue of the worker's event loop; one task takes
  everything queued (up to ``max_batch_size``) as one batch whenever the previous batch is done, and runs it in
  one inference thread. Under light load a request goes at once, alone; under load batches grow by themselves.
  No serialisation, no HTTP: about 0.1 ms per request.
- ``bentoml``: the routes call the service's own batchable API through ``self.to_async``, i.e. through BentoML's
  in-process HTTP client, its middleware and its adaptive-batching dispatcher. Each item names its model and a
  batch is split by model into one onnxruntime call per model; tensors travel as base64 float32 bytes. Measured
  on two cores (docs/performance.md): about 5 ms of CPU per request more than ``direct``, half its throughput.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Counter, Histogram
from pydantic import BaseModel, ConfigDict, Field

from serving.repository import ModelRepository, ModelRunner
from serving.threads import INFERENCE_THREADS, named_pool

logger = logging.getLogger("bentoml.imageai")

MODEL_BATCH_SIZE = Histogram(
    name="imageai_model_batch_size",
    documentation="Images per onnxruntime call, by model",
    labelnames=["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
# Where a request's time goes, as Triton's queue and compute durations: what a request's latency has beyond these
# three is HTTP, multipart parsing, thread hand-offs and the answer's JSON.
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _seconds_by_model(name: str, documentation: str) -> Histogram:
    return Histogram(name=name, documentation=documentation, labelnames=["model"], buckets=SECONDS_BUCKETS)


PREPROCESS_SECONDS = _seconds_by_model(
    "imageai_preprocess_seconds",
    "Seconds to turn one upload into the model's input (decoding, resizing, normalising), by model",
)
INFERENCE_SECONDS = _seconds_by_model(
    "imageai_inference_seconds",
    "Seconds of one onnxruntime call (a batch of imageai_model_batch_size images), by model",
)
QUEUE_SECONDS = _seconds_by_model(
    "imageai_queue_seconds",
    "Seconds a request's images waited in the batcher's queue until the first of them started, by model",
)
REFUSALS = Counter(
    name="imageai_overload_refusals",
    documentation="Requests answered 503 overloaded, by stage: door (unread, while shedding), admission (before "
    "decoding: the work ahead would exceed the latency budget), deadline (waited past the budget in the queue)",
    labelnames=["stage"],
)
for _stage in ("door", "admission", "deadline"):
    REFUSALS.labels(stage=_stage)  # exported as 0 before the first refusal


@functools.cache
def for_model(histogram: Histogram, model: str) -> Histogram:
    """`histogram`'s series for one model. prometheus_client's labels() costs twice an observation (4 against 2 µs
    in multiprocess mode), and these are observed for every request."""
    return histogram.labels(model=model)


class InferItem(BaseModel):
    """One preprocessed image for one model: float32 (C, H, W) in C order."""

    model_config = ConfigDict(extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")

    model: str = Field(max_length=64)
    tensor: bytes

    @classmethod
    def of(cls, model: str, tensor: np.ndarray) -> InferItem:
        return cls(model=model, tensor=np.ascontiguousarray(tensor, dtype="<f4").tobytes())


class InferOutput(BaseModel):
    """The outputs of one item, flattened per output name, or why it could not be run."""

    outputs: dict[str, list[float]] = Field(default_factory=dict)
    error: str | None = None


def run_batch(repository: ModelRepository, items: Sequence[InferItem]) -> list[InferOutput]:
    """Run a batch of possibly mixed models. A bad item fails alone, never its batch-mates."""
    results = [InferOutput(error="not run")] * len(items)
    runnable: list[tuple[int, tuple[ModelRunner, np.ndarray]]] = []
    for index, item in enumerate(items):
        entry = repository.get(item.model)
        if entry is None or entry.runner is None:
            results[index] = InferOutput(error=f"model {item.model!r} is not available")
            continue
        shape = entry.runner.input_shape
        if len(item.tensor) != 4 * math.prod(shape):
            results[index] = InferOutput(error=f"tensor is not float32 {shape}")
            continue
        runnable.append((index, (entry.runner, np.frombuffer(item.tensor, dtype="<f4").reshape(shape))))
    outputs = run_arrays([pair for _, pair in runnable])
    for (index, _), output in zip(runnable, outputs, strict=True):
        if isinstance(output, Exception):
            results[index] = InferOutput(error="inference failed")
        else:
            results[index] = InferOutput(outputs={name: value.tolist() for name, value in output.items()})
    return results


# ------------------------------------------------------------------------------------------------ direct batching


class Overloaded(Exception):
    """The request would miss the latency deadline (or already has): answer 503 and let the client retry."""


@dataclass(eq=False)
class _Request:
    """The images of one call. They are answered together, so they are refused together, and once one of them is in
    a batch the others run too, however long they waited: a request dropped halfway wastes the work done for it."""

    enqueued: float
    pending: list[_Pending] = field(default_factory=list)
    started: bool = False

    def refuse(self) -> None:
        for item in self.pending:
            if not item.future.done():
                item.future.set_exception(Overloaded())


@dataclass(eq=False)
class _Pending:
    runner: ModelRunner
    tensor: np.ndarray
    future: asyncio.Future
    request: _Request


class Batcher:
    """Greedy adaptive batching inside one worker: `concurrency` batches in flight, made of whatever queued meanwhile.

    Each batch runs in its own inference thread (onnxruntime's run is thread-safe), so that with single-threaded
    sessions one process can keep several cores busy. Shedding: a request is refused with :class:`Overloaded` when
    the images ahead of it and its own would exceed the latency budget (`_admit`, `_budget`) at each model's measured
    cost per image (a queue of 1-ms chest X-rays and 70-ms emotion ensembles is not judged by one average), and
    dropped, all its images, when it has already waited that long before the first of them starts. Batches of
    several models run as one onnxruntime call per model, one after another.
    """

    def __init__(self, max_batch_size: int, max_latency_ms: float, concurrency: int = 1) -> None:
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_ms / 1000
        self.concurrency = max(1, concurrency)
        self._queue: deque[_Pending] = deque()
        self._ready: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._executor = named_pool(self.concurrency, INFERENCE_THREADS)
        # per runner: moving average over its batches of wall time / images; unknown (0) until its first batch
        self._seconds_per_image: dict[int, float] = {}
        self._reserved: defaultdict[int, int] = defaultdict(int)  # per runner: images admitted, not yet queued
        self._shedding = False  # a request was refused; the work ahead has not been down to half the budget since
        self._work_done: asyncio.Future | None = None  # resolved when work ahead goes: a batch ends, a release (room)

    async def infer(self, runner: ModelRunner, tensor: np.ndarray, admit: bool = True) -> dict[str, np.ndarray]:
        """The outputs of one image (C, H, W), computed in a batch with whatever else is queued; with `admit`,
        refused (Overloaded) when the work ahead would exceed the latency budget (see `_admit`)."""
        [pending] = self._enqueue(runner, [tensor], admit)
        return await pending.future

    async def infer_many(
        self, runner: ModelRunner, tensors: Sequence[np.ndarray], admit: bool = True
    ) -> list[dict[str, np.ndarray]]:
        """The outputs of several images of one request, admitted or refused together, batched with the rest."""
        pending = self._enqueue(runner, tensors, admit)
        results = await asyncio.gather(*(item.future for item in pending), return_exceptions=True)
        for result in results:  # every future is awaited, so that no failure goes unretrieved
            if isinstance(result, BaseException):
                raise result
        return results

    def reserve(self, runner: ModelRunner, images: int) -> contextlib.ExitStack:
        """Admit a request's `images` before they are decoded (or refuse it: Overloaded), and count them as queued
        until the returned context ends; queue them right after it with ``admit=False``. Requests decoding side by
        side are so judged with each other, and a refused request has cost no decoding."""
        self._admit(runner, images)
        self._reserved[id(runner)] += images
        release = contextlib.ExitStack()
        release.callback(self._release, id(runner), images)
        return release

    def _release(self, key: int, images: int) -> None:
        self._reserved[key] -= images
        self._wake_door()

    async def room(self) -> bool:
        """Whether a new request may be read: at once, unless shedding (overloaded); then after waiting up to half the
        budget for the work ahead to drop to half the budget. The wait paces clients that retry a 503 without pause:
        refused at once, they would spend the CPU on refusals that the admitted requests need."""
        deadline = time.perf_counter() + self._budget() / 2
        while self.overloaded():
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                REFUSALS.labels(stage="door").inc()
                return False
            if self._work_done is None:
                self._work_done = asyncio.get_running_loop().create_future()
            # asyncio.wait leaves the shared future alone on timeout, and unlike wait_for on Python 3.10-3.11 it
            # cannot swallow a cancellation (the client left) that races with the future's completion
            await asyncio.wait([self._work_done], timeout=remaining)
        return True

    def overloaded(self) -> bool:
        """Whether a request arriving now would be refused before its body is read: from the moment one is refused
        until the work ahead is down to half the budget (hysteresis; without it the door would open for every
        request the queue has just made room for, and most of them would be read only to be refused)."""
        if self._shedding and self._has_work() and self._wait_s() > self._budget() / 2:
            return True
        self._shedding = False
        return False

    def _enqueue(self, runner: ModelRunner, tensors: Sequence[np.ndarray], admit: bool) -> list[_Pending]:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._ready = asyncio.Event()
            self._task = loop.create_task(self._loop(), name="imageai-batcher")
        if admit:
            self._admit(runner, len(tensors))
        request = _Request(enqueued=time.perf_counter())
        request.pending = [_Pending(runner, tensor, loop.create_future(), request) for tensor in tensors]
        self._queue.extend(request.pending)
        self._ready.set()
        return request.pending

    def _admit(self, runner: ModelRunner, images: int) -> None:
        """Refuse (Overloaded) `images` more of `runner` when the work ahead of them and their own would exceed the
        budget. Their own work counts for at most half the budget: a request larger than the budget by itself (64
        images of the emotion ensemble, ~4 s) could never fit behind anything, so it is taken while the work ahead is
        under half the budget. A lone request is always taken, so that one slow batch cannot shut the service (no
        batches, no new estimate)."""
        budget = self._budget()
        own = min(images * self._seconds_per_image.get(id(runner), 0.0) / self.concurrency, budget / 2)
        if self._has_work() and self._wait_s() + own > budget:
            self._shedding = True
            REFUSALS.labels(stage="admission").inc()
            raise Overloaded

    def _has_work(self) -> bool:
        return bool(self._queue) or any(self._reserved.values())

    def _wait_s(self) -> float:
        """How long until the queued and reserved images would be done."""
        cost = self._seconds_per_image
        ahead = sum(cost.get(id(pending.runner), 0.0) for pending in self._queue if not pending.future.done())
        ahead += sum(count * cost.get(key, 0.0) for key, count in self._reserved.items())
        return ahead / self.concurrency

    def _budget(self) -> float:
        """How long a request may wait: max_latency_ms, but never less than one full batch of the slowest model this
        worker has run. The queue is shared by every model, so any request may stand behind such a batch; a shorter
        budget would shed requests at ordinary load (emotion's ensemble: 60-70 ms per image, ~2 s per batch of 32)."""
        return max(self.max_latency_s, self.max_batch_size * max(self._seconds_per_image.values(), default=0.0))

    def _take(self) -> list[_Pending]:
        batch, now, budget = [], time.perf_counter(), self._budget()
        while self._queue and len(batch) < self.max_batch_size:
            pending = self._queue.popleft()
            if pending.future.done():  # the client went away, or its request was refused
                continue
            request = pending.request
            if not request.started:
                if now - request.enqueued > budget:
                    REFUSALS.labels(stage="deadline").inc()
                    self._shedding = True
                    request.refuse()
                    continue
                request.started = True
                for_model(QUEUE_SECONDS, pending.runner.card.name).observe(now - request.enqueued)
            batch.append(pending)
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._queue and len(self._running) < self.concurrency:
                batch = self._take()
                if batch:
                    task = loop.create_task(self._run(batch))
                    self._running.add(task)
                    task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self._ready.set()  # a slot is free: take what queued meanwhile
        self._wake_door()

    def _wake_door(self) -> None:
        """Let the requests waiting in `room` look again: some work ahead has gone."""
        if self._work_done is not None:
            self._work_done.set_result(None)
            self._work_done = None

    async def _run(self, batch: list[_Pending]) -> None:
        timings: dict[int, float] = {}
        try:
            items = [(pending.runner, pending.tensor) for pending in batch]
            results = await asyncio.get_running_loop().run_in_executor(self._executor, run_arrays, items, timings)
        except Exception as error:  # run_arrays catches per model; this is a bug, fail the batch alone
            results = [error] * len(batch)
        for key, per_image in timings.items():
            known = self._seconds_per_image.get(key)
            self._seconds_per_image[key] = per_image if known is None else 0.8 * known + 0.2 * per_image
        for pending, result in zip(batch, results, strict=True):
            if pending.future.done():
                continue
            if isinstance(result, Exception):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


def run_arrays(
    items: Sequence[tuple[ModelRunner, np.ndarray]], timings: dict[int, float] | None = None
) -> list[dict[str, np.ndarray] | Exception]:
    """Run (model, tensor) items as one onnxruntime call per model; a failing model fails only its own items.

    `timings` receives each runner's seconds per image in this call, keyed by ``id(runner)``.
    """
    results: list[dict[str, np.ndarray] | Exception] = [RuntimeError("not run")] * len(items)
    groups: dict[int, list[int]] = defaultdict(list)
    for index, (runner, _) in enumerate(items):
        groups[id(runner)].append(index)
    for indices in groups.values():
        runner = items[indices[0]][0]
        for_model(MODEL_BATCH_SIZE, runner.card.name).observe(len(indices))
        started = time.perf_counter()
        try:
            outputs = runner.run(np.stack([items[index][1] for index in indices]))
        except Exception:
            logger.exception("inference failed for model %s on a batch of %d", runner.card.name, len(indices))
            for index in indices:
                results[index] = RuntimeError("inference failed")
            continue
        seconds = time.perf_counter() - started
        for_model(INFERENCE_SECONDS, runner.card.name).observe(seconds)
        if timings is not None:
            timings[id(runner)] = seconds / len(indices)
        for row, index in enumerate(indices):
            results[index] = {name: value[row].ravel() for name, value in outputs.items()}
    return results
