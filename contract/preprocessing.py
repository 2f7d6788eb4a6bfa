"""The single definition of how image bytes become a model input tensor.

Training decodes its dataset with :func:`load_pixels` (and caches the result), evaluation and the ONNX parity check
feed those pixels through :func:`normalize`, and serving runs :func:`preprocess` on uploaded bytes, which is the same
two calls. Nothing else in the project resizes or normalises images, so train/serve skew cannot creep in.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from contract.card import InputSpec

ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "BMP", "TIFF", "WEBP"})
DICOM_MEDIA_TYPE = "application/dicom"
DEFAULT_MAX_PIXELS = 50_000_000

_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageError(ValueError):
    """The bytes are not an image this project can use; the message says why, in words fit for an API client."""

    code = "invalid_image"


class TooManyPixels(ImageError):
    code = "too_many_pixels"


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, dicom: bool = False, grayscale: bool = False
) -> Image.Image:
    """Decode bytes into a Pillow image with EXIF orientation applied; DICOM (by content, or `dicom`) to 8 bits.

    The pixel count is checked from the header, before any pixel data is decompressed, so a decompression bomb costs
    nothing. With `grayscale`, a colour JPEG is decoded straight to its luma (libjpeg skips the chroma and the
    conversion to RGB): a third less CPU for a 224-px JPEG, the same pixels for grey content (all 5,216 of the chest
    X-ray dataset's RGB JPEGs), and for colour photos a model input within a few grey levels of converting the RGB.
    """
    if not data:
        raise ImageError("the uploaded file is empty")
    if dicom or data[128:132] == b"DICM":  # a DICOM Part 10 preamble; `dicom` for a bare dataset
        from contract.dicom import decode_dicom

        return decode_dicom(data, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("the upload is not a recognised image (PNG, JPEG or DICOM expected)") from None
    except Image.DecompressionBombError:
        raise TooManyPixels(f"the image has more than {max_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"the image header could not be read: the file is truncated or corrupt ({error})") from None
    if image.format not in ACCEPTED_FORMATS:
        raise ImageError(f"unsupported image format {image.format}; send PNG, JPEG, BMP, TIFF, WebP or DICOM")
    width, height = image.size
    if width * height > max_pixels:
        raise TooManyPixels(f"the image has {width}x{height} pixels, over the limit of {max_pixels}")
    if width < 1 or height < 1:
        raise ImageError("the image has no pixels")
    try:
        if grayscale and image.format == "JPEG" and image.mode == "RGB":
            image.draft("L", None)  # the colour space only; None keeps the full size
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # not a copy: that would double the decoding's memory traffic
        return image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageError(f"the image data is truncated or corrupt ({error})") from None


def _to_8bit(image: Image.Image) -> Image.Image:
    """Bring 16- and 32-bit grayscale down to 8 bits by scaling the full range of the storage type."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        full_scale = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(array / full_scale * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return image


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Composite transparent images onto black (the background of every modality served here)."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image


def _apply_polarity(gray: np.ndarray, polarity: str) -> np.ndarray:
    """For models trained on light strokes over a dark background (MNIST), invert images whose border is light."""
    if polarity != "dark_background":
        return gray
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    return 255 - gray if border.mean() > 127 else gray


def image_to_pixels(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """Convert a decoded image to the model's channels and size: uint8, shape (C, H, W)."""
    image = _flatten_alpha(_to_8bit(image))
    mode = "L" if spec.channels == 1 else "RGB"
    if image.mode != mode:  # convert() to the same mode would copy
        image = image.convert(mode)
    if spec.polarity != "as_is":
        image = Image.fromarray(_apply_polarity(np.asarray(image), spec.polarity))
    if image.size != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), _RESAMPLING[spec.resize])
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def load_pixels(data: bytes, spec: InputSpec, max_pixels: int = DEFAULT_MAX_PIXELS, dicom: bool = False) -> np.ndarray:
    """Image bytes → uint8 pixels (C, H, W) at the model's size. Training caches exactly this."""
    return image_to_pixels(decode_image(data, max_pixels, dicom, grayscale=spec.channels == 1), spec)


def normalize(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 pixels (..., C, H, W) → float32 model input of the same shape."""
    x = pixels.astype(np.float32) / 255.0
    if spec.normalization == "minmax":
        low = x.min(axis=(-3, -2, -1), keepdims=True)
        high = x.max(axis=(-3, -2, -1), keepdims=True)
        return (x - low) / np.maximum(high - low, 1e-6)
    if spec.normalization == "mean_std":
        mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
        return (x - mean) / std
    return x


def preprocess(data: bytes, spec: InputSpec, max_pixels: int = DEFAULT_MAX_PIXELS, dicom: bool = False) -> np.ndarray:
    """Image bytes → float32 model input (C, H, W): what serving runs on every upload."""
    return normalize(load_pixels(data, spec, max_pixels, dicom), spec)
