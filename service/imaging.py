"""Image bytes -> the model's input array, exactly as the manifest's preprocessing says.

Pure functions, no HTTP and no model: the export imports this module too, so calibration and parity
images go through the very code that serves.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from io import BytesIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import EmptyImage, ImageTooLarge, InvalidImage
from service.manifest import Preprocessing

# Formats a client may send. Pillow can open more (EPS would start Ghostscript); these are the ones
# people upload photos in. The format is detected from the bytes; the client's content type is not trusted.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers MPO (multi-picture) files

# We enforce our own pixel limit from the header, before any decoding (`check_size`); Pillow's global
# check would warn or raise with its own threshold in the middle of that.
Image.MAX_IMAGE_PIXELS = None

_PIL_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_EXIF_ORIENTATION = 0x0112


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Identify the image from its header and refuse it if it is too large to decode."""
    if not data:
        raise EmptyImage("the image is empty (0 bytes)")
    try:
        image = Image.open(BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise InvalidImage(f"the data is not an image in a supported format ({', '.join(FORMATS)})") from None
    except Exception as exc:  # Pillow raises many types for corrupt headers
        raise InvalidImage(f"the image header is corrupt: {exc}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidImage(f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"the image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,} (MAX_IMAGE_PIXELS)"
        )
    return image


def decode_rgb(image: Image.Image, spec: Preprocessing) -> Image.Image:
    """Decode, apply the EXIF orientation and flatten any Pillow mode to RGB."""
    try:
        if image.format in ("JPEG", "MPO") and spec.jpeg_draft:
            size = (spec.width, spec.height)
            if image.getexif().get(_EXIF_ORIENTATION) in _ROTATED_ORIENTATIONS:
                size = (spec.height, spec.width)
            # Keeps both sides >= the requested size, so the resize below still downsamples.
            image.draft("RGB", size)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return _to_rgb(image, spec.background)
    except (ImageTooLarge, InvalidImage):
        raise
    except Exception as exc:  # truncated data, bad Huffman tables, broken EXIF...
        raise InvalidImage(f"the image could not be decoded: {exc}") from None


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit and float greyscale: Pillow's convert("RGB") clips these instead of scaling them.
        values = np.asarray(image, dtype=np.float32)
        # NaN and infinities (float TIFFs) have no pixel value: casting them to uint8 is undefined.
        values = np.where(np.isfinite(values), values, 0.0)
        peak = float(values.max()) if values.size else 0.0
        if image.mode == "F" and peak <= 1.0:
            values = values * 255.0
        elif peak > 255.0:
            values = values / 257.0
        grey = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
        return grey.convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _bilinear_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # TensorFlow's half-pixel-centre sampling (tf.image.resize, bilinear, antialias=False), in float32 as TF does.
    scale = np.float32(n_in / n_out)
    centre = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(centre)
    low = np.maximum(floor, 0).astype(np.intp)
    high = np.minimum(np.ceil(centre), n_in - 1).astype(np.intp)
    return low, high, (centre - floor).astype(np.float32)


@dataclass(frozen=True)
class _ResizePlan:
    rows_low: np.ndarray
    rows_high: np.ndarray
    row_weights: np.ndarray  # (height, 1)
    columns_left: np.ndarray  # indices into a row flattened as W*C
    columns_right: np.ndarray
    column_weights: np.ndarray  # (1, width*C)


@lru_cache(maxsize=256)
def _resize_plan(in_height: int, in_width: int, channels: int, height: int, width: int) -> _ResizePlan:
    # Photos come in a few dozen sizes; the sampling positions depend on nothing else.
    y0, y1, wy = _bilinear_axis(in_height, height)
    x0, x1, wx = _bilinear_axis(in_width, width)
    offsets = np.arange(channels)
    plan = _ResizePlan(
        rows_low=y0,
        rows_high=y1,
        row_weights=wy[:, None],
        columns_left=(x0[:, None] * channels + offsets).ravel(),
        columns_right=(x1[:, None] * channels + offsets).ravel(),
        column_weights=np.repeat(wx, channels)[None, :],
    )
    for array in vars(plan).values():
        array.flags.writeable = False  # shared by every request of this size
    return plan


_BAND_ROWS = 64  # 5 bands for a 300-row output; each float temporary then 64 x 900 x 4 bytes (230 KB)


def resize_bilinear_tf(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize HxWxC uint8 like `tf.image.resize(x, (height, width))`: bilinear, half-pixel centres, no antialias.

    Trained Keras pipelines resize this way; Pillow's bilinear antialiases when it downsamples, which
    shifts the input away from what the network saw in training.
    """
    channels = pixels.shape[2]
    plan = _resize_plan(pixels.shape[0], pixels.shape[1], channels, height, width)
    rows = pixels.reshape(pixels.shape[0], -1)
    resized = np.empty((height, width * channels), dtype=np.float32)
    # A band of output rows at a time, the same arithmetic element for element: the float temporaries are a
    # band's rather than the whole output's four times over, so each thread's malloc arena keeps less of them
    # once freed (peak RSS at 2 clients 188 against 200 MB with per-thread arenas, benchmarks/results/
    # sweep-banded-resize-arenas.md).
    for start in range(0, height, _BAND_ROWS):
        band = slice(start, start + _BAND_ROWS)
        rows0, rows1 = rows[plan.rows_low[band]], rows[plan.rows_high[band]]
        # One np.take per corner along the flattened columns: 2.5x faster than 3-D fancy indexing (measured
        # 3.0 vs 7.5 ms for 960x540 -> 300x300), with identical results.
        top = np.take(rows0, plan.columns_left, axis=1).astype(np.float32)
        top_right = np.take(rows0, plan.columns_right, axis=1).astype(np.float32)
        bottom = np.take(rows1, plan.columns_left, axis=1).astype(np.float32)
        bottom_right = np.take(rows1, plan.columns_right, axis=1).astype(np.float32)
        # `a + (b - a) * w` in place, the last one into the output (bit-identical to the plain expression).
        _lerp_into(top, top_right, plan.column_weights, top)
        _lerp_into(bottom, bottom_right, plan.column_weights, bottom)
        _lerp_into(top, bottom, plan.row_weights[band], resized[band])
    return resized.reshape(height, width, channels)


def _lerp_into(a: np.ndarray, b: np.ndarray, weight: np.ndarray, out: np.ndarray) -> None:
    """out = a + (b - a) * weight, overwriting b (out may be a)."""
    np.subtract(b, a, out=b)
    np.multiply(b, weight, out=b)
    np.add(a, b, out=out)


def resize(image: Image.Image, spec: Preprocessing) -> np.ndarray:
    """RGB image -> (height, width, 3) float32 on the 0..255 scale."""
    if spec.resize == "bilinear_tf":
        return resize_bilinear_tf(np.asarray(image, dtype=np.uint8), spec.height, spec.width)
    resized = image.resize((spec.width, spec.height), resample=_PIL_FILTERS[spec.resize])
    return np.asarray(resized, dtype=np.float32)


def scale_values(pixels: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    low, high = value_range
    if (low, high) == (0.0, 255.0):
        return pixels
    scaled: np.ndarray = (pixels * np.float32((high - low) / 255.0) + np.float32(low)).astype(np.float32)
    return scaled


def warm_up() -> None:
    """Decode one small JPEG the way a request does. The first decode in a process registers Pillow's format
    plugins and sets up libjpeg: about 10 ms that the first client would otherwise wait through."""
    sample = BytesIO()
    Image.new("RGB", (64, 48), (120, 60, 30)).save(sample, format="JPEG")
    preprocess(sample.getvalue(), Preprocessing(height=32, width=32), max_pixels=64 * 48)


def preprocess(data: bytes, spec: Preprocessing, max_pixels: int) -> np.ndarray:
    """Image bytes -> (height, width, 3) float32 model input (channels last; the model wrapper lays it out)."""
    image = open_image(data, max_pixels)
    rgb = decode_rgb(image, spec)
    return scale_values(resize(rgb, spec), spec.value_range)
