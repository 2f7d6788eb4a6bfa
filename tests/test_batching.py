"""The in-process batcher (IMAGEAI_BATCHING=direct) and the BentoML-dispatcher alternative (bentoml)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import io
import re
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import start_server
from PIL import Image

from serving.batching import REFUSALS, Batcher, Overloaded
from serving.config import Settings
from serving.repository import CUDA, ModelRepository
from serving.threads import named_pool


@pytest.fixture(scope="module")
def repository(model_repository: Path) -> ModelRepository:
    return ModelRepository.load(Settings(models_dir=model_repository, model_versions={"rgb": "1"}))


def _refusals() -> dict[str, float]:
    """imageai_overload_refusals_total by stage, as /metrics exports it."""
    samples = REFUSALS.collect()[0].samples
    return {sample.labels["stage"]: sample.value for sample in samples if sample.name.endswith("_total")}


class Slow:
    """Wraps a runner: records batch sizes, takes `seconds` per call, optionally fails."""

    def __init__(self, runner, seconds: float = 0.05, fail: bool = False) -> None:
        self.runner, self.seconds, self.fail, self.sizes = runner, seconds, fail, []
        self.card = runner.card
        self.lock = threading.Lock()

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        with self.lock:
            self.sizes.append(len(batch))
        time.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("boom")
        return self.runner.run(batch)


def test_concurrent_calls_share_batches_and_get_their_own_rows(repository: ModelRepository) -> None:
    runner = Slow(repository.get("chest_xray").runner)
    batcher = Batcher(max_batch_size=8, max_latency_ms=10_000)
    shades = np.linspace(0, 1, 20, dtype=np.float32)

    async def calls() -> list[dict[str, np.ndarray]]:
        return await asyncio.gather(*(batcher.infer(runner, np.full((1, 16, 16), s, np.float32)) for s in shades))

    results = asyncio.run(calls())
    batcher.close()
    assert sum(runner.sizes) == 20 and max(runner.sizes) == 8 and len(runner.sizes) < 20
    # each caller gets the row of its own image: dark → pneumonia, bright → normal
    expected = repository.get("chest_xray").runner.run(shades.reshape(20, 1, 1, 1) * np.ones((1, 1, 16, 16)))
    for result, want in zip(results, expected["probabilities"], strict=True):
        np.testing.assert_allclose(result["probabilities"], want, atol=1e-6)


def test_mixed_models_and_a_failing_model_fail_alone(repository: ModelRepository) -> None:
    good = Slow(repository.get("chest_xray").runner, seconds=0.01)
    bad = Slow(repository.get("rgb").runner, seconds=0.01, fail=True)
    batcher = Batcher(max_batch_size=16, max_latency_ms=10_000)

    async def calls() -> list[object]:
        jobs = [batcher.infer(good, np.zeros((1, 16, 16), np.float32)) for _ in range(4)]
        jobs += [batcher.infer(bad, np.zeros((3, 8, 8), np.float32)) for _ in range(3)]
        return await asyncio.gather(*jobs, return_exceptions=True)

    results = asyncio.run(calls())
    batcher.close()
    assert all(isinstance(r, dict) for r in results[:4])
    assert all(isinstance(r, RuntimeError) for r in results[4:])


def test_requests_that_would_miss_the_deadline_are_shed(repository: ModelRepository) -> None:
    runner = Slow(repository.get("chest_xray").runner, seconds=0.1)
    batcher = Batcher(max_batch_size=2, max_latency_ms=150)

    async def calls() -> list[object]:
        zeros = np.zeros((1, 16, 16), np.float32)
        first = await batcher.infer(runner, zeros)  # teaches the batcher the cost: ~0.1 s per image
        rest = await asyncio.gather(*(batcher.infer(runner, zeros) for _ in range(12)), return_exceptions=True)
        return [first, *rest]

    results = asyncio.run(calls())
    batcher.close()
    shed = [r for r in results if isinstance(r, Overloaded)]
    assert isinstance(results[0], dict) and shed and len(shed) < len(results)


def test_the_images_of_one_request_are_admitted_or_refused_together(repository: ModelRepository) -> None:
    runner = Slow(repository.get("chest_xray").runner, seconds=0.1)  # 0.025 s per image in batches of 4
    batcher = Batcher(max_batch_size=4, max_latency_ms=200)
    shades = [np.full((1, 16, 16), s, np.float32) for s in np.linspace(0, 1, 6, dtype=np.float32)]

    async def calls() -> tuple[list[dict[str, np.ndarray]], object]:
        many = await batcher.infer_many(runner, shades)  # alone: taken, and split into batches of at most 4
        busy = asyncio.ensure_future(batcher.infer_many(runner, shades + shades[:2]))  # 2 batches, 0.2 s
        await asyncio.sleep(0)
        refused = await asyncio.gather(batcher.infer_many(runner, shades), return_exceptions=True)
        await busy
        return many, refused[0]

    many, refused = asyncio.run(calls())
    batcher.close()
    assert runner.sizes[:2] == [4, 2] and isinstance(refused, Overloaded)
    expected = repository.get("chest_xray").runner.run(np.stack(shades))["probabilities"]
    np.testing.assert_allclose([result["probabilities"] for result in many], expected, atol=1e-6)


def test_a_request_larger_than_the_budget_is_taken_while_little_is_ahead(repository: ModelRepository) -> None:
    """Six images at 0.1 s each need 0.6 s, more than the 0.25-s budget by themselves, so they could never fit behind
    anything: their own work counts for half the budget. Behind one queued image they are taken (0.1 + 0.125 s),
    behind seven refused."""
    runner = Slow(repository.get("chest_xray").runner, seconds=0.2)  # 0.1 s per image in batches of 2
    batcher = Batcher(max_batch_size=2, max_latency_ms=250)
    six = [np.zeros((1, 16, 16), np.float32)] * 6

    async def calls() -> tuple[list[dict[str, np.ndarray]], object]:
        await batcher.infer_many(runner, six[:2])  # the cost learnt: 0.1 s per image
        busy = asyncio.ensure_future(batcher.infer_many(runner, six[:3]))
        await asyncio.sleep(0.01)  # two of its images run, one is queued
        taken = asyncio.ensure_future(batcher.infer_many(runner, six))
        await asyncio.sleep(0)
        refused = await asyncio.gather(batcher.infer_many(runner, six), return_exceptions=True)
        await busy
        return await taken, refused[0]

    taken, refused = asyncio.run(calls())
    batcher.close()
    assert len(taken) == 6 and isinstance(refused, Overloaded)


def test_a_request_whose_images_have_started_is_never_dropped_halfway(repository: ModelRepository) -> None:
    """Six images in batches of two at 0.08 s each: the last two wait 0.16 s, past the 0.1-s budget, yet they run,
    because the request's first images already have; dropping them would waste those and answer 503 all the same."""
    runner = Slow(repository.get("chest_xray").runner, seconds=0.08)
    batcher = Batcher(max_batch_size=2, max_latency_ms=100)
    shades = [np.full((1, 16, 16), s, np.float32) for s in np.linspace(0, 1, 6, dtype=np.float32)]

    results = asyncio.run(batcher.infer_many(runner, shades))
    batcher.close()
    assert runner.sizes == [2, 2, 2] and len(results) == 6
    expected = repository.get("chest_xray").runner.run(np.stack(shades))["probabilities"]
    np.testing.assert_allclose([result["probabilities"] for result in results], expected, atol=1e-6)


def test_a_request_that_waited_too_long_is_refused_whole(repository: ModelRepository) -> None:
    """A request still queued when its wait passes the budget (one full batch: 0.3 s) is refused with all its images,
    none of which then runs; the two batches ahead of it (0.6 s) run whole."""
    runner = Slow(repository.get("chest_xray").runner, seconds=0.3)
    batcher = Batcher(max_batch_size=2, max_latency_ms=100)
    zeros = np.zeros((1, 16, 16), np.float32)

    async def calls() -> list[object]:
        busy = asyncio.ensure_future(batcher.infer_many(runner, [zeros] * 4, admit=False))
        await asyncio.sleep(0)
        late = await asyncio.gather(batcher.infer_many(runner, [zeros] * 3, admit=False), return_exceptions=True)
        return [await busy, *late]

    before = _refusals()
    busy, late = asyncio.run(calls())
    batcher.close()
    assert len(busy) == 4 and isinstance(late, Overloaded)
    assert runner.sizes == [2, 2]
    assert _refusals()["deadline"] == before["deadline"] + 1


def test_images_whose_client_left_are_not_work_ahead(repository: ModelRepository) -> None:
    """Six queued images (0.6 s, three times the budget) whose request was cancelled do not get the next one refused."""
    runner = Slow(repository.get("chest_xray").runner, seconds=0.1)
    batcher = Batcher(max_batch_size=2, max_latency_ms=100)  # once the cost is known: a budget of 0.2 s
    zeros = np.zeros((1, 16, 16), np.float32)

    async def calls() -> dict[str, np.ndarray]:
        await batcher.infer(runner, zeros)  # 0.1 s per image
        busy = asyncio.ensure_future(batcher.infer_many(runner, [zeros] * 2, admit=False))
        await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(batcher.infer_many(runner, [zeros] * 6, admit=False))
        await asyncio.sleep(0)
        gone.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gone
        result = await batcher.infer(runner, zeros)
        await busy
        return result

    result = asyncio.run(calls())
    batcher.close()
    assert "probabilities" in result


@pytest.fixture
def routes_with(monkeypatch):
    """serving.routes with its current service replaced by one that has only the given batcher."""
    from types import SimpleNamespace

    from serving import routes

    def install(batcher: Batcher):
        monkeypatch.setattr(routes, "current_service", lambda: SimpleNamespace(batcher=batcher))
        return routes

    return install


def test_images_are_admitted_before_decoding_and_count_as_queued_meanwhile(repository, routes_with) -> None:
    """Two requests decoding side by side are judged with each other: the second is refused (503) while the first
    holds its reservation, and taken once the first's images are queued."""
    runner = Slow(repository.get("chest_xray").runner, seconds=0.1)
    batcher = Batcher(max_batch_size=2, max_latency_ms=100)  # once the cost is known: a budget of 0.2 s
    routes = routes_with(batcher)
    zeros = np.zeros((1, 16, 16), np.float32)

    async def calls() -> tuple[int, list[dict[str, np.ndarray]]]:
        await batcher.infer(runner, zeros)  # 0.1 s per image
        with routes.admitted(runner, 2), pytest.raises(routes.ApiError) as refused:  # alone: always taken
            routes.admitted(runner, 1)
        with routes.admitted(runner, 2):  # released: taken again
            pass
        return refused.value.status, await batcher.infer_many(runner, [zeros, zeros], admit=False)

    status, results = asyncio.run(calls())
    batcher.close()
    assert status == 503 and len(results) == 2


def test_after_a_refusal_requests_are_refused_before_their_bodies_are_read(repository, routes_with) -> None:
    """Once a request is refused, the routes answer 503 before reading a body until the work ahead is down to half
    the budget, each after waiting up to half the budget for that (which paces clients that retry at once)."""
    runner = Slow(repository.get("chest_xray").runner, seconds=0.1)
    batcher = Batcher(max_batch_size=2, max_latency_ms=100)  # once the cost is known: a budget of 0.2 s
    routes = routes_with(batcher)
    zeros = np.zeros((1, 16, 16), np.float32)

    async def calls() -> tuple[bool, float, bool]:
        await batcher.infer(runner, zeros)
        await routes.refuse_when_overloaded()  # idle: at once
        busy = asyncio.ensure_future(batcher.infer_many(runner, [zeros] * 8, admit=False))  # ≥ 0.3 s queued
        await asyncio.sleep(0.01)
        before_refusal = batcher.overloaded()
        with pytest.raises(routes.ApiError):
            routes.admitted(runner, 1)
        started = time.perf_counter()
        with pytest.raises(routes.ApiError) as at_the_door:
            await routes.refuse_when_overloaded()
        waited = time.perf_counter() - started
        await busy
        await routes.refuse_when_overloaded()  # drained: admitted again
        return before_refusal, waited, "Retry-After" in (at_the_door.value.headers or {})

    before = _refusals()
    before_refusal, waited, retry_after = asyncio.run(calls())
    batcher.close()
    assert not before_refusal and 0.05 <= waited < 0.5 and retry_after
    after = _refusals()
    assert after["admission"] == before["admission"] + 1 and after["door"] == before["door"] + 1


def test_admission_judges_each_model_by_its_own_cost(repository: ModelRepository) -> None:
    """The work ahead is each queued image at its own model's cost: twenty images of a fast model fit the budget,
    which is one full batch of the slowest model (2 images at 0.2 s: 0.4 s, over the 100 ms asked for), while a third
    image of the slow one would exceed it."""
    slow = Slow(repository.get("rgb").runner, seconds=0.2)
    fast = Slow(repository.get("chest_xray").runner, seconds=0.0)
    batcher = Batcher(max_batch_size=2, max_latency_ms=100)
    color, gray = np.zeros((3, 8, 8), np.float32), np.zeros((1, 16, 16), np.float32)

    async def calls() -> tuple[list[object], list[object]]:
        await batcher.infer(slow, color)  # both costs learnt
        await batcher.infer(fast, gray)
        fast_ones = await asyncio.gather(*(batcher.infer(fast, gray) for _ in range(20)), return_exceptions=True)
        slow_ones = await asyncio.gather(*(batcher.infer(slow, color) for _ in range(3)), return_exceptions=True)
        return fast_ones, slow_ones

    fast_ones, slow_ones = asyncio.run(calls())
    batcher.close()
    assert all(isinstance(result, dict) for result in fast_ones)
    assert [type(result) for result in slow_ones] == [dict, dict, Overloaded]


def test_one_slow_batch_cannot_shut_the_batcher(repository: ModelRepository) -> None:
    """After a batch far over the latency budget (a cold GPU kernel), a lone request is still taken and the cost
    estimate recovers; warm-up (admit=False) is never shed."""
    runner = Slow(repository.get("chest_xray").runner, seconds=0.3)
    batcher = Batcher(max_batch_size=4, max_latency_ms=100)
    zeros = np.zeros((1, 16, 16), np.float32)

    async def calls() -> list[object]:
        first = await batcher.infer(runner, zeros, admit=False)  # 0.3 s per image, 3x the budget
        warm = await asyncio.gather(*(batcher.infer(runner, zeros, admit=False) for _ in range(4)))
        runner.seconds = 0.001
        first_and_warm = [first, *warm]
        alone = [await batcher.infer(runner, zeros) for _ in range(3)]
        return [*first_and_warm, *alone]

    results = asyncio.run(calls())
    batcher.close()
    assert all(isinstance(r, dict) for r in results)


class ShapeRecorder:
    """Wraps an onnxruntime session: records the batch sizes it is asked to run."""

    def __init__(self, session) -> None:
        self.session, self.sizes = session, []

    def run(self, names, feed):
        self.sizes.append(len(next(iter(feed.values()))))
        return self.session.run(names, feed)


def test_cuda_batches_are_padded_to_the_warmed_sizes(repository: ModelRepository) -> None:
    runner = copy.copy(repository.get("rgb").runner)
    runner.session = recorder = ShapeRecorder(runner.session)
    batch = np.random.default_rng(0).random((3, 3, 8, 8), dtype=np.float32)
    runner.warm_up([1, 2, 4])
    unpadded = runner.run(batch)
    assert runner.padded_sizes == () and recorder.sizes[-1] == 3  # CPU: the cost is linear in the batch

    runner.provider = CUDA
    runner.warm_up([1, 2, 4])
    padded = runner.run(batch)
    assert runner.padded_sizes == (1, 2, 4) and recorder.sizes[-1] == 4
    assert padded["probabilities"].shape == (3, 3)
    np.testing.assert_allclose(padded["probabilities"], unpadded["probabilities"], atol=1e-6)
    assert len(runner.run(np.zeros((6, 3, 8, 8), np.float32))["probabilities"]) == 6  # beyond the largest: as is


def _metric_sum(text: str, pattern: str) -> float:
    return sum(float(value) for value in re.findall(pattern, text, re.MULTILINE))


@pytest.mark.slow
def test_bentoml_dispatcher_mode_still_batches(model_repository: Path, tmp_path: Path) -> None:
    server = start_server(model_repository, tmp_path, readiness="lenient", batching="bentoml", rate_limit_rps="0")
    images = []
    for shade in range(0, 256, 16):
        buffer = io.BytesIO()
        Image.new("L", (64, 64), shade).save(buffer, format="PNG")
        images.append(buffer.getvalue())

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            posts = (client.post("/chest_xray/predict", files={"image": ("a.png", d, "image/png")}) for d in images)
            return [response.status_code for response in await asyncio.gather(*posts)]

    try:
        server.wait("/readyz")
        pattern = r'^bentoml_service_adaptive_batch_size_count\{[^}]*method_name="infer"[^}]*\} (\S+)$'
        before = _metric_sum(httpx.get(server.url + "/metrics").text, pattern)
        assert asyncio.run(burst()) == [200] * len(images)
        after = _metric_sum(httpx.get(server.url + "/metrics").text, pattern)
        assert 0 < after - before < len(images)  # through BentoML's dispatcher, fewer batches than requests
        explained = httpx.post(server.url + "/chest_xray/explain", files={"image": ("a.png", images[-1], "image/png")})
        assert explained.status_code == 200 and explained.json()["label"] == "normal"  # run alone in this mode
    finally:
        server.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OS thread names are read from /proc")
def test_pool_threads_carry_their_names_to_the_os() -> None:
    """`top -H`, `ps -L` and the benchmark's CPU split tell the service's threads apart by these names."""
    with named_pool(1, "imageai-infer") as pool:
        thread_id = pool.submit(threading.get_native_id).result()
        assert Path(f"/proc/self/task/{thread_id}/comm").read_text().strip() == "imageai-infer_0"
