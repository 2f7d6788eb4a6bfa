"""Serving: model loading and verification in-process, then the HTTP contract against `bentoml serve`."""

from __future__ import annotations

import asyncio
import http.server
import io
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from conftest import BIN, REPO_ROOT, Server, classifier_graph, start_server, write_card
from PIL import Image
from pydantic import ValidationError

from contract.card import InputSpec, ModelCard
from serving.batching import InferItem, run_batch
from serving.config import Settings
from serving.repository import ModelRepository, ModelRunner
from serving.routes import decide, to_png

PNG = Callable[..., bytes]


# ---------------------------------------------------------------- settings, repository, batch function (fast)


def test_settings_from_env() -> None:
    settings = Settings.from_env(
        {
            "IMAGEAI_MODEL_VERSIONS": "chest_xray=2, mnist_autoencoder=1",
            "IMAGEAI_WORKERS": "2",
            "IMAGEAI_DEVICE": "",
        }
    )
    assert settings.model_versions == {"chest_xray": "2", "mnist_autoencoder": "1"}
    assert settings.device == "auto" and settings.threads_per_session >= 1
    assert Settings(max_batch_size=32).warmup_batch_sizes == [1, 2, 4, 8, 16, 32]
    assert Settings(max_batch_size=24).warmup_batch_sizes == [1, 2, 4, 8, 16, 24]
    for bad in (
        {"IMAGEAI_MODEL_VERSIONS": "chest_xray"},
        {"IMAGEAI_MAX_BATCH_SIZE": "1"},
        {"IMAGEAI_DEVICE": "tpu"},
        {"IMAGEAI_TRACING_SAMPLE_RATE": "1.5"},
        {"IMAGEAI_TRACING_ENDPOINT": "otel-collector:4318"},
    ):
        with pytest.raises(ValidationError):
            Settings.from_env(bad)


def test_tracing_is_skipped_unless_an_endpoint_is_given() -> None:
    from opentelemetry.util.http import ExcludeList

    off = Settings().tracing_config
    assert ExcludeList(off["excluded_urls"]).url_disabled("http://localhost:3000/chest_xray/predict")
    url = "http://collector:4318/v1/traces"
    on = Settings.from_env({"IMAGEAI_TRACING_ENDPOINT": url, "IMAGEAI_TRACING_SAMPLE_RATE": "0.1"}).tracing_config
    assert on == {"exporter_type": "otlp", "sample_rate": 0.1, "otlp": {"protocol": "http", "endpoint": url}}


def test_repository_serves_latest_or_pinned_and_refuses_tampered(model_repository: Path) -> None:
    repository = ModelRepository.load(Settings(models_dir=model_repository, model_versions={"rgb": "1"}))
    versions = {entry.name: (entry.version, entry.ready) for entry in repository}
    assert versions == {
        "chest_xray": ("2", True),
        "mnist_autoencoder": ("1", True),
        "rgb": ("1", True),
        "tampered": ("1", False),
    }
    assert "sha256" in (repository.get("tampered").problem or "")
    assert repository.autoencoder("mnist") is repository.get("mnist_autoencoder")
    assert repository.autoencoder("mnist_autoencoder") is repository.get("mnist_autoencoder")
    assert repository.autoencoder("chest_xray") is None


def test_cpu_memory_arena_is_off_unless_asked_for(model_repository: Path) -> None:
    """The arena would keep every session's largest-batch activations for the worker's life (GBs for big models)."""
    default = ModelRepository.load(Settings(models_dir=model_repository)).get("rgb").runner
    assert default.session.get_session_options().enable_cpu_mem_arena is False
    settings = Settings.from_env({"IMAGEAI_MODELS_DIR": str(model_repository), "IMAGEAI_CPU_MEMORY_ARENA": "true"})
    arena = ModelRepository.load(settings).get("rgb").runner
    assert arena.session.get_session_options().enable_cpu_mem_arena is True


def _copy_model(source: Path, root: Path, name: str) -> Path:
    folder = root / name / "1"
    shutil.copytree(source, folder)
    card = ModelCard.load(folder).model_copy(update={"name": name})
    card.save(folder)
    return folder


@pytest.mark.parametrize(
    ("break_it", "problem"),
    [
        (lambda folder: (folder / "model.onnx").write_bytes(b"garbage"), "sha256"),
        (lambda folder: (folder / "model.json").write_text("{}"), "not a valid model card"),
        (lambda folder: (folder / "model.json").unlink(), "model.json is missing"),
        (
            lambda folder: write_card(
                folder,
                name="broken",
                version="1",
                kind="classifier",
                spec=InputSpec(channels=1, height=32, width=32),
                classes=["normal", "pneumonia"],
            ),
            "input contract",
        ),
        (
            lambda folder: write_card(
                folder,
                name="other_name",
                version="1",
                kind="classifier",
                spec=InputSpec(channels=1, height=16, width=16),
                classes=["normal", "pneumonia"],
            ),
            "the card describes other_name",
        ),
    ],
    ids=["corrupt-onnx", "invalid-card", "missing-card", "wrong-input-shape", "name-mismatch"],
)
def test_repository_refuses_broken_models(
    model_repository: Path, tmp_path: Path, break_it: Callable[[Path], object], problem: str
) -> None:
    _copy_model(model_repository / "chest_xray" / "1", tmp_path, "good")
    break_it(_copy_model(model_repository / "chest_xray" / "1", tmp_path, "broken"))
    repository = ModelRepository.load(Settings(models_dir=tmp_path))
    assert repository.get("good").ready
    broken = repository.get("broken")
    assert not broken.ready and problem in broken.problem
    assert str(tmp_path) not in broken.problem  # reasons are shown to clients: no paths


def test_repository_refuses_fixed_batch_and_missing_pinned_version(model_repository: Path, tmp_path: Path) -> None:
    folder = _copy_model(model_repository / "chest_xray" / "1", tmp_path, "fixed")
    graph = classifier_graph(1, 16, np.array([[1.0, -1.0]]), np.zeros(2))
    graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.save_model(model, folder / "model.onnx")
    write_card(
        folder,
        name="fixed",
        version="1",
        kind="classifier",
        spec=InputSpec(channels=1, height=16, width=16),
        classes=["a", "b"],
    )
    repository = ModelRepository.load(Settings(models_dir=tmp_path, model_versions={"fixed": "7"}))
    assert "version 7 does not exist" in repository.get("fixed").problem
    repository = ModelRepository.load(Settings(models_dir=tmp_path))
    assert "fixed batch size" in repository.get("fixed").problem


def test_runner_proba_and_batch_function(model_repository: Path) -> None:
    runner = ModelRunner.load(model_repository / "chest_xray" / "2")
    batch = np.stack([np.zeros((1, 16, 16)), np.ones((1, 16, 16))]).astype(np.float32)
    probabilities = runner.proba(batch)
    assert probabilities.shape == (2, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    assert probabilities[0, 1] > 0.99 and probabilities[1, 0] > 0.99  # dark → pneumonia, bright → normal

    repository = ModelRepository.load(Settings(models_dir=model_repository))
    items = [
        InferItem.of("chest_xray", batch[0]),
        InferItem.of("nope", batch[0]),
        InferItem.of("chest_xray", np.zeros(3, np.float32)),
        InferItem.of("mnist_autoencoder", np.zeros((1, 28, 28), np.float32)),
        InferItem.of("chest_xray", batch[1]),
    ]
    wire = [InferItem.model_validate_json(item.model_dump_json()) for item in items]  # base64 round trip
    results = run_batch(repository, wire)
    assert [result.error is None for result in results] == [True, False, False, True, True]
    np.testing.assert_allclose(results[0].outputs["probabilities"], probabilities[0], rtol=1e-6)
    np.testing.assert_allclose(results[4].outputs["probabilities"], probabilities[1], rtol=1e-6)
    assert len(results[3].outputs["code"]) == 30 and len(results[3].outputs["reconstruction"]) == 28 * 28


def test_decide_thresholds_binary_and_argmax_otherwise(model_repository: Path) -> None:
    card = ModelCard.load(model_repository / "chest_xray" / "2").model_copy(update={"threshold": 0.3})
    assert decide(card, np.array([0.65, 0.35])) == ("pneumonia", pytest.approx(0.35))
    assert decide(card, np.array([0.75, 0.25])) == ("normal", pytest.approx(0.75))
    rgb = ModelCard.load(model_repository / "rgb" / "1")
    assert decide(rgb, np.array([0.2, 0.5, 0.3])) == ("green", pytest.approx(0.5))
    image = Image.open(io.BytesIO(to_png(np.full(784, 0.5, np.float32), InputSpec(channels=1, height=28, width=28))))
    assert image.size == (28, 28) and image.mode == "L" and image.getpixel((3, 3)) == 128


def test_serving_never_imports_torch() -> None:
    code = "import sys, serving.service; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT).returncode == 0
    assert not [p for p in (REPO_ROOT / "serving").rglob("*") if p.is_file() and b"torch" in p.read_bytes()]


# ---------------------------------------------------------------- HTTP contract against `bentoml serve`


def _post(server: Server, path: str, image: bytes, content_type: str = "image/png") -> httpx.Response:
    return httpx.post(server.url + path, files={"image": ("upload", image, content_type)}, timeout=30)


def _encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.mark.slow
def test_health_and_metrics(server: Server) -> None:
    assert httpx.get(server.url + "/livez").status_code == 200
    assert httpx.get(server.url + "/readyz").status_code == 200
    metrics = httpx.get(server.url + "/metrics")
    assert metrics.status_code == 200
    assert "imageai_model_batch_size" in metrics.text  # BentoML's adaptive_batch_size: IMAGEAI_BATCHING=bentoml
    for stage in ("door", "admission", "deadline"):  # exported before the first refusal
        assert f'imageai_overload_refusals_total{{stage="{stage}"}} 0.0' in metrics.text


@pytest.mark.slow
def test_predict_and_proba(server: Server, png: PNG) -> None:
    dark = _post(server, "/chest_xray/predict", png(10))
    assert dark.status_code == 200
    body = dark.json()
    assert body["model"] == "chest_xray" and body["version"] == "2"  # the latest version
    assert body["label"] == "pneumonia" and body["threshold"] == 0.5 and body["confidence"] > 0.99
    assert _post(server, "/chest_xray/predict", png(245)).json()["label"] == "normal"

    red = _post(server, "/rgb/predict", png((250, 10, 10), mode="RGB")).json()
    assert red == {"model": "rgb", "version": "1", "label": "red", "confidence": pytest.approx(1.0, abs=1e-3)}

    proba = _post(server, "/chest_xray/proba", png(128)).json()
    assert proba["model"] == "chest_xray" and set(proba["probabilities"]) == {"normal", "pneumonia"}
    assert sum(proba["probabilities"].values()) == pytest.approx(1.0)


@pytest.mark.slow
def test_batch_routes_answer_each_image_in_order(server: Server, png: PNG) -> None:
    """Several `image` parts in one request: one result per image, as the single-image routes answer, in order;
    a bad image gets its own error and its neighbours are still answered."""
    uploads = [
        ("image", ("dark.png", png(10), "image/png")),
        ("image", ("broken.png", b"not an image", "image/png")),
        ("image", ("light.png", png(245), "image/png")),
    ]
    before = _batch_histogram(server, "chest_xray")
    response = httpx.post(server.url + "/chest_xray/predict/batch", files=uploads, timeout=30)
    after = _batch_histogram(server, "chest_xray")
    assert response.status_code == 200, response.text
    images_run, calls, _ = (now - then for now, then in zip(after, before, strict=True))
    assert (images_run, calls) == (2, 1)  # the two good images ran as one batch
    body = response.json()
    assert (body["model"], body["version"], body["threshold"]) == ("chest_xray", "2", 0.5)
    dark, broken, light = body["results"]
    single = _post(server, "/chest_xray/predict", png(10)).json()
    assert dark == {"filename": "dark.png", "label": single["label"], "confidence": pytest.approx(single["confidence"])}
    assert broken["filename"] == "broken.png" and broken["error"]["code"] == "invalid_image"
    assert light["label"] == "normal"

    proba = httpx.post(server.url + "/rgb/proba/batch", files=uploads[:1] * 3, timeout=30).json()
    assert [result["filename"] for result in proba["results"]] == ["dark.png"] * 3 and "threshold" not in proba
    assert all(sum(result["probabilities"].values()) == pytest.approx(1.0) for result in proba["results"])

    too_many = httpx.post(server.url + "/rgb/proba/batch", files=uploads[:1] * 65, timeout=30)
    assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "invalid_multipart"
    assert "64" in too_many.json()["error"]["message"]
    text_field = {"data": {"image": "text"}, "files": {"other": ("a.png", png(0), "image/png")}}
    for route, status, code in [
        ("/chest_xray/predict/batch", 400, "missing_image"),
        ("/nope/proba/batch", 404, "unknown_model"),
        ("/mnist_autoencoder/predict/batch", 404, "unknown_model"),
    ]:
        response = httpx.post(server.url + route, timeout=30, **text_field)  # type: ignore[arg-type]
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), route


@pytest.mark.slow
def test_models_listing(server: Server) -> None:
    models = {model["name"]: model for model in httpx.get(server.url + "/models").json()["models"]}
    assert set(models) == {"chest_xray", "mnist_autoencoder", "rgb", "tampered"}
    chest = models["chest_xray"]
    assert (chest["version"], chest["status"], chest["provider"]) == ("2", "ready", "CPUExecutionProvider")
    assert chest["card"]["classes"] == ["normal", "pneumonia"] and chest["card"]["threshold"] == 0.5
    assert chest["card"]["input"]["channels"] == 1 and chest["card"]["metrics"]
    tampered = models["tampered"]
    assert tampered["status"] == "unavailable" and "sha256" in tampered["reason"] and "/" not in tampered["reason"]


@pytest.mark.slow
def test_autoencoder_routes(server: Server, png: PNG) -> None:
    digit = png(0, size=(28, 28))
    reconstruction = _post(server, "/mnist/reconstruct", digit)
    assert reconstruction.status_code == 200 and reconstruction.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(reconstruction.content))
    assert image.size == (28, 28) and image.mode == "L"
    for route in ("/mnist/encode", "/mnist_autoencoder/encode"):
        body = _post(server, route, digit).json()
        assert body["model"] == "mnist_autoencoder" and body["version"] == "1" and len(body["code"]) == 30
    assert _post(server, "/chest_xray/reconstruct", digit).status_code == 404
    assert _post(server, "/mnist/predict", digit).status_code == 404


@pytest.mark.slow
def test_accepts_common_image_variants(server: Server) -> None:
    gradient = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))
    rotated = Image.fromarray(gradient).convert("RGB")
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° on display
    uploads = {
        "jpeg-rgb": (_encoded(rotated, "JPEG"), "image/jpeg"),
        "jpeg-exif": (_encoded(rotated, "JPEG", exif=exif), "image/jpeg"),
        "png-16bit": (_encoded(Image.fromarray(gradient.astype(np.uint16) * 257), "PNG"), "image/png"),
        "png-rgba": (_encoded(rotated.convert("RGBA"), "PNG"), "image/png"),
        "png-declared-as-jpeg": (_encoded(rotated, "PNG"), "image/jpeg"),
    }
    for name, (data, content_type) in uploads.items():
        response = _post(server, "/chest_xray/predict", data, content_type)
        assert response.status_code == 200, (name, response.text)


def _chunks(data: bytes, size: int = 65536) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def _multipart(field: str, data: bytes) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x", files={field: ("upload.png", data, "image/png")})
    return request.read(), request.headers["content-type"]


def _bad_requests(png: PNG) -> dict[str, tuple[dict[str, object], str, int, str]]:
    """name → (httpx request arguments, path, expected status, expected error code)."""
    valid = png(0)
    noisy = _encoded(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)), "PNG")
    bomb = png(0, size=(2000, 2000))  # 4 Mpx, a few kB compressed; the test server allows 1 Mpx
    oversized, multipart_type = _multipart("image", b"\0" * 1_200_000)
    return {
        "not-an-image": (
            {"files": {"image": ("a.png", b"hello world", "image/png")}},
            "chest_xray",
            422,
            "invalid_image",
        ),
        "empty-upload": (
            {"files": {"image": ("a.png", b"", "image/png")}},
            "chest_xray",
            422,
            "invalid_image",
        ),
        "truncated": (
            {"files": {"image": ("a.png", noisy[: len(noisy) // 2], "image/png")}},
            "chest_xray",
            422,
            "invalid_image",
        ),
        "missing-field": (
            {"files": {"picture": ("a.png", valid, "image/png")}},
            "chest_xray",
            400,
            "missing_image",
        ),
        "text-field": (
            {"data": {"image": "not a file"}, "files": {"other": ("a.png", valid, "image/png")}},
            "chest_xray",
            400,
            "missing_image",
        ),
        "not-multipart": ({"json": {"image": "x"}}, "chest_xray", 415, "unsupported_media_type"),
        "unknown-model": (
            {"files": {"image": ("a.png", valid, "image/png")}},
            "no_such_model",
            404,
            "unknown_model",
        ),
        "path-traversal": (
            {"files": {"image": ("a.png", valid, "image/png")}},
            "%2E%2E",  # arrives as the model name "..": looked up, never joined to a path
            404,
            "unknown_model",
        ),
        "unavailable-model": (
            {"files": {"image": ("a.png", valid, "image/png")}},
            "tampered",
            503,
            "model_unavailable",
        ),
        "decompression-bomb": (
            {"files": {"image": ("a.png", bomb, "image/png")}},
            "chest_xray",
            413,
            "too_many_pixels",
        ),
        "body-over-limit": (
            {"content": oversized, "headers": {"content-type": multipart_type}},
            "chest_xray",
            413,
            "payload_too_large",
        ),
        "chunked-body-over-limit": (
            {"content": _chunks(oversized), "headers": {"content-type": multipart_type}},
            "chest_xray",
            413,
            "payload_too_large",
        ),
    }


@pytest.mark.slow
def test_bad_inputs_get_4xx_json_and_the_service_keeps_serving(server: Server, png: PNG) -> None:
    for name, (arguments, model, status, code) in _bad_requests(png).items():
        response = httpx.post(f"{server.url}/{model}/predict", timeout=30, **arguments)  # type: ignore[arg-type]
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert error["code"] == code, name
        assert "Traceback" not in error["message"] and str(REPO_ROOT) not in error["message"], name
    assert httpx.get(server.url + "/livez").status_code == 200
    assert httpx.get(server.url + "/readyz").status_code == 200
    assert _post(server, "/chest_xray/predict", png(0)).status_code == 200


def _series(text: str, name: str, model: str) -> float:
    """One series of /metrics for one model (`imageai_model_batch_size_sum`, …); 0 when not exported yet."""
    match = re.search(rf'^{name}\{{(?:le="[^"]*",)?model="{model}"\}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _batch_histogram(server: Server, model: str) -> tuple[float, float, float]:
    """(images, onnxruntime calls, calls with a single image) so far for one model, from /metrics."""
    text = httpx.get(server.url + "/metrics").text
    histogram = "imageai_model_batch_size"
    single = re.search(rf'^{histogram}_bucket{{le="1.0",model="{model}"}} (\S+)$', text, re.MULTILINE)
    return (
        _series(text, f"{histogram}_sum", model),
        _series(text, f"{histogram}_count", model),
        float(single.group(1)) if single else 0.0,
    )


STAGES = ("imageai_preprocess_seconds", "imageai_queue_seconds", "imageai_inference_seconds")


def _stage_seconds(server: Server, model: str) -> dict[str, tuple[float, float]]:
    """(seconds, observations) so far of each stage histogram for one model, from /metrics."""
    text = httpx.get(server.url + "/metrics").text
    return {stage: (_series(text, f"{stage}_sum", model), _series(text, f"{stage}_count", model)) for stage in STAGES}


@pytest.mark.slow
def test_metrics_say_where_a_request_spent_its_time(server: Server, png: PNG) -> None:
    before = _stage_seconds(server, "chest_xray")
    started = time.perf_counter()
    assert _post(server, "/chest_xray/predict", png(3)).status_code == 200
    elapsed = time.perf_counter() - started
    after = _stage_seconds(server, "chest_xray")
    seconds = {stage: after[stage][0] - before[stage][0] for stage in STAGES}
    print({stage: f"{value * 1000:.2f} ms" for stage, value in seconds.items()}, f"of {elapsed * 1000:.2f} ms")
    assert all(after[stage][1] - before[stage][1] == 1 for stage in STAGES)  # one observation each
    assert seconds["imageai_preprocess_seconds"] > 0 and seconds["imageai_inference_seconds"] > 0
    assert sum(seconds.values()) < elapsed  # stages of this request, inside its latency


@pytest.mark.slow
def test_concurrent_requests_run_as_one_batch(server: Server, png: PNG) -> None:
    images = [_encoded(Image.new("L", (256, 256), shade), "PNG") for shade in range(0, 256, 8)]

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            responses = await asyncio.gather(
                *(client.post("/chest_xray/predict", files={"image": ("a.png", data, "image/png")}) for data in images)
            )
        return [response.status_code for response in responses]

    before = _batch_histogram(server, "chest_xray")
    assert asyncio.run(burst()) == [200] * len(images)
    after = _batch_histogram(server, "chest_xray")
    images_run, calls, singles = (now - then for now, then in zip(after, before, strict=True))
    print(f"{len(images)} concurrent requests: {calls:.0f} onnxruntime calls, {singles:.0f} of a single image")
    assert images_run == len(images)
    assert calls < len(images) and singles < calls  # at least one call ran several images


@pytest.mark.slow
def test_strict_readiness_with_a_refused_model(model_repository: Path, tmp_path: Path, png: PNG) -> None:
    # readiness is strict by default, and `tampered` fails its sha256 check
    strict = start_server(model_repository, tmp_path)
    try:
        strict.wait("/livez")
        strict.wait_for_log("warm-up done")
        assert httpx.get(strict.url + "/readyz").status_code == 503
        assert _post(strict, "/chest_xray/predict", png(0)).status_code == 200
        assert _post(strict, "/tampered/predict", png(0)).status_code == 503
    finally:
        strict.stop()
    log = strict.log.read_text()
    assert "model tampered is UNAVAILABLE: sha256" in log and str(model_repository / "tampered") in log


class _TraceSink(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP collector that keeps what it is sent."""

    received: list[tuple[str, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.received.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@pytest.mark.slow
def test_traces_reach_an_otlp_collector_when_an_endpoint_is_set(
    model_repository: Path, tmp_path: Path, png: PNG, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TraceSink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")  # export spans every 0.2 s instead of 5
    endpoint = f"http://127.0.0.1:{sink.server_address[1]}/v1/traces"
    traced = start_server(model_repository, tmp_path, readiness="lenient", tracing_endpoint=endpoint)
    try:
        traced.wait("/readyz")
        assert _post(traced, "/chest_xray/predict", png(0)).status_code == 200
        deadline = time.monotonic() + 30
        while not any(b"/chest_xray/predict" in body for _, body in _TraceSink.received):
            assert time.monotonic() < deadline, f"no span of the request reached the collector: {_TraceSink.received}"
            time.sleep(0.2)
    finally:
        traced.stop()
        sink.shutdown()
    assert {path for path, _ in _TraceSink.received} == {"/v1/traces"}


@pytest.mark.slow
def test_the_access_log_can_be_turned_off(server: Server, model_repository: Path, tmp_path: Path, png: PNG) -> None:
    """IMAGEAI_ACCESS_LOG reaches BentoML: on by default (the shared server), off here; the metrics stay."""
    assert _post(server, "/chest_xray/predict", png(0)).status_code == 200
    server.wait_for_log("path=/chest_xray/predict")
    quiet = start_server(model_repository, tmp_path, readiness="lenient", access_log="false")
    try:
        quiet.wait("/readyz")
        assert _post(quiet, "/chest_xray/predict", png(0)).status_code == 200
        metrics = httpx.get(quiet.url + "/metrics").text
    finally:
        quiet.stop()
    assert 'bentoml_service_request_total{endpoint="/chest_xray/predict"' in metrics
    assert "path=/chest_xray/predict" not in quiet.log.read_text()


@pytest.mark.slow
def test_bentoml_build_makes_a_bento_without_torch(tmp_path: Path) -> None:
    env = {**os.environ, "BENTOML_HOME": str(tmp_path), "BENTOML_DO_NOT_TRACK": "true"}
    subprocess.run([str(BIN / "bentoml"), "build", REPO_ROOT], cwd=REPO_ROOT, env=env, check=True, capture_output=True)
    [bento] = (tmp_path / "bentos" / "imageai").glob("*/bento.yaml")
    requirements = (bento.parent / "env" / "python" / "requirements.txt").read_text().lower()
    assert "onnxruntime" in requirements and "bentoml" in requirements
    assert "torch" not in requirements
    source = bento.parent / "src"
    assert (source / "serving" / "service.py").is_file() and (source / "contract" / "preprocessing.py").is_file()
    assert (source / "serving" / "static" / "ui.html").is_file() and "pydicom" in requirements  # the page, DICOM
    assert not list(source.rglob("*.pt")) and not (source / "training").exists() and not (source / "tests").exists()
    # the container runs as BentoML's unprivileged user: the last USER line of the generated Dockerfile
    dockerfile = (bento.parent / "env" / "docker" / "Dockerfile").read_text()
    assert re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)[-1] == "bentoml"


def test_the_public_routes_are_the_same_in_every_list() -> None:
    """The routes, the OpenAPI document, the metrics labels and the load test's mix name the same model actions."""
    from load_tests.targets import ROUTES as LOAD_TEST_ROUTES
    from serving.metrics_labels import PUBLIC_ACTIONS
    from serving.openapi import openapi_document
    from serving.repository import ModelRepository
    from serving.routes import ROUTES

    routed = {route.path for route in ROUTES if route.path.startswith(("/{model}/", "/{name}/"))}
    documented = {path for path in openapi_document(ModelRepository([]))["paths"] if path.startswith("/{")}
    assert routed == documented
    assert {path.split("}/", 1)[1] for path in routed} == set(PUBLIC_ACTIONS)
    load_tested = {action for kind in LOAD_TEST_ROUTES.values() for action, _, _ in kind}
    assert load_tested <= set(PUBLIC_ACTIONS), "the load test calls a route that does not exist"
