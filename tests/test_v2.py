"""The Open Inference Protocol v2 routes, driven by the real Triton client (tritonclient[http]) and by raw HTTP."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import Server
from test_serving import _batch_histogram

from contract.card import ModelCard
from contract.preprocessing import preprocess

PNG = Callable[..., bytes]


def _client(server: Server):
    import tritonclient.http as triton

    return triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=30)


def _served_card(model_repository: Path, name: str) -> ModelCard:
    """The card of the version the test server serves: the highest."""
    return ModelCard.load(max((model_repository / name).iterdir(), key=lambda folder: int(folder.name)))


def _proba(server: Server, model: str, image: bytes, classes: list[str]) -> np.ndarray:
    answer = httpx.post(f"{server.url}/{model}/proba", files={"image": ("a.png", image, "image/png")}, timeout=30)
    assert answer.status_code == 200, answer.text
    return np.array([answer.json()["probabilities"][name] for name in classes], dtype=np.float32)


@pytest.mark.slow
def test_triton_client_health_metadata_and_infer_equal_proba(server: Server, model_repository: Path, png: PNG) -> None:
    import tritonclient.http as triton

    client = _client(server)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("chest_xray") and client.is_model_ready("mnist_autoencoder")
    assert not client.is_model_ready("tampered") and not client.is_model_ready("nope")
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data", "model_configuration"]
    metadata = client.get_model_metadata("chest_xray")
    assert metadata["versions"] == ["2"] and metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 16, 16]}]
    assert metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}]
    assert client.get_model_metadata("chest_xray", model_version="2") == metadata
    config = client.get_model_config("chest_xray")  # what perf_analyzer reads besides the metadata
    assert config["max_batch_size"] == 32 and config["input"] == [{"name": "input", "data_type": "TYPE_FP32",
                                                                   "dims": [1, 16, 16]}]  # fmt: skip

    card = _served_card(model_repository, "chest_xray")
    image = png(60)  # mid-dark grey: neither probability is 0 or 1
    tensor = preprocess(image, card.input)[None]
    expected = _proba(server, "chest_xray", image, card.classes)
    for binary in (True, False):  # the binary tensor extension (the client's default) and plain JSON
        given = triton.InferInput("input", list(tensor.shape), "FP32")
        given.set_data_from_numpy(tensor, binary_data=binary)
        wanted = triton.InferRequestedOutput("probabilities", binary_data=binary)
        result = client.infer("chest_xray", [given], outputs=[wanted], request_id="r1")
        probabilities = result.as_numpy("probabilities")
        print(f"binary={binary}: v2 infer {probabilities[0].tolist()}  POST /proba {expected.tolist()}")
        assert probabilities.shape == (1, 2) and probabilities.dtype == np.float32
        np.testing.assert_allclose(probabilities[0], expected, rtol=0, atol=1e-6)
        assert result.get_response()["model_version"] == "2" and result.get_response()["id"] == "r1"


@pytest.mark.slow
def test_a_v2_batch_shares_the_batcher_and_matches_proba(server: Server, model_repository: Path, png: PNG) -> None:
    import tritonclient.http as triton

    card = _served_card(model_repository, "chest_xray")
    images = [png(shade) for shade in (20, 90, 200)]
    batch = np.stack([preprocess(image, card.input) for image in images])
    given = triton.InferInput("input", list(batch.shape), "FP32")
    given.set_data_from_numpy(batch)
    before = _batch_histogram(server, "chest_xray")
    probabilities = _client(server).infer("chest_xray", [given]).as_numpy("probabilities")  # outputs: all, binary
    after = _batch_histogram(server, "chest_xray")
    images_run, calls, _ = (now - then for now, then in zip(after, before, strict=True))
    assert images_run == len(images) and calls < len(images)  # through the route's batcher, not one call each
    for row, image in zip(probabilities, images, strict=True):
        np.testing.assert_allclose(row, _proba(server, "chest_xray", image, card.classes), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_autoencoder_outputs_and_output_selection(server: Server, model_repository: Path, png: PNG) -> None:
    import tritonclient.http as triton

    client = _client(server)
    metadata = client.get_model_metadata("mnist_autoencoder")
    assert [(o["name"], o["shape"]) for o in metadata["outputs"]] == [("reconstruction", [-1, 1, 28, 28]),
                                                                     ("code", [-1, 30])]  # fmt: skip
    card = _served_card(model_repository, "mnist_autoencoder")
    image = png(255, size=(28, 28))
    given = triton.InferInput("input", [1, 1, 28, 28], "FP32")
    given.set_data_from_numpy(preprocess(image, card.input)[None], binary_data=False)
    result = client.infer("mnist_autoencoder", [given], outputs=[triton.InferRequestedOutput("code")])
    assert result.as_numpy("reconstruction") is None and result.as_numpy("code").shape == (1, 30)
    encoded = httpx.post(server.url + "/mnist/encode", files={"image": ("a.png", image, "image/png")}).json()
    np.testing.assert_allclose(result.as_numpy("code")[0], encoded["code"], rtol=0, atol=1e-6)
    both = client.infer("mnist_autoencoder", [given])
    assert both.as_numpy("reconstruction").shape == (1, 1, 28, 28)


def _infer(server: Server, body: object, model: str = "chest_xray", **headers: str | bytes) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}/v2/models/{model}/infer", content=content, headers=headers, timeout=30)


def _request(data: object = None, shape: list[int] | None = None, **tensor: object) -> dict:
    shape = [1, 1, 16, 16] if shape is None else shape
    values = [0.5] * int(np.prod(shape)) if data is None else data
    return {"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": values, **tensor}]}


@pytest.mark.slow
def test_bad_requests_get_4xx_in_the_protocol_error_shape(server: Server) -> None:
    binary = np.zeros((1, 1, 16, 16), "<f4").tobytes()
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 16, 16], "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(binary)}}]}).encode()  # fmt: skip
    cases: list[tuple[int, httpx.Response]] = [
        (404, httpx.get(server.url + "/v2/models/nope")),
        (404, httpx.get(server.url + "/v2/models/chest_xray/versions/9")),
        (404, httpx.get(server.url + "/v2/nothing/here")),
        (405, httpx.get(server.url + "/v2/models/chest_xray/infer")),
        (404, _infer(server, _request(), model="nope")),
        (503, _infer(server, _request(), model="tampered")),  # loaded but refused at startup (sha256)
        (400, _infer(server, b"{not json")),
        (400, _infer(server, {"inputs": []})),
        (400, _infer(server, _request(datatype="INT64"))),
        (400, _infer(server, _request(name="pixels"))),
        (400, _infer(server, _request(shape=[1, 3, 16, 16]))),
        (400, _infer(server, _request(shape=[0, 1, 16, 16], data=[]))),
        (400, _infer(server, _request(shape=[33, 1, 16, 16]))),  # over IMAGEAI_MAX_BATCH_SIZE (32)
        (400, _infer(server, _request(data=[0.5] * 255))),
        (400, _infer(server, _request(data=["a"] * 256))),
        (400, _infer(server, _request(data=[[0.5] * 16] * 15 + [[0.5] * 15]))),  # ragged
        (400, _infer(server, json.dumps(_request()).replace("0.5", "1e999", 1).encode())),  # infinite
        (400, _infer(server, {**_request(), "outputs": [{"name": "logits"}]})),
        (400, _infer(server, header + binary[:-4], **{"Inference-Header-Content-Length": str(len(header))})),
        (400, _infer(server, header + binary, **{"Inference-Header-Content-Length": "x"})),
        (400, _infer(server, header + binary, **{"Inference-Header-Content-Length": b"\xb2"})),  # "²": isdigit()
        (415, _infer(server, gzip.compress(json.dumps(_request()).encode()), **{"Content-Encoding": "gzip"})),
        (413, _infer(server, _request(shape=[32, 1, 16, 16], data=[0.123456789] * (32 * 256 * 12)))),
    ]
    for status, answer in cases:
        assert (answer.status_code, type(answer.json().get("error"))) == (status, str), answer.text
    ok = _infer(server, header + binary, **{"Inference-Header-Content-Length": str(len(header))})
    assert ok.status_code == 200 and ok.json()["outputs"][0]["shape"] == [1, 2]
    nested = _infer(server, _request(data=[[[[0.5] * 16] * 16]]))
    assert nested.status_code == 200 and len(nested.json()["outputs"][0]["data"]) == 2
    assert httpx.get(server.url + "/readyz").status_code == 200  # still serving
