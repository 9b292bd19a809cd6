"""Image bytes -> the model's input array, exactly as the manifest's preprocessing says.

Pure functions, no HTTP and no model: the export imports this module too, so calibration and parity
images go through the very code that serves.
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import EmptyImage, ImageTooLarge, InvalidImage
from service.manifest import Preprocessing
from service.resize import resize_bilinear_tf

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


def resize(image: Image.Image, spec: Preprocessing) -> np.ndarray:
    """RGB image -> (height, width, 3) float32 on the 0..255 scale."""
    if spec.resize == "bilinear_tf":
        return resize_bilinear_tf(np.asarray(image, dtype=np.uint8), spec.height, spec.width)
    resized = image.resize((spec.width, spec.height), resample=_PIL_FILTERS[spec.resize])
    return np.asarray(resized, dtype=np.float32)


def warm_up(spec: Preprocessing) -> None:
    """Resize once, so that loading the resize graph (bilinear_tf) is not the first client's wait."""
    resize(Image.new("RGB", (2, 2)), spec)


def scale_values(pixels: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    low, high = value_range
    if (low, high) == (0.0, 255.0):
        return pixels
    scaled: np.ndarray = (pixels * np.float32((high - low) / 255.0) + np.float32(low)).astype(np.float32)
    return scaled


def preprocess(data: bytes, spec: Preprocessing, max_pixels: int) -> np.ndarray:
    """Image bytes -> (height, width, 3) float32 model input (channels last; the model wrapper lays it out)."""
    image = open_image(data, max_pixels)
    rgb = decode_rgb(image, spec)
    return scale_values(resize(rgb, spec), spec.value_range)
