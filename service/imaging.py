"""Image bytes -> the model's input array, exactly as the manifest's preprocessing says.

Pure functions, no HTTP and no model: the export imports this module too, so calibration and parity
images go through the very code that serves.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from io import BytesIO

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from service import structure
from service.errors import EmptyImage, ImageTooLarge, InvalidImage
from service.manifest import Preprocessing

# Formats a client may send. Pillow can open more (EPS would start Ghostscript); these are the ones
# people upload photos in. The format is detected from the bytes; the client's content type is not trusted.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers MPO (multi-picture) files

# Pillow's own pixel check runs at the limit (open_image sets it): it warns from half of it, which says nothing
# here, and raises past it, also for what Pillow allocates while it opens a file.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# A PNG's text chunks are read whole when it is opened, before any check: Pillow allows 64 MiB of characters
# (a 260 KiB file of compressed 4-byte characters took 253 MB as Python strings). Metadata needs far less.
PngImagePlugin.MAX_TEXT_CHUNK = 256 * 1024
PngImagePlugin.MAX_TEXT_MEMORY = 1024 * 1024
_TEXT_TOO_LARGE = ("MAX_TEXT_CHUNK", "MAX_TEXT_MEMORY")

_PIL_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_EXIF_ORIENTATION = 0x0112
# What each EXIF orientation asks for (ImageOps.exif_transpose's table); any other value leaves the image be.
_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS = tuple(_TRANSPOSES[orientation] for orientation in (5, 6, 7, 8))  # the turns that swap width and height

# What decoding costs, per pixel of the decoded image (measured with tracemalloc and RSS). Pillow keeps
# bilevel, greyscale and palette images in a byte a pixel, 16-bit ones in two, everything else in four.
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
# 16-bit and float greyscale are scaled as a whole in float32 (their peak value sets the scale): the float
# copies, the uint8 grey and its RGB on top of the decoded image.
_SCALED_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_SCALING_BYTES_PER_PIXEL = 14
# Pillow's WebP decoder has libwebp decode into a buffer of its own, hands it to Python as bytes, then copies
# that into the image: about four times the image at the peak.
_DECODER_COPIES = {"WEBP": 4}
# Above this many decoded pixels only the rows the resize reads are converted to RGB (resize_rows_bilinear_tf):
# converting a whole large image took up to 4x its decoded size again (an RGBA PNG: RGBA, background, blend,
# RGB, then numpy's copy). Below it, the whole image at once is faster and costs little.
ROWS_ONLY_ABOVE_PIXELS = 2_000_000


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Identify the image from its header and refuse it if it is too large to decode."""
    if not data:
        raise EmptyImage("the image is empty (0 bytes)")
    # Half, because Pillow raises past twice its setting. It guards what Pillow allocates while opening: a GIF's
    # first frame larger than its screen had its disposal buffer filled (246 MB for a 43-byte file) before the
    # check below. Every call in a process passes the same limit.
    Image.MAX_IMAGE_PIXELS = -(-max_pixels // 2)
    scans = structure.check(data)
    try:
        image = Image.open(BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise InvalidImage(f"the data is not an image in a supported format ({', '.join(FORMATS)})") from None
    except Image.DecompressionBombError:
        raise ImageTooLarge(
            f"the image has a frame of more than {max_pixels:,} pixels (MAX_IMAGE_PIXELS); nothing was decoded"
        ) from None
    except Exception as exc:  # Pillow raises many types for corrupt headers
        if any(name in str(exc) for name in _TEXT_TOO_LARGE):
            raise InvalidImage(
                "the PNG's text chunks (its metadata) are larger than the service reads: 256 KiB each, 1 MiB in all"
            ) from None
        raise InvalidImage(f"the image header is corrupt: {exc}") from None
    if scans:
        image.info["scans"] = scans  # decoder_buffers: more than one, and libjpeg keeps every coefficient
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidImage(f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"the image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,} (MAX_IMAGE_PIXELS)"
        )
    return image


def decoder_buffers(image: Image.Image) -> int:
    """Bytes a decoder holds beside the image it decodes into, from the header, before any `draft`."""
    width, height = image.size
    if image.format in ("JPEG", "MPO") and (image.info.get("progressive") or image.info.get("scans", 1) > 1):
        # libjpeg keeps every DCT coefficient of a JPEG decoded in several scans (progressive, or a baseline one
        # with a scan per component) at full size, whatever the scale it decodes at: two bytes each, 64 per 8x8
        # block of each component at its sampling (117 MB for 40 MP in 4:2:0, 231 MB in three baseline scans).
        layers: list[tuple[int, int, int, int]] = getattr(image, "layer", [])
        most = max((h * v for _, h, v, _ in layers), default=1)
        share = sum(h * v for _, h, v, _ in layers) / most if layers else 4
        return int(2 * width * height * share)
    if image.format == "BMP" and image.info.get("compression") in (1, 2):
        return 2 * width * height  # Pillow's RLE decoder: a bytearray of the pixels, then a bytes copy of it
    tags = getattr(image, "tag_v2", None)
    if image.format == "TIFF" and tags is not None and tags.get(259, 1) != 1:
        # libtiff decodes a compressed strip or tile whole into a buffer of its own: a second image for a single
        # strip, and a tile may be far larger than the image (a 16x16 image in one 32768x32768 tile: 1 GB).
        if 322 in tags:
            return int(tags.get(322, 0)) * int(tags.get(323, 0)) * _BYTES_PER_PIXEL.get(image.mode, 4)
        rows = min(int(tags.get(278, height)), height)
        return rows * width * _BYTES_PER_PIXEL.get(image.mode, 4)
    return 0


def decode_cost(image: Image.Image, turn: Image.Transpose | None, out_height: int, buffers: int = 0) -> int:
    """Bytes that decoding `image` at its current size (after any `draft`), turning it as its EXIF orientation
    says (`turn`) and resizing it to `out_height` rows take at the peak, from its header; `buffers`: what the
    decoder holds besides (decoder_buffers, read before the draft)."""
    width, height = image.size
    cost = width * height * _BYTES_PER_PIXEL.get(image.mode, 4)
    if image.mode in _SCALED_MODES:
        cost += width * height * _SCALING_BYTES_PER_PIXEL  # converted to RGB whole: see _to_rgb
    if turn is not None:
        cost *= 2  # the turned copy is made before the original goes
    if turn in _SWAPS:
        width, height = height, width
    # Then the rows the resize reads, in RGB (two per output row at most): 13 MB for a 7300-pixel-wide image.
    return cost * _DECODER_COPIES.get(image.format or "", 1) + min(height, 2 * out_height) * width * 3 + buffers


def _turn(image: Image.Image, loaded: bool) -> Image.Transpose | None:
    # Pillow's PNG getexif() decodes the whole image to look for an eXIf chunk after the pixels: before the
    # decoding, only a chunk ahead of them counts, and decode() looks again once the pixels are in.
    if image.format == "PNG" and not loaded:
        exif = Image.Exif()
        raw = image.info.get("exif")
        if isinstance(raw, bytes):
            exif.load(raw)
    else:
        exif = image.getexif()
    try:
        return _TRANSPOSES.get(exif.get(_EXIF_ORIENTATION, 1))  # looked up as exif_transpose does
    except TypeError:  # a value that cannot be a key (no orientation exif_transpose would act on)
        return None


def _check_cost(
    image: Image.Image, turn: Image.Transpose | None, max_decode_bytes: int, out_height: int, buffers: int
) -> None:
    cost = decode_cost(image, turn, out_height, buffers)
    if cost > max_decode_bytes:
        width, height = image.size
        raise ImageTooLarge(
            f"the {image.format} image would take {cost / 2**20:,.0f} MiB to decode ({width}x{height}, mode "
            f"{image.mode}); the limit is {max_decode_bytes / 2**20:,.0f} MiB (MAX_DECODE_BYTES). Only a JPEG is "
            "decoded reduced: send large photos as JPEG, or smaller"
        )


def decode(image: Image.Image, spec: Preprocessing, max_decode_bytes: int | None = None) -> Image.Image:
    """Decode (a JPEG reduced, as the manifest allows) and apply the EXIF orientation; the mode stays the image's.

    With `max_decode_bytes`, an image whose decoding would take more memory is refused before any pixel is
    decoded: a flat 40 MP PNG, WebP or Group-4 TIFF is a few KiB on the wire and hundreds of MB decoded.
    """
    try:
        buffers = decoder_buffers(image) if max_decode_bytes is not None else 0
        turn = _turn(image, loaded=False)
        if image.format in ("JPEG", "MPO") and spec.jpeg_draft:
            size = (spec.height, spec.width) if turn in _SWAPS else (spec.width, spec.height)
            # Keeps both sides >= the requested size, so the resize below still downsamples.
            image.draft("RGB", size)
        if max_decode_bytes is not None:
            _check_cost(image, turn, max_decode_bytes, spec.height, buffers)
        image.load()
        if image.format == "PNG":  # an eXIf chunk after the pixels is only found once they are in
            turn = _turn(image, loaded=True)
            if max_decode_bytes is not None:
                _check_cost(image, turn, max_decode_bytes, spec.height, buffers)
        # Not ImageOps.exif_transpose: it writes the EXIF block anew without the orientation, turning every
        # tag into Python objects first (a 9.6 MB block took 964 MB); only the pixels are wanted here.
        return image if turn is None else image.transpose(turn)
    except (ImageTooLarge, InvalidImage):
        raise
    except Exception as exc:  # truncated data, bad Huffman tables, broken EXIF...
        raise InvalidImage(f"the image could not be decoded: {exc}") from None


def decode_rgb(image: Image.Image, spec: Preprocessing) -> Image.Image:
    """Decode, apply the EXIF orientation and flatten any Pillow mode to RGB."""
    return _to_rgb(decode(image, spec), spec.background)


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _SCALED_MODES:
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
    return _resize_rows(rows, plan.rows_low, plan.rows_high, plan, height, width, channels)


def _resize_rows(
    rows: np.ndarray,
    rows_low: np.ndarray,
    rows_high: np.ndarray,
    plan: _ResizePlan,
    height: int,
    width: int,
    channels: int,
) -> np.ndarray:
    """The resize from source rows (each flattened as W*C) and, per output row, which two of them it blends."""
    resized = np.empty((height, width * channels), dtype=np.float32)
    # A band of output rows at a time, the same arithmetic element for element: the float temporaries are a
    # band's rather than the whole output's four times over, so each thread's malloc arena keeps less of them
    # once freed (peak RSS at 2 clients 188 against 200 MB with per-thread arenas).
    for start in range(0, height, _BAND_ROWS):
        band = slice(start, start + _BAND_ROWS)
        low, high = rows_low[band], rows_high[band]
        needed, at = np.unique(np.concatenate([low, high]), return_inverse=True)
        # Each source row the band reads, once (a slice when they run on, as a large image's converted rows
        # do), then its columns: never a whole source row per output row (64 copies of one 2-million-pixel
        # row took 1.5 GB). One np.take per side along the flattened columns: 2.5x faster than 3-D fancy
        # indexing (3.0 vs 7.5 ms for 960x540 -> 300x300), the same values.
        first, last = int(needed[0]), int(needed[-1])
        source = rows[first : last + 1] if last - first + 1 == len(needed) else rows[needed]
        left = np.take(source, plan.columns_left, axis=1)
        right = np.take(source, plan.columns_right, axis=1)
        above, below = at[: len(low)], at[len(low) :]
        top, top_right = left[above].astype(np.float32), right[above].astype(np.float32)
        bottom, bottom_right = left[below].astype(np.float32), right[below].astype(np.float32)
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


def resize_rows_bilinear_tf(
    image: Image.Image, background: tuple[int, int, int], height: int, width: int
) -> np.ndarray:
    """`resize_bilinear_tf(np.asarray(_to_rgb(image, background)), height, width)`, value for value, converting
    only the rows the resize reads: a few hundred rows of a large image instead of all of it, in RGB and again
    as numpy's copy. Not for the modes scaled as a whole (_SCALED_MODES)."""
    plan = _resize_plan(image.height, image.width, 3, height, width)
    needed = np.union1d(plan.rows_low, plan.rows_high)
    rows = np.empty((len(needed), image.width * 3), dtype=np.uint8)
    for i, y in enumerate(needed.tolist()):
        # Every conversion in _to_rgb is pixel by pixel (palette, alpha blend on a plain background, colour
        # space), so a row converted alone has the values it has in the whole image converted.
        row = _to_rgb(image.crop((0, y, image.width, y + 1)), background)
        rows[i] = np.asarray(row, dtype=np.uint8).reshape(-1)
    low, high = np.searchsorted(needed, plan.rows_low), np.searchsorted(needed, plan.rows_high)
    return _resize_rows(rows, low, high, plan, height, width, 3)


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


def preprocess(
    data: bytes,
    spec: Preprocessing,
    max_pixels: int,
    max_decode_bytes: int | None = None,
    opened: Callable[[Image.Image], None] | None = None,
) -> np.ndarray:
    """Image bytes -> (height, width, 3) float32 model input (channels last; the model wrapper lays it out).
    `opened` sees the image once its header is read and checked, before it is decoded (its format and size)."""
    image = open_image(data, max_pixels)
    if opened is not None:
        opened(image)
    image = decode(image, spec, max_decode_bytes)
    large = image.width * image.height > ROWS_ONLY_ABOVE_PIXELS
    if large and spec.resize == "bilinear_tf" and image.mode not in _SCALED_MODES:
        resized = resize_rows_bilinear_tf(image, spec.background, spec.height, spec.width)
    else:
        resized = resize(_to_rgb(image, spec.background), spec)
    return scale_values(resized, spec.value_range)
