"""The model contract: card validation and the one preprocessing definition, on every kind of input image."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from contract.card import InputSpec, ModelCard
from contract.decision import predicted_classes
from contract.preprocessing import ImageError, TooManyPixels, decode_image, load_pixels, normalize, preprocess

GRAY = InputSpec(channels=1, height=16, width=16)
RGB = InputSpec(channels=3, height=16, width=16, normalization="mean_std", mean=(0.5, 0.5, 0.5), std=(0.25,) * 3)


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def gradient(mode: str = "L", size: tuple[int, int] = (32, 24)) -> Image.Image:
    array = np.tile(np.linspace(0, 255, size[0], dtype=np.uint8), (size[1], 1))
    return Image.fromarray(array).convert(mode)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA", "CMYK", "I;16", "1"])
@pytest.mark.parametrize("spec", [GRAY, RGB], ids=["gray", "rgb"])
def test_every_common_mode_becomes_the_model_input(mode: str, spec: InputSpec) -> None:
    if mode == "I;16":
        image = Image.fromarray(np.asarray(gradient()).astype(np.uint16) * 257)
    else:
        image = gradient(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    tensor = preprocess(encode(image, fmt), spec)
    assert tensor.shape == (spec.channels, 16, 16) and tensor.dtype == np.float32
    assert np.isfinite(tensor).all()


def test_sixteen_bit_matches_eight_bit() -> None:
    eight = np.asarray(gradient())
    sixteen = Image.fromarray(eight.astype(np.uint16) * 257)
    assert np.abs(load_pixels(encode(sixteen), GRAY).astype(int) - load_pixels(encode(gradient()), GRAY)).max() <= 1


def test_exif_orientation_is_applied() -> None:
    upright = gradient(size=(40, 20))
    rotated = upright.transpose(Image.Transpose.ROTATE_90)  # stored turned 90° counter-clockwise ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... and tagged "rotate 90° clockwise to display"
    decoded = decode_image(encode(rotated, "JPEG", exif=exif, quality=95))
    assert decoded.size == upright.size
    error = np.abs(np.asarray(decoded, dtype=int) - np.asarray(upright, dtype=int)).mean()
    assert error < 4  # upright, not turned the wrong way (which would mirror the gradient: error ≈ 128)


def test_a_colour_jpeg_for_a_grayscale_model_is_decoded_straight_to_luma() -> None:
    """Grey content stored as RGB (the chest X-ray dataset's JPEGs) gives the very pixels of decoding to RGB and
    converting; a colour photo gives pixels within a few grey levels of that."""
    rng = np.random.default_rng(0)
    colour = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize((64, 48))
    grey_as_rgb = gradient("RGB", size=(64, 48))
    spec = InputSpec(channels=1, height=24, width=32)
    for image, tolerance in ((grey_as_rgb, 0), (colour, 8)):
        data = encode(image, "JPEG", quality=90)
        assert decode_image(data, grayscale=True).mode == "L" and decode_image(data).mode == "RGB"
        via_rgb = np.asarray(decode_image(data).convert("L").resize((32, 24), Image.Resampling.BILINEAR), dtype=int)
        assert np.abs(load_pixels(data, spec)[0].astype(int) - via_rgb).max() <= tolerance


def test_rgba_is_composited_on_black() -> None:
    transparent = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    assert load_pixels(encode(transparent), GRAY).max() == 0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"this is not an image", "not a recognised image"),
        (encode(gradient())[:60], "truncated"),
        (encode(gradient(), "JPEG")[:200], "truncated"),
        (encode(gradient(), "GIF"), "unsupported image format"),
    ],
    ids=["empty", "text", "truncated-png", "truncated-jpeg", "gif"],
)
def test_bad_bytes_raise_a_clear_error(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        preprocess(data, GRAY)


def test_pixel_limit_is_checked_before_decoding() -> None:
    big = encode(Image.new("L", (4000, 4000)))
    with pytest.raises(TooManyPixels, match="over the limit"):
        decode_image(big, max_pixels=1_000_000)


def test_dark_background_polarity_inverts_light_images() -> None:
    spec = InputSpec(channels=1, height=8, width=8, polarity="dark_background")
    white_page = Image.new("L", (8, 8), 255)
    assert load_pixels(encode(white_page), spec).max() == 0
    black_page = Image.new("L", (8, 8), 0)
    assert load_pixels(encode(black_page), spec).max() == 0


def test_normalizations() -> None:
    pixels = np.array([[[[0, 255], [51, 102]]]], dtype=np.uint8)
    assert np.allclose(normalize(pixels, InputSpec(channels=1, height=2, width=2)), pixels / 255)
    minmax = normalize(pixels, InputSpec(channels=1, height=2, width=2, normalization="minmax"))
    assert minmax.min() == 0 and minmax.max() == 1
    spec = InputSpec(channels=1, height=2, width=2, normalization="mean_std", mean=(0.5,), std=(0.5,))
    assert np.allclose(normalize(pixels, spec), (pixels / 255 - 0.5) / 0.5)


def test_input_spec_rejects_inconsistent_normalisation() -> None:
    with pytest.raises(ValidationError):
        InputSpec(channels=3, height=8, width=8, normalization="mean_std", mean=(0.5,), std=(0.5,))


def card(**changes) -> dict:
    fields = dict(
        name="chest_xray",
        version="1",
        kind="classifier",
        task="chest_xray",
        classes=["NORMAL", "PNEUMONIA"],
        positive_class="PNEUMONIA",
        threshold=0.4,
        input=GRAY.model_dump(),
        architecture="compact_cnn",
        parameters=10,
        onnx={"sha256": "0" * 64, "opset": 18, "inputs": [], "outputs": []},
    )
    return fields | changes


def test_card_validation() -> None:
    ModelCard.model_validate(card())
    for bad in (
        card(positive_class="COVID"),
        card(threshold=None),
        card(classes=["only"], positive_class=None, threshold=None),
        card(classes=["COVID", "NORMAL", "OTHER"], positive_class="COVID"),  # a threshold is for two classes
        card(name="../etc"),
        card(version="latest"),
        card(onnx={"sha256": "xyz", "opset": 18, "inputs": [], "outputs": []}),
        card(unexpected=1),
    ):
        with pytest.raises(ValidationError):
            ModelCard.model_validate(bad)


def test_one_decision_rule_for_evaluation_and_serving() -> None:
    """Training's metrics, training.quantize and the service count the same predictions (contract.decision)."""
    from serving.routes import decide
    from training.evaluate import classification_metrics

    probs = np.random.default_rng(0).dirichlet([1, 1], size=200)
    labels = (probs[:, 1] > 0.3).astype(int)
    card = ModelCard.model_construct(classes=["normal", "pneumonia"], positive_class="pneumonia", threshold=0.3)
    served = np.array([card.classes.index(decide(card, row)[0]) for row in probs])
    np.testing.assert_array_equal(served, predicted_classes(probs, 1, 0.3))
    assert classification_metrics(labels, probs, card.classes, 1, 0.3)["accuracy"] == 1.0
    assert (predicted_classes(probs, None, None) == probs.argmax(1)).all()
    three = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
    assert predicted_classes(three, 0, 0.1).tolist() == [1, 0], "a threshold is for two classes"
