"""Faults, device fallback, overload, rate limits, graceful shutdown and bounded metrics.

Broken model files must leave a log line naming the file and the problem, an unavailable entry in GET /models,
503 JSON on the model's routes and the other models serving. Beyond capacity the service answers 429/503 at once
instead of queueing; SIGTERM lets accepted requests finish.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from conftest import Server, start_server, write_card
from PIL import Image
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from contract.card import InputSpec, ModelCard, sha256_file
from serving import repository as repository_module
from serving.config import Settings
from serving.guard import AdmissionGuard, RateLimiter
from serving.keepalive import ConnectionRecycler
from serving.metrics_labels import endpoint_label
from serving.repository import CPU, CUDA, ModelProblem, ModelRunner

PNG = Callable[..., bytes]


def _png(shade: int, size: int = 64) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("L", (size, size), shade).save(buffer, format="PNG")
    return buffer.getvalue()


def _upload(data: bytes) -> dict[str, object]:
    return {"files": {"image": ("a.png", data, "image/png")}}


# ---------------------------------------------------------------- device fallback (in-process, simulated CUDA)


@pytest.mark.filterwarnings("ignore:Specified provider:UserWarning")
def test_device_choice_and_cpu_fallback_are_reported(model_repository: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = model_repository / "chest_xray" / "2"
    assert ModelRunner.load(folder, device="cpu").fallback_reason is None  # asked for CPU: no fallback
    auto = ModelRunner.load(folder, device="auto")
    assert auto.provider == CPU and "no CUDA provider" in auto.fallback_reason  # this CPU build of onnxruntime

    # onnxruntime-gpu without usable CUDA libraries: CUDA is listed, the session silently starts on CPU
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    listed = ModelRunner.load(folder, device="auto")
    assert listed.provider == CPU and "did not start" in listed.fallback_reason
    with pytest.raises(ModelProblem, match="IMAGEAI_DEVICE=cuda"):
        ModelRunner.load(folder, device="cuda")

    # the CUDA provider raises while creating the session (driver error, out of GPU memory): retried on CPU
    real_session = ort.InferenceSession
    asked: list[list] = []

    def failing_cuda(data: bytes, options: object = None, providers: list | None = None) -> object:
        asked.append(providers)
        # a provider is a name or a (name, options) pair
        if any(CUDA in (provider if isinstance(provider, tuple) else (provider,)) for provider in providers or []):
            raise RuntimeError("CUDA failure 100: no CUDA-capable device is detected")
        return real_session(data, options, providers=providers)

    monkeypatch.setattr(repository_module.ort, "InferenceSession", failing_cuda)
    failed = ModelRunner.load(folder, device="auto")
    assert failed.provider == CPU and "CUDA failure 100" in failed.fallback_reason
    # cuDNN's exhaustive search would run again for every new batch size: the heuristic choice is asked for
    assert asked[0][0] == (CUDA, {"cudnn_conv_algo_search": "HEURISTIC"}) and asked[1] == [CPU]
    assert failed.proba(np.zeros((1, 1, 16, 16), np.float32)).shape == (1, 2)
    with pytest.raises(ModelProblem, match="cannot load"):
        ModelRunner.load(folder, device="cuda")
    described = repository_module.ModelEntry("chest_xray", "2", runner=failed).describe()
    assert described["provider"] == CPU and "CUDA failure" in described["fallback_reason"]


# ---------------------------------------------------------------- admission control (in-process)


def test_token_bucket_rate_limiter() -> None:
    limiter = RateLimiter(rate=2.0, burst=2.0, max_clients=3)
    assert [limiter.wait_time("a", now=0.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(0.5)]
    assert limiter.wait_time("b", now=0.0) == 0.0  # per client
    assert limiter.wait_time("a", now=0.5) == 0.0  # refilled at 2 per second
    for client in "cdef":
        limiter.wait_time(client, now=1.0)
    assert len(limiter._buckets) == 3  # bounded: the least recently seen clients are forgotten


def _guarded_app(release: asyncio.Event, **limits: float) -> Starlette:
    async def slow(_: Request) -> PlainTextResponse:
        await release.wait()
        return PlainTextResponse("done")

    return Starlette(routes=[Route("/slow", slow)], middleware=[Middleware(AdmissionGuard, **limits)])


def test_admission_guard_caps_requests_in_flight() -> None:
    async def scenario() -> tuple[list[int], list[httpx.Response], int]:
        release = asyncio.Event()
        app = _guarded_app(release, max_in_flight=2, rate_limit_rps=0)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            held = [asyncio.create_task(client.get("/slow")) for _ in range(2)]
            await asyncio.sleep(0.05)
            refused = [await client.get("/slow") for _ in range(3)]
            release.set()
            statuses = [(await task).status_code for task in held]
            after = (await client.get("/slow")).status_code
        return statuses, refused, after

    statuses, refused, after = asyncio.run(scenario())
    assert statuses == [200, 200] and after == 200
    for response in refused:
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "over_capacity"


def test_admission_guard_rate_limits_each_client() -> None:
    async def scenario() -> list[httpx.Response]:
        release = asyncio.Event()
        release.set()
        transport = httpx.ASGITransport(app=_guarded_app(release, max_in_flight=0, rate_limit_rps=5))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.get("/slow") for _ in range(8)]

    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses[:5]] == [200] * 5  # a burst of one second's worth
    limited = [r for r in responses if r.status_code == 429]
    assert len(limited) >= 2
    assert limited[0].json()["error"]["code"] == "rate_limited" and int(limited[0].headers["retry-after"]) >= 1


def _port_echo(max_requests: int) -> Starlette:
    async def port(request: Request) -> PlainTextResponse:
        return PlainTextResponse(str(request.client.port))

    return Starlette(
        routes=[Route("/port", port)], middleware=[Middleware(ConnectionRecycler, max_requests=max_requests)]
    )


def test_keepalive_connections_are_recycled_every_n_responses() -> None:
    async def headers(max_requests: int) -> list[str | None]:
        transport = httpx.ASGITransport(app=_port_echo(max_requests))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [(await client.get("/port")).headers.get("connection") for _ in range(6)]

    assert asyncio.run(headers(3)) == [None, None, "close", None, None, "close"]
    assert asyncio.run(headers(0)) == [None] * 6


def test_a_busy_worker_hands_back_one_connection_per_interval() -> None:
    """Requests waiting on this worker: one response at most per interval says close; an idle worker keeps them."""
    gate = asyncio.Event()

    async def slow(_: Request) -> PlainTextResponse:
        await gate.wait()
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/slow", slow)],
        middleware=[Middleware(ConnectionRecycler, max_requests=0, rebalance_interval_s=60)],
    )

    async def scenario() -> tuple[list[str | None], list[str | None]]:
        gate.set()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            one_at_a_time = [(await client.get("/slow")).headers.get("connection") for _ in range(4)]
            gate.clear()
            burst = [asyncio.create_task(client.get("/slow")) for _ in range(6)]
            await asyncio.sleep(0.05)  # all six in flight
            gate.set()
            return one_at_a_time, [(await task).headers.get("connection") for task in burst]

    idle, busy = asyncio.run(scenario())
    assert idle == [None] * 4
    assert busy.count("close") == 1  # the next one only after 60 s


def test_a_real_server_closes_the_connection_and_the_client_reconnects() -> None:
    import threading

    import uvicorn
    from conftest import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_port_echo(2), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:  # one pooled keep-alive connection
            ports = [client.get("/port").text for _ in range(6)]
    finally:
        server.should_exit = True
        thread.join(10)
    assert ports[0] == ports[1] and ports[2] == ports[3] and ports[4] == ports[5]
    assert len(set(ports)) == 3  # a new connection after every second response


def test_limits_are_on_by_default() -> None:
    defaults = Settings.from_env({})
    assert defaults.max_upload_bytes > 0 and defaults.max_pixels > 0
    assert defaults.max_in_flight > 0 and defaults.rate_limit_rps > 0


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/chest_xray/predict", "/chest_xray/predict"),
        ("/mnist/reconstruct", "/mnist/reconstruct"),
        ("/whatever123/predict", "/{unknown}/predict"),
        ("/chest_xray/proba/batch", "/chest_xray/proba/batch"),
        ("/whatever123/predict/batch", "/{unknown}/predict/batch"),
        ("/a/b/c/predict", "/{unmatched}"),
        ("/random-404", "/{unmatched}"),
        ("/readyz", "/readyz"),
        ("/static_content/x.js", "/static_content/*"),
        # the Open Inference Protocol's paths (serving.v2)
        ("/v2/health/ready", "/v2/health/ready"),
        ("/v2/models/chest_xray/infer", "/v2/models/chest_xray/infer"),
        ("/v2/models/chest_xray/versions/123abc/infer", "/v2/models/chest_xray/infer"),
        ("/v2/models/random1/ready", "/v2/models/{unknown}/ready"),
        ("/v2/models/a/b/c", "/{unmatched}"),
    ],
)
def test_metrics_labels_are_bounded(path: str, label: str) -> None:
    assert endpoint_label(path, lambda name, action: name in ("chest_xray", "mnist")) == label


@pytest.mark.slow
def test_random_paths_add_no_metrics_series(server: Server) -> None:
    """BentoML labels its request metrics with the raw path: without serving.metrics_labels every new path below
    would add ~20 series to /metrics for the life of the process."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for index in range(30):
            client.get(f"/random-{index}")
            client.post(f"/nosuchmodel{index}/predict", **_upload(_png(0, 8)))
        client.get("/models")
        metrics = client.get("/metrics").text
    assert "random-" not in metrics and "nosuchmodel" not in metrics
    assert 'endpoint="/{unmatched}"' in metrics and 'endpoint="/{unknown}/predict"' in metrics
    assert 'endpoint="/models"' in metrics  # known routes keep their own label


@pytest.mark.slow
def test_models_listing_shows_provider_and_fallback(server: Server) -> None:
    models = {model["name"]: model for model in httpx.get(server.url + "/models").json()["models"]}
    assert models["chest_xray"]["provider"] == CPU
    assert "no CUDA provider" in models["chest_xray"]["fallback_reason"]  # IMAGEAI_DEVICE=auto on a CPU box
    assert models["tampered"]["fallback_reason"] is None


# ---------------------------------------------------------------- broken model files, against a real server


def _copy(source: Path, root: Path, name: str) -> Path:
    folder = root / name / "1"
    shutil.copytree(source, folder)
    ModelCard.load(folder).model_copy(update={"name": name}).save(folder)
    return folder


def _reseal(folder: Path) -> None:
    """Make the card's sha256 match whatever model.onnx now holds."""
    card = ModelCard.load(folder)
    card.onnx.sha256 = sha256_file(folder / "model.onnx")
    card.save(folder)


def broken_repository(model_repository: Path, root: Path) -> dict[str, str]:
    """A repository with one good model and one per fault; returns name → expected problem text."""
    source = model_repository / "chest_xray" / "1"
    _copy(source, root, "good")
    (_copy(source, root, "missing_onnx") / "model.onnx").unlink()
    folder = _copy(source, root, "corrupt_onnx")
    (folder / "model.onnx").write_bytes(b"\x08\x07 this is not an ONNX protobuf" * 20)
    _reseal(folder)
    folder = _copy(source, root, "sha_mismatch")
    (folder / "model.onnx").write_bytes((folder / "model.onnx").read_bytes() + b"\0")
    (_copy(source, root, "invalid_card") / "model.json").write_text('{"name": "invalid_card", "version": 1}')
    folder = _copy(source, root, "wrong_shape")
    spec = InputSpec(channels=1, height=32, width=32)
    write_card(folder, name="wrong_shape", version="1", kind="classifier", spec=spec, classes=["normal", "pneumonia"])
    return {
        "missing_onnx": "model.onnx is missing",
        "corrupt_onnx": "onnxruntime cannot load model.onnx",
        "sha_mismatch": "sha256 of model.onnx",
        "invalid_card": "model.json is not a valid model card",
        "wrong_shape": "input contract is [N, 1, 32, 32]",
    }


@pytest.fixture(scope="module")
def faulty(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, str]]]:
    """Strict readiness (the default) over the broken repository; 2 requests in flight at most, no rate limit."""
    root = tmp_path_factory.mktemp("broken_models")
    problems = broken_repository(model_repository, root)
    running = start_server(root, tmp_path_factory.mktemp("faulty"), max_in_flight="2", rate_limit_rps="0")
    try:
        running.wait("/livez")
        running.wait_for_log("warm-up done")
        yield running, problems
    finally:
        running.stop()


@pytest.mark.slow
def test_broken_models_are_reported_and_the_rest_serves(faulty: tuple[Server, dict[str, str]]) -> None:
    server, problems = faulty
    log = server.log.read_text()
    for name, problem in problems.items():
        line = next((line for line in log.splitlines() if f"model {name} is UNAVAILABLE" in line), "")
        assert problem in line and f"{name}/1" in line, (name, line)  # the problem and the folder holding the file

    models = {model["name"]: model for model in httpx.get(server.url + "/models").json()["models"]}
    assert models["good"]["status"] == "ready"
    for name, problem in problems.items():
        assert models[name]["status"] == "unavailable" and problem in models[name]["reason"], models[name]
        assert "/" not in models[name]["reason"].replace("[N, ", "")  # no paths shown to clients
        for action in ("predict", "proba"):
            response = httpx.post(f"{server.url}/{name}/{action}", **_upload(_png(0)), timeout=30)
            assert response.status_code == 503, response.text
            error = response.json()["error"]
            assert error["code"] == "model_unavailable" and problem in error["message"]

    assert httpx.get(server.url + "/readyz").status_code == 503  # strict: every model must be ready
    assert httpx.get(server.url + "/livez").status_code == 200
    good = httpx.post(server.url + "/good/predict", **_upload(_png(10)), timeout=30)
    assert good.status_code == 200 and good.json()["label"] == "pneumonia"


@pytest.mark.slow
def test_lenient_readiness_with_an_unavailable_model(server: Server) -> None:
    """The shared server is lenient and serves the `tampered` model as unavailable: ready all the same."""
    assert httpx.get(server.url + "/readyz").status_code == 200
    assert httpx.post(server.url + "/tampered/predict", **_upload(_png(0)), timeout=30).status_code == 503


# ---------------------------------------------------------------- overload


def _noisy_png(size: int, seed: int) -> bytes:
    import io

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_overload_is_refused_quickly_and_the_service_recovers(faulty: tuple[Server, dict[str, str]]) -> None:
    """40 concurrent requests against IMAGEAI_MAX_IN_FLIGHT=2: the excess is refused at once with 429 (or shed
    with 503 `overloaded`), nothing else fails, and normal answers follow."""
    server, _ = faulty
    images = [_noisy_png(600, seed) for seed in range(4)]  # ~0.4 MB each: decoding takes a while

    async def burst() -> list[tuple[int, str, float, str | None]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:

            async def one(index: int) -> tuple[int, str, float, str | None]:
                started = time.monotonic()
                response = await client.post("/good/predict", **_upload(images[index % len(images)]))
                code = response.json().get("error", {}).get("code", "") if response.status_code != 200 else ""
                return response.status_code, code, time.monotonic() - started, response.headers.get("retry-after")

            return await asyncio.gather(*(one(index) for index in range(40)))

    results = asyncio.run(burst())
    statuses = [status for status, *_ in results]
    refused = [(status, code, seconds, retry) for status, code, seconds, retry in results if status != 200]
    print(f"40 concurrent, 2 in flight: {statuses.count(200)} answered, {statuses.count(429)} 429, "
          f"{statuses.count(503)} 503; slowest refusal {max((r[2] for r in refused), default=0):.2f} s")  # fmt: skip
    assert set(statuses) <= {200, 429, 503}, results
    assert statuses.count(200) >= 2 and statuses.count(429) >= 10
    for status, code, seconds, retry in refused:
        assert (status, code) in ((429, "over_capacity"), (503, "overloaded")) and retry is not None
        if status == 429:
            assert seconds < 5, f"a 429 took {seconds:.1f} s"

    with httpx.Client(base_url=server.url, timeout=30) as client:
        after = [client.post("/good/predict", **_upload(_png(245))) for _ in range(5)]
    assert [response.status_code for response in after] == [200] * 5
    assert all(response.json()["label"] == "normal" for response in after)


# ---------------------------------------------------------------- graceful shutdown


def _in_progress(server: Server, endpoint: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=5).text
    pattern = rf'^bentoml_service_request_in_progress\{{endpoint="{re.escape(endpoint)}"[^}}]*\}} (\S+)$'
    return sum(float(value) for value in re.findall(pattern, text, re.MULTILINE))


@pytest.mark.slow
def test_sigterm_lets_accepted_requests_finish(model_repository: Path, tmp_path: Path) -> None:
    """SIGTERM to `bentoml serve` (what `docker stop` or Kubernetes sends) while 8 uploads are still arriving: every
    one of them is answered 200, then the server exits cleanly."""
    server = start_server(model_repository, tmp_path, readiness="lenient", model_versions="rgb=1")
    count, image = 8, _png(10, 256)
    try:
        server.wait("/readyz")

        multipart = httpx.Request("POST", server.url, **_upload(image))  # type: ignore[arg-type]
        body, headers = multipart.read(), {"content-type": multipart.headers["content-type"]}

        async def slow_body() -> AsyncIterator[bytes]:
            yield body[:100]
            await asyncio.sleep(1.5)  # the request is accepted and being read when SIGTERM arrives
            yield body[100:]

        async def scenario() -> list[int | str]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                tasks = [
                    asyncio.create_task(client.post("/chest_xray/predict", content=slow_body(), headers=headers))
                    for _ in range(count)
                ]
                deadline = time.monotonic() + 10
                while _in_progress(server, "/chest_xray/predict") < count and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert _in_progress(server, "/chest_xray/predict") == count
                server.process.send_signal(signal.SIGTERM)  # the arbiter only, as a container runtime does
                responses = await asyncio.gather(*tasks, return_exceptions=True)
            return [r.status_code if isinstance(r, httpx.Response) else repr(r) for r in responses]

        statuses = asyncio.run(scenario())
        assert statuses == [200] * count, statuses
        assert server.process.wait(timeout=30) == 0
    finally:
        server.stop()
    assert "Traceback" not in server.log.read_text()
