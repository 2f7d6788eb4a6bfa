"""DICOM files → the 8-bit image a PNG of the same picture would be, so the rest of preprocessing is shared.

Grayscale: the modality LUT (rescale slope and intercept, or a Modality LUT Sequence), then the first VOI LUT or
window (centre/width with its VOI LUT function), or, without either, the image's own value range (what viewers
show); MONOCHROME1 is inverted so that higher values are brighter, as in MONOCHROME2; the result is scaled to 0-255.
RGB and YCbCr colour images are converted to 8-bit RGB. Multi-frame files: the first frame. Rows x columns are
checked against the pixel limit, and the transfer syntax against the installed decoders, before any pixel data is
decoded. contract.preprocessing imports this module only for DICOM uploads: the contract needs no pydicom otherwise.
"""

from __future__ import annotations

import io

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder, pixel_array
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from contract.preprocessing import ImageError, TooManyPixels

_COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"})


class UnsupportedDicom(ImageError):
    """A well-formed DICOM file this service cannot turn into an image (transfer syntax, photometric, no pixels)."""

    code = "unsupported_dicom"


def decode_dicom(data: bytes, max_pixels: int) -> Image.Image:
    """DICOM bytes → an 8-bit Pillow image ("L" or "RGB"); ImageError (4xx) with the reason otherwise."""
    try:
        dataset = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as error:  # pydicom raises many types on malformed input; all mean "not a readable file"
        raise ImageError(f"the DICOM file cannot be parsed ({type(error).__name__})") from None
    try:
        return _to_image(dataset, max_pixels)
    except ImageError:
        raise
    except Exception as error:  # elements are parsed lazily: a malformed one surfaces here
        raise ImageError(f"the DICOM file cannot be decoded ({type(error).__name__}: {str(error)[:200]})") from None


def _transfer_syntax(dataset: Dataset) -> UID:
    """The file meta's transfer syntax; for a bare dataset without meta, the encoding it was read with."""
    meta = dataset.get("file_meta")
    if meta is not None and "TransferSyntaxUID" in meta:
        return UID(meta.TransferSyntaxUID)
    implicit, little = dataset.original_encoding
    syntax = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    if meta is None:
        dataset.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    return syntax


def _check_decodable(syntax: UID) -> None:
    name = f"{syntax.name} ({syntax})" if syntax.is_transfer_syntax else repr(str(syntax))
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise UnsupportedDicom(f"DICOM transfer syntax {name} is not supported: no decoder exists for it") from None
    if not decoder.is_available:
        raise UnsupportedDicom(f"DICOM transfer syntax {name} is not supported: its decoder is not installed here")


def _to_image(dataset: Dataset, max_pixels: int) -> Image.Image:
    if "PixelData" not in dataset:
        raise UnsupportedDicom("the DICOM file has no pixel data (PixelData)")
    rows, columns = int(dataset.Rows), int(dataset.Columns)
    if rows < 1 or columns < 1:
        raise ImageError("the DICOM image has no pixels")
    if rows * columns > max_pixels:
        raise TooManyPixels(f"the DICOM image has {columns}x{rows} pixels, over the limit of {max_pixels}")
    photometric = str(dataset.get("PhotometricInterpretation", "")).strip()
    samples = int(dataset.get("SamplesPerPixel", 1))
    if not (samples == 1 and photometric in ("MONOCHROME1", "MONOCHROME2")) and not (
        samples == 3 and photometric in _COLOUR
    ):
        raise UnsupportedDicom(
            f"DICOM photometric interpretation {photometric or 'missing'} with {samples} sample(s) per pixel is not "
            "supported; send MONOCHROME1, MONOCHROME2, RGB or YBR images"
        )
    _check_decodable(_transfer_syntax(dataset))
    pixels = pixel_array(dataset, index=0)  # the first frame only, also of a multi-frame file

    if samples == 3:
        full_scale = 2 ** int(dataset.get("BitsStored", 8)) - 1
        return Image.fromarray(_to_uint8(pixels.astype(np.float64) / full_scale), "RGB")
    values = apply_modality_lut(pixels, dataset).astype(np.float64)
    if "VOILUTSequence" in dataset:
        bits = int(dataset.VOILUTSequence[0].LUTDescriptor[2])
        scaled = apply_voi(values, dataset, index=0).astype(np.float64) / (2**bits - 1)
    elif "WindowCenter" in dataset and "WindowWidth" in dataset:
        scaled = window(values, _first(dataset.WindowCenter), _first(dataset.WindowWidth),
                        str(dataset.get("VOILUTFunction", "LINEAR")).strip())  # fmt: skip
    else:
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if photometric == "MONOCHROME1":
        scaled = 1.0 - scaled
    return Image.fromarray(_to_uint8(scaled), "L")


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """A DICOM VOI window (PS3.3 C.11.2.1.2) mapping values to [0, 1]."""
    if function == "SIGMOID":
        if width <= 0:
            raise ImageError(f"the DICOM window width {width} must be positive")
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise ImageError(f"the DICOM window width {width} must be positive")
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if function != "LINEAR":
        raise UnsupportedDicom(f"DICOM VOI LUT function {function!r} is not supported (LINEAR, LINEAR_EXACT, SIGMOID)")
    if width < 1:
        raise ImageError(f"the DICOM window width {width} must be at least 1")
    if width == 1:
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _first(value: object) -> float:
    """Window centre/width may hold several values (alternative windows): the first is the default."""
    return float(value[0]) if isinstance(value, MultiValue | list | tuple) else float(value)


def _to_uint8(scaled: np.ndarray) -> np.ndarray:
    return np.clip(np.nan_to_num(scaled) * 255.0 + 0.5, 0, 255).astype(np.uint8)
