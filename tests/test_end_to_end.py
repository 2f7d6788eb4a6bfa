"""Trained models served over real HTTP: the service answers exactly what training's evaluation computed."""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from contract.card import ModelCard
from tests.conftest import Server, start_server
from tests.tiny_tasks import TINY, Trained
from training.architectures import create_model
from training.architectures.autoencoder import CodeClassifier
from training.data import load_dataset
from training.engine import predict
from training.mirror import MirrorAveraged
from training.tasks import get_task


@pytest.fixture(scope="module")
def served(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(trained.models, tmp_path_factory.mktemp("e2e"))
    try:
        server.wait("/readyz", timeout=180)
        yield server
    finally:
        server.stop()


def _training_probabilities(task: str, trained: Trained) -> tuple[list[bytes], np.ndarray, ModelCard]:
    """What training's evaluation computes for the first test images: cached pixels → contract.normalize → PyTorch;
    and those images as uploads (their files; MNIST's come from IDX files, so PNGs of the same pixels)."""
    card = ModelCard.load(trained.models / task / "1")
    spec = get_task(task).with_overrides(input=card.input)
    test = load_dataset(spec, trained.data[task], seed=0, cache_dir=trained.cache).splits["test"]
    model = create_model(card.training["arch"], in_chans=card.input.channels, num_classes=len(card.classes),
                         image_size=card.input.height, **card.training["arch_options"])  # fmt: skip
    run = next((trained.runs / task).glob("*/best.pt")).parent
    if task == "mnist":  # the classifier on the autoencoder's code; its last stage fine-tunes the encoder too
        model = CodeClassifier(model.encoder, model.decoder[0].in_features, len(card.classes))
        run = run / ("best-finetune.pt" if (run / "best-finetune.pt").exists() else "best.pt")
        uploads = [_png(pixels.reshape(card.input.height, card.input.width)) for pixels in test.pixels[:6]]
    else:
        run = run / "best.pt"
        uploads = [(trained.data[task] / image_id).read_bytes() for image_id in test.ids[:6]]
    model.load_state_dict(torch.load(run, weights_only=True)["state_dict"])
    if card.training["mirror_average"]:  # emotion: the mean of the image's and its mirror image's probabilities
        model = MirrorAveraged(model)
    return uploads, predict(model, test.pixels[:6], spec.input, torch.device("cpu")), card


@pytest.mark.parametrize("task", [*sorted(TINY), "mnist"])
def test_service_probabilities_equal_training_evaluation(task: str, trained: Trained, served: Server) -> None:
    uploads, expected, card = _training_probabilities(task, trained)
    for data, probabilities in zip(uploads, expected, strict=True):
        response = httpx.post(f"{served.url}/{task}/proba", files={"image": ("x", data, "image/png")}, timeout=30)
        assert response.status_code == 200, response.text
        served_probabilities = np.array([response.json()["probabilities"][c] for c in card.classes])
        np.testing.assert_allclose(served_probabilities, probabilities, atol=1e-5)

        predicted = httpx.post(f"{served.url}/{task}/predict", files={"image": ("x", data, "image/png")}, timeout=30)
        body = predicted.json()
        assert body["model"] == task and body["label"] in card.classes
        assert body["confidence"] == pytest.approx(response.json()["probabilities"][body["label"]], abs=1e-6)
        assert ("threshold" in body) == (card.threshold is not None)


@pytest.mark.parametrize("task", [*sorted(TINY), "mnist"])
def test_every_trained_classifier_explains_its_prediction(task: str, trained: Trained, served: Server) -> None:
    card = ModelCard.load(trained.models / task / "1")
    images = sorted(trained.data[task].rglob("*.png"))  # MNIST's data are IDX files: draw a digit instead
    data = images[0].read_bytes() if images else _png(np.pad(np.full((16, 4), 255, np.uint8), ((6, 6), (12, 12))))
    files = {"image": ("x", data, "image/png")}
    explained = httpx.post(f"{served.url}/{task}/explain", files=files, timeout=30).json()
    predicted = httpx.post(f"{served.url}/{task}/predict", files=files, timeout=30).json()
    probabilities = httpx.post(f"{served.url}/{task}/proba", files=files, timeout=30).json()["probabilities"]
    assert (explained["label"], explained["confidence"]) == (predicted["label"], pytest.approx(predicted["confidence"]))
    assert explained["probabilities"] == pytest.approx(probabilities, abs=1e-6)
    heat = np.array(explained["explanation"]["map"])
    assert heat.shape == (card.input.height, card.input.width) and heat.min() >= 0 and heat.max() <= 1


def test_every_model_refuses_bad_input_with_4xx(served: Server) -> None:
    for task in [*TINY, "mnist"]:
        for payload in (b"", b"not an image"):
            response = httpx.post(f"{served.url}/{task}/predict", files={"image": ("x", payload, "image/png")})
            assert response.status_code == 422, (task, response.text)
            assert response.json()["error"]["code"] == "invalid_image"


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_mnist_routes_on_the_trained_models(served: Server) -> None:
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[6:22, 12:16] = 255
    files = {"image": ("digit.png", _png(digit), "image/png")}

    predicted = httpx.post(f"{served.url}/mnist/predict", files=files).json()
    assert predicted["label"] in [str(d) for d in range(10)]

    reconstruction = httpx.post(f"{served.url}/mnist/reconstruct", files=files)
    assert reconstruction.status_code == 200 and reconstruction.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(reconstruction.content))
    assert image.size == (28, 28) and image.mode == "L"

    code = httpx.post(f"{served.url}/mnist/encode", files=files).json()["code"]
    assert len(code) == 30 and all(isinstance(v, float) for v in code)


def test_models_listing_shows_every_trained_model(served: Server) -> None:
    listed = {m["name"] for m in httpx.get(f"{served.url}/models").json()["models"]}
    assert listed == {*TINY, "mnist", "mnist_autoencoder"}
