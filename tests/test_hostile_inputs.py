"""Hostile and odd inputs against every kind of model and endpoint: a valid image gets an answer, anything else the
intended 4xx with a JSON error naming the problem; never a 5xx, a stack trace or a file path; the service stays
healthy and correct. One shared server (conftest `server`: 1 MB body and 1 Mpx limits)."""

from __future__ import annotations

import io
import re
import socket
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import REPO_ROOT, Server
from PIL import Image

pytestmark = pytest.mark.slow

# (model or alias, action): a gray binary classifier, an RGB 3-class classifier, a gray autoencoder
ENDPOINTS = [
    ("chest_xray", "predict"),
    ("chest_xray", "proba"),
    ("rgb", "predict"),
    ("rgb", "proba"),
    ("mnist", "reconstruct"),
    ("mnist_autoencoder", "encode"),
]


def encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _noise(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    channels = {"L": (), "RGB": (3,), "RGBA": (4,)}[mode]
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], *channels), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 60-byte PNG whose header claims width x height 8-bit gray pixels (10 Gpx by default)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def jpeg_bomb(side: int = 65_000) -> bytes:
    """A JPEG whose frame header claims side x side pixels (4.2 Gpx)."""
    frame = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, side, side, 1) + bytes([1, 0x11, 0])
    scan = b"\xff\xda" + struct.pack(">HB", 8, 1) + bytes([1, 0, 0, 63, 0])
    return b"\xff\xd8" + frame + scan + b"\0" * 64 + b"\xff\xd9"


def _exif_rotated_jpeg() -> bytes:
    image = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (24, 1))).convert("RGB")
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° on display
    return encoded(image, "JPEG", exif=exif)


def _palette_with_transparency() -> bytes:
    image = _noise((32, 32)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encoded(image, "PNG", transparency=0)


def _file(data: bytes, name: str = "upload", content_type: str = "image/png") -> dict[str, Any]:
    return {"files": {"image": (name, data, content_type)}}


def _raw_multipart(body: bytes, content_type: str) -> dict[str, Any]:
    return {"content": body, "headers": {"content-type": content_type}}


def _oversized_multipart() -> dict[str, Any]:
    request = httpx.Request("POST", "http://x", files={"image": ("big.png", b"\0" * 1_200_000, "image/png")})
    return _raw_multipart(request.read(), request.headers["content-type"])


_VALID_PNG = encoded(_noise((40, 30)), "PNG")
_NOISY_PNG = encoded(_noise((64, 64)), "PNG")
_NOISY_JPEG = encoded(_noise((64, 64)), "JPEG")

# case → (request arguments, expected status, expected error code or None for an answer)
CASES: dict[str, tuple[Callable[[], dict[str, Any]], int, str | None]] = {
    "png-rgb": (lambda: _file(_VALID_PNG), 200, None),
    "jpeg-rgb": (lambda: _file(_NOISY_JPEG, content_type="image/jpeg"), 200, None),
    "png-gray-16bit": (lambda: _file(encoded(Image.fromarray(np.full((20, 20), 40000, np.uint16)), "PNG")), 200, None),
    "png-rgba": (lambda: _file(encoded(_noise((24, 24), "RGBA"), "PNG")), 200, None),
    "png-palette": (lambda: _file(encoded(_noise((24, 24)).convert("P"), "PNG")), 200, None),
    "png-palette-transparent": (lambda: _file(_palette_with_transparency()), 200, None),
    "jpeg-cmyk": (lambda: _file(encoded(Image.new("CMYK", (20, 10), (0, 80, 160, 10)), "JPEG")), 200, None),
    "jpeg-exif-rotated": (lambda: _file(_exif_rotated_jpeg(), content_type="image/jpeg"), 200, None),
    "png-1x1": (lambda: _file(encoded(Image.new("L", (1, 1), 7), "PNG")), 200, None),
    "png-4000x2": (lambda: _file(encoded(Image.new("RGB", (4000, 2), (9, 99, 199)), "PNG")), 200, None),
    "png-declared-as-jpeg": (lambda: _file(_VALID_PNG, content_type="image/jpeg"), 200, None),
    "not-an-image": (lambda: _file(b"%PDF-1.7 definitely not pixels" * 10), 422, "invalid_image"),
    "gif": (lambda: _file(encoded(Image.new("RGB", (8, 8)), "GIF")), 422, "invalid_image"),
    "empty-file": (lambda: _file(b""), 422, "invalid_image"),
    "png-truncated": (lambda: _file(_NOISY_PNG[: len(_NOISY_PNG) // 2]), 422, "invalid_image"),
    "jpeg-truncated": (lambda: _file(_NOISY_JPEG[: len(_NOISY_JPEG) // 2]), 422, "invalid_image"),
    "png-header-only": (lambda: _file(_NOISY_PNG[:40]), 422, "invalid_image"),
    "png-bomb-10-gigapixels": (lambda: _file(png_bomb()), 413, "too_many_pixels"),
    "jpeg-bomb-4-gigapixels": (lambda: _file(jpeg_bomb()), 413, "too_many_pixels"),
    "png-over-pixel-limit": (lambda: _file(encoded(Image.new("L", (1200, 1000)), "PNG")), 413, "too_many_pixels"),
    "body-over-size-limit": (_oversized_multipart, 413, "payload_too_large"),
    "missing-image-field": (lambda: {"files": {"picture": ("a.png", _VALID_PNG, "image/png")}}, 400, "missing_image"),
    "image-as-text-field": (
        lambda: {"data": {"image": "iVBORw0KGgo="}, "files": {"other": ("a.png", _VALID_PNG, "image/png")}},
        400,
        "missing_image",
    ),
    "json-body": (lambda: {"json": {"image": "iVBORw0KGgo="}}, 415, "unsupported_media_type"),
    "octet-stream-body": (
        lambda: {"content": _VALID_PNG, "headers": {"content-type": "application/octet-stream"}},
        415,
        "unsupported_media_type",
    ),
    "no-content-type": (lambda: {"content": _VALID_PNG}, 415, "unsupported_media_type"),
    "multipart-without-boundary": (
        lambda: _raw_multipart(b"--x\r\n\r\n", "multipart/form-data"),
        400,
        "invalid_multipart",
    ),
    "multipart-garbage": (
        lambda: _raw_multipart(b"\x00\xff garbage without any boundary \r\n\r\n", "multipart/form-data; boundary=abc"),
        400,
        None,  # invalid_multipart or missing_image, depending on how far the parser gets
    ),
    "multipart-unterminated": (
        lambda: _raw_multipart(
            b'--abc\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n' + _VALID_PNG,
            "multipart/form-data; boundary=abc",
        ),
        400,
        None,
    ),
    "too-many-files": (
        lambda: {"files": [("image", (f"{i}.png", _VALID_PNG, "image/png")) for i in range(6)]},
        400,
        "invalid_multipart",
    ),
}

FORBIDDEN_IN_MESSAGES = re.compile(r"Traceback|File \"|site-packages|/work/|/tmp/|/home/|\.py\b")


def assert_clean_error(response: httpx.Response, status: int, code: str | None) -> dict[str, Any]:
    """The intended status, JSON {error: {code, message}} and nothing that leaks the server's insides."""
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert set(error) == {"code", "message"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    assert not FORBIDDEN_IN_MESSAGES.search(error["message"]), error["message"]
    assert str(REPO_ROOT) not in response.text
    return error


def assert_answer(response: httpx.Response, model: str, action: str) -> None:
    assert response.status_code == 200, response.text[:500]
    if action == "reconstruct":
        assert response.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(response.content)).size == (28, 28)
        return
    body = response.json()
    if action == "predict":
        assert 0.0 <= body["confidence"] <= 1.0 and isinstance(body["label"], str)
    elif action == "proba":
        assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    else:
        assert len(body["code"]) == 30 and all(np.isfinite(body["code"]))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(("model", "action"), ENDPOINTS, ids=[f"{m}-{a}" for m, a in ENDPOINTS])
def test_hostile_input(server: Server, model: str, action: str, case: str) -> None:
    arguments, status, code = CASES[case]
    started = time.monotonic()
    response = httpx.post(f"{server.url}/{model}/{action}", timeout=30, **arguments())
    elapsed = time.monotonic() - started
    if status == 200:
        assert_answer(response, model, action)
    else:
        assert_clean_error(response, status, code)
        assert elapsed < 5, f"a refusal took {elapsed:.1f} s"


@pytest.mark.parametrize(("model", "action"), ENDPOINTS, ids=[f"{m}-{a}" for m, a in ENDPOINTS])
def test_unknown_and_unavailable_models(server: Server, model: str, action: str) -> None:
    response = httpx.post(f"{server.url}/no_such_model/{action}", timeout=30, **_file(_VALID_PNG))
    error = assert_clean_error(response, 404, "unknown_model")
    assert "no_such_model" in error["message"]
    unavailable = httpx.post(f"{server.url}/tampered/{action}", timeout=30, **_file(_VALID_PNG))
    if action in ("predict", "proba") or unavailable.status_code == 503:
        error = assert_clean_error(unavailable, 503, "model_unavailable")
        assert "tampered" in error["message"] and "sha256" in error["message"]
    else:
        assert_clean_error(unavailable, 404, "unknown_model")


def raw_request(server: Server, head: str, body: bytes = b"", read_timeout: float = 10.0) -> tuple[int, bytes, float]:
    """Send bytes exactly as given (no client-side path normalisation); (status, response body, seconds)."""
    host, port = server.url.removeprefix("http://").split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=read_timeout) as sock:
        sock.sendall(head.encode("latin-1") + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < _expected_length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2], time.monotonic() - started


def _expected_length(data: bytes) -> int:
    head, _, _ = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    return len(head) + 4 + int(match.group(1)) if match else 0


def test_declared_oversized_body_is_refused_before_it_is_sent(server: Server) -> None:
    """Content-Length of 10 GB and no body at all: the answer comes at once, nothing waits for the upload."""
    head = (
        "POST /chest_xray/predict HTTP/1.1\r\nHost: test\r\n"
        "Content-Type: multipart/form-data; boundary=abc\r\nContent-Length: 10000000000\r\n\r\n"
    )
    status, body, seconds = raw_request(server, head)
    assert status == 413 and b"payload_too_large" in body
    assert seconds < 2


TRAVERSALS = [
    "..",
    "%2e%2e",
    "%2E%2E",
    ".",
    "..%2f..%2fetc%2fpasswd",
    "%2e%2e%2f%2e%2e%2fmodels",
    "..%5c..%5cwindows",
    "chest_xray%2f..%2f..%2ftampered",
    "%252e%252e",
    "chest_xray%00",
    "~",
    "a" * 5000,
]


@pytest.mark.parametrize("name", TRAVERSALS, ids=lambda name: name[:24])
@pytest.mark.parametrize("action", ["predict", "reconstruct"])
def test_model_names_never_touch_the_filesystem(server: Server, name: str, action: str) -> None:
    body = (
        b'--abc\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + _VALID_PNG + b"\r\n--abc--\r\n"
    )
    head = (
        f"POST /{name}/{action} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
        f"Content-Type: multipart/form-data; boundary=abc\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    status, answer, _ = raw_request(server, head, body)
    assert status in (400, 404), answer[:300]  # 400: h11 refuses some raw bytes in the request line
    assert b"root:" not in answer and b"onnx" not in answer.lower()
    if answer.startswith(b"{"):
        assert b"unknown_model" in answer or b"not_found" in answer
        assert not FORBIDDEN_IN_MESSAGES.search(answer.decode("utf-8", "replace"))


def test_errors_from_routing_are_json_and_leak_nothing(server: Server) -> None:
    response = httpx.get(f"{server.url}/chest_xray/predict", timeout=10)
    assert_clean_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"
    response = httpx.put(f"{server.url}/models", timeout=10)
    assert response.status_code == 405


def test_serving_code_never_unpickles() -> None:
    """Models are ONNX protobuf and cards JSON: nothing in serving/ or contract/ may deserialise pickles."""
    unpickling = re.compile(
        r"^\s*(import|from)\s+(pickle|cPickle|_pickle|joblib|dill|cloudpickle|shelve|marshal)\b"
        r"|\b(pickle|joblib|dill|cloudpickle|torch)\.loads?\b|allow_pickle\s*=\s*True|\bjsonpickle\b",
        re.MULTILINE,
    )
    files = [path for folder in ("serving", "contract") for path in (REPO_ROOT / folder).rglob("*.py")]
    assert files
    offenders = [str(path.relative_to(REPO_ROOT)) for path in files if unpickling.search(path.read_text())]
    assert offenders == []


def test_the_service_is_healthy_and_correct_afterwards(server: Server, png: Callable[..., bytes]) -> None:
    """Runs after the matrix above (pytest keeps the order of a module)."""
    assert httpx.get(server.url + "/livez").status_code == 200
    assert httpx.get(server.url + "/readyz").status_code == 200
    dark = httpx.post(server.url + "/chest_xray/predict", **_file(png(10)), timeout=30).json()
    assert dark["label"] == "pneumonia" and dark["confidence"] > 0.99
    assert httpx.post(server.url + "/chest_xray/predict", **_file(png(245)), timeout=30).json()["label"] == "normal"
    red = httpx.post(server.url + "/rgb/predict", **_file(png((250, 10, 10), mode="RGB")), timeout=30).json()
    assert red["label"] == "red"
    assert "unexpected error on" not in Path(server.log).read_text()  # what a 500 logs
    assert server_errors(server) == {}


def server_errors(server: Server) -> dict[str, float]:
    """{'endpoint status': count} of the 5xx answers other than 503 so far, from BentoML's request counter."""
    errors = {}
    text = httpx.get(server.url + "/metrics").text
    for labels, value in re.findall(r"^bentoml_service_request_total\{(.*)\} (\S+)$", text, re.MULTILINE):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        status = fields.get("http_response_code", "")
        if status.startswith("5") and status != "503" and float(value) > 0:
            errors[f"{fields.get('endpoint')} {status}"] = float(value)
    return errors
