"""DICOM uploads: built with pydicom, decoded by contract.dicom to the 8-bit image the equivalent PNG holds, and served
with the same predictions as that PNG; undecodable files get a 4xx naming the reason."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    MPEG2MPML,
    UID,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

from contract.card import InputSpec
from contract.dicom import UnsupportedDicom
from contract.preprocessing import ImageError, TooManyPixels, decode_image, load_pixels
from tests.conftest import Server

RNG = np.random.default_rng(0)
GRADIENT = (np.add.outer(np.arange(24), np.arange(32)) * 4095 // 55).astype(np.uint16)  # 12-bit values, 0..4095
SPEC = InputSpec(channels=1, height=16, width=16)


def dicom(
    pixels: np.ndarray,
    *,
    bits: int = 16,
    stored: int = 12,
    photometric: str = "MONOCHROME2",
    syntax: UID = ExplicitVRLittleEndian,
    preamble: bool = True,
    **elements: object,
) -> bytes:
    """A DX image as DICOM Part 10 bytes (or a bare dataset without preamble and meta)."""
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = DigitalXRayImageStorageForPresentation
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
    dataset.Modality = "DX"
    dataset.Rows, dataset.Columns = pixels.shape[-2:]
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = bits, stored, stored - 1
    dataset.PixelRepresentation = 0
    if pixels.ndim == 3:
        dataset.NumberOfFrames = pixels.shape[0]
    dataset.PixelData = pixels.astype(np.uint8 if bits == 8 else np.uint16).tobytes()
    for keyword, value in elements.items():
        setattr(dataset, keyword, value)
    if syntax == RLELossless:
        dataset.compress(RLELossless, encoding_plugin="pydicom")
    buffer = io.BytesIO()
    if preamble:
        dataset.save_as(buffer, enforce_file_format=True)
    else:
        del dataset.file_meta
        dataset.save_as(buffer, implicit_vr=False, little_endian=True)
    return buffer.getvalue()


def encapsulated(data: bytes, syntax: UID, fragment: bytes) -> bytes:
    """The same file with its pixel data replaced by one compressed fragment in `syntax`."""
    dataset = pydicom.dcmread(io.BytesIO(data))
    dataset.file_meta.TransferSyntaxUID = syntax
    dataset.PixelData = encapsulate([fragment])
    dataset["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


UNSUPPORTED = encapsulated(dicom(GRADIENT), MPEG2MPML, b"\x00" * 64)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def to_8bit(values: np.ndarray) -> np.ndarray:
    return np.clip(values * 255.0 + 0.5, 0, 255).astype(np.uint8)


def min_max(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    return to_8bit((values - values.min()) / (values.max() - values.min()))


def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1, written out independently of contract.dicom."""
    values = values.astype(np.float64)
    low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    inside = ((values - (center - 0.5)) / (width - 1) + 0.5).clip(0, 1)
    return to_8bit(np.where(values <= low, 0.0, np.where(values > high, 1.0, inside)))


# name → (DICOM bytes, the 8-bit picture it holds, i.e. what the equivalent PNG holds)
CASES = {
    "8-bit MONOCHROME2": (dicom(GRADIENT // 16, bits=8, stored=8), min_max(GRADIENT // 16)),
    "12-bit in 16, rescale slope/intercept": (
        dicom(GRADIENT, RescaleSlope=2, RescaleIntercept=-1024),
        min_max(GRADIENT * 2.0 - 1024),
    ),
    "12-bit, window centre/width": (
        dicom(GRADIENT, WindowCenter=1500, WindowWidth=1200),
        linear_window(GRADIENT, 1500, 1200),
    ),
    "rescale then window, multi-valued": (
        dicom(GRADIENT, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=[2000, 40], WindowWidth=[2000, 400]),
        linear_window(GRADIENT * 2.0 - 1024, 2000, 2000),
    ),
    "MONOCHROME1, windowed": (
        dicom(GRADIENT, photometric="MONOCHROME1", WindowCenter=1500, WindowWidth=1200),
        255 - linear_window(GRADIENT, 1500, 1200),
    ),
    "16-bit stored, RLE Lossless": (dicom(GRADIENT * 16, stored=16, syntax=RLELossless), min_max(GRADIENT * 16)),
    "multi-frame: the first frame": (dicom(np.stack([GRADIENT, GRADIENT[::-1]])), min_max(GRADIENT)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_dicom_decodes_to_the_picture_it_holds(case: str) -> None:
    data, expected = CASES[case]
    image = decode_image(data)
    assert image.mode == "L" and image.size == (32, 24)
    np.testing.assert_array_equal(np.asarray(image), expected)
    np.testing.assert_array_equal(load_pixels(data, SPEC), load_pixels(png(expected), SPEC))


def test_a_bare_dataset_needs_the_declared_media_type() -> None:
    data = dicom(GRADIENT, preamble=False)
    np.testing.assert_array_equal(np.asarray(decode_image(data, dicom=True)), min_max(GRADIENT))
    with pytest.raises(ImageError, match="not a recognised image"):
        decode_image(data)


def test_jpeg_compressed_dicom_decodes_like_the_jpeg() -> None:
    buffer = io.BytesIO()
    Image.fromarray(min_max(GRADIENT)).save(buffer, format="JPEG", quality=95)
    data = encapsulated(dicom(GRADIENT // 16, bits=8, stored=8), JPEGBaseline8Bit, buffer.getvalue())
    from_dicom = np.asarray(decode_image(data), dtype=int)
    from_jpeg = np.asarray(decode_image(buffer.getvalue()), dtype=int)
    assert np.abs(from_dicom - from_jpeg).max() <= 2  # decoders may round differently; min-max may stretch by 1


def test_undecodable_dicom_is_refused_with_the_reason() -> None:
    data = dicom(GRADIENT)
    with pytest.raises(UnsupportedDicom, match="MPEG2"):
        decode_image(UNSUPPORTED)
    with pytest.raises(UnsupportedDicom, match="photometric interpretation PALETTE COLOR"):
        decode_image(dicom(GRADIENT, photometric="PALETTE COLOR"))
    with pytest.raises(ImageError):
        decode_image(data[: len(data) // 2])  # truncated pixel data
    with pytest.raises(TooManyPixels):
        decode_image(dicom(GRADIENT), max_pixels=500)  # 768 pixels, refused from the header


# ------------------------------------------------------------------------------------------------------ over HTTP


def _post(server: Server, path: str, data: bytes, media_type: str = "application/octet-stream") -> httpx.Response:
    return httpx.post(server.url + path, files={"image": ("upload", data, media_type)}, timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_served_dicom_predicts_like_the_equivalent_png(server: Server, case: str) -> None:
    data, expected = CASES[case]
    from_dicom = _post(server, "/chest_xray/proba", data)
    from_png = _post(server, "/chest_xray/proba", png(expected))
    assert from_dicom.status_code == 200, from_dicom.text
    assert from_dicom.json()["probabilities"] == pytest.approx(from_png.json()["probabilities"], abs=1e-6)


@pytest.mark.slow
def test_served_dicom_errors_are_4xx_naming_the_reason(server: Server) -> None:
    bare = dicom(GRADIENT, preamble=False)
    assert _post(server, "/chest_xray/predict", bare, "application/dicom").status_code == 200
    assert _post(server, "/chest_xray/predict", bare).json()["error"]["code"] == "invalid_image"
    response = _post(server, "/chest_xray/predict", UNSUPPORTED, "application/dicom")
    assert response.status_code == 422 and response.json()["error"]["code"] == "unsupported_dicom"
    assert "MPEG2" in response.json()["error"]["message"]
    big = dicom(np.zeros((1100, 1000), np.uint16), syntax=RLELossless)  # a few kB, but over the 1 MP limit
    response = _post(server, "/chest_xray/predict", big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_many_pixels"


def test_a_folder_of_dicom_files_trains_and_its_model_reads_them_as_served(tmp_path: Path) -> None:
    """`.dcm` files in a class folder are training images, decoded by the contract exactly as uploads are."""
    from contract.card import ModelCard
    from tests.synthetic import make_image
    from tests.tiny_tasks import train
    from training.data import load_dataset
    from training.tasks import get_task

    rng = np.random.default_rng(0)
    for label, name in enumerate(("NORMAL", "PNEUMONIA")):
        folder = tmp_path / "data" / "train" / name
        folder.mkdir(parents=True)
        for index in range(12):
            pixels = np.asarray(make_image(label, 40, "L", rng), dtype=np.uint16) * 16  # 12-bit, as a DX stores it
            # one of each class a bare dataset, without the Part 10 preamble: known as DICOM by its suffix alone
            (folder / f"{index}.dcm").write_bytes(dicom(pixels, preamble=index > 0))
    assert train("chest_xray", tmp_path / "data", tmp_path, "--arch", "compact_cnn", "--image-size", "32") == 0
    card = ModelCard.load(tmp_path / "models" / "chest_xray" / "1")
    assert sum(card.splits.values()) == 24, "every .dcm file is a training, validation or test image"

    spec = get_task("chest_xray").with_overrides(input=card.input)
    data = load_dataset(spec, tmp_path / "data", cache_dir=tmp_path / "fresh-cache")
    first = data.splits["test"].ids[0]
    # what the service decodes from the same file sent as application/dicom (a bare dataset needs the declared type)
    expected = load_pixels((tmp_path / "data" / first).read_bytes(), card.input, dicom=True)
    np.testing.assert_array_equal(data.splits["test"].pixels[0], expected)
