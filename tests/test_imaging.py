"""Preprocessing: bytes -> model input, as the manifest says."""

from __future__ import annotations

import tracemalloc
from dataclasses import replace
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from service.errors import EmptyImage, ImageTooLarge, InvalidImage
from service.imaging import (
    ROWS_ONLY_ABOVE_PIXELS,
    _resize_plan,
    _to_rgb,
    decode_cost,
    decode_rgb,
    decoder_buffers,
    open_image,
    preprocess,
    resize_bilinear_tf,
    resize_rows_bilinear_tf,
    scale_values,
    warm_up,
)
from service.manifest import Preprocessing
from tests.helpers import image_bytes
from tests.hostile_files import (
    decode_in_a_fresh_process,
    encoded,
    exif_block,
    flat_image,
    gif_with_a_large_frame,
    measure,
    png_chunk,
    png_chunks,
    png_text,
    png_with,
    rle8_bmp,
)

SPEC = Preprocessing(height=30, width=40)
LIMIT = 10_000_000


@pytest.fixture(autouse=True)
def _fresh_resize_plans() -> None:
    # Plans are cached per size: each test computes its own (under mutmut, a plan cached before the fork
    # would hide a changed sampling grid).
    _resize_plan.cache_clear()


def _naive_bilinear_tf(src: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """A loop-by-loop transcription of TF's half-pixel bilinear kernel, to check the vectorised one."""
    in_h, in_w, _ = src.shape
    out = np.zeros((out_h, out_w, src.shape[2]), dtype=np.float64)
    for y in range(out_h):
        cy = (y + 0.5) * in_h / out_h - 0.5
        y0, y1, fy = max(int(np.floor(cy)), 0), min(int(np.ceil(cy)), in_h - 1), cy - np.floor(cy)
        for x in range(out_w):
            cx = (x + 0.5) * in_w / out_w - 0.5
            x0, x1, fx = max(int(np.floor(cx)), 0), min(int(np.ceil(cx)), in_w - 1), cx - np.floor(cx)
            top = src[y0, x0] + (src[y0, x1] - src[y0, x0]) * fx
            bottom = src[y1, x0] + (src[y1, x1] - src[y1, x0]) * fx
            out[y, x] = top + (bottom - top) * fy
    return out


@pytest.mark.parametrize(
    ("in_h", "in_w", "out_h", "out_w"),
    [(37, 53, 12, 9), (10, 10, 25, 31), (300, 300, 300, 300), (1000, 20, 300, 300), (1, 1, 30, 40), (7, 5, 1, 1)],
)
def test_bilinear_tf_matches_the_reference_kernel(in_h: int, in_w: int, out_h: int, out_w: int) -> None:
    src = np.random.default_rng(0).integers(0, 256, (in_h, in_w, 3), dtype=np.uint8)
    ours = resize_bilinear_tf(src, out_h, out_w)
    assert ours.dtype == np.float32 and ours.shape == (out_h, out_w, 3)
    # Sample positions are float32, as in TensorFlow: against this float64 transcription that moves a value by
    # up to 0.011 grey levels when 20 columns stretch to 300; 0.02 is still far below one step of 1.
    np.testing.assert_allclose(ours, _naive_bilinear_tf(src.astype(np.float64), out_h, out_w), atol=0.02)


def test_bilinear_tf_does_not_antialias() -> None:
    # A one-pixel checkerboard, halved: half-pixel centres land between two pixels, so bilinear without
    # antialiasing averages pairs along each axis (127.5), exactly as tf.image.resize does.
    board = ((np.indices((40, 40)).sum(axis=0) % 2) * 255).astype(np.uint8)
    src = np.repeat(board[:, :, None], 3, axis=2)
    np.testing.assert_allclose(resize_bilinear_tf(src, 20, 20), 127.5, atol=1e-4)
    # 39 -> 13: centres fall exactly on pixels 1, 4, 7, ..., so the output is the board's own values there.
    third = resize_bilinear_tf(src[:39, :39], 13, 13)[:, :, 0]
    np.testing.assert_allclose(third, board[1:39:3, 1:39:3], atol=1e-3)


def test_identity_size_is_exact() -> None:
    src = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_bilinear_tf(src, 30, 40), src.astype(np.float32))


def _whole_image_bilinear_tf(src: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF's kernel as one float32 expression over the whole image (the resize before it went by bands)."""

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        centre = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * np.float32(n_in / n_out) - np.float32(0.5)
        low = np.maximum(np.floor(centre), 0).astype(np.intp)
        return low, np.minimum(np.ceil(centre), n_in - 1).astype(np.intp), (centre - np.floor(centre))

    (y0, y1, wy), (x0, x1, wx) = axis(src.shape[0], out_h), axis(src.shape[1], out_w)
    corner = [src[rows][:, cols].astype(np.float32) for rows in (y0, y1) for cols in (x0, x1)]
    top = corner[0] + (corner[1] - corner[0]) * wx[None, :, None]
    bottom = corner[2] + (corner[3] - corner[2]) * wx[None, :, None]
    result: np.ndarray = top + (bottom - top) * wy[:, None, None]
    return result


@pytest.mark.parametrize(
    ("in_h", "in_w", "out_h"),
    [
        (540, 960, 300),
        (480, 640, 300),
        (1080, 1920, 300),
        (64, 64, 300),
        (200, 90, 1),
        (200, 90, 63),
        (200, 90, 65),
        (200, 90, 129),
    ],
)
def test_bilinear_tf_by_bands_is_bit_identical_to_the_whole_image(in_h: int, in_w: int, out_h: int) -> None:
    # Output heights either side of the band boundaries (64 rows) as well as the model's 300.
    src = np.random.default_rng(3).integers(0, 256, (in_h, in_w, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_bilinear_tf(src, out_h, 300), _whole_image_bilinear_tf(src, out_h, 300))


def _resize_peak(src: np.ndarray) -> float:
    """The most numpy held at once while resizing `src` to 300x300, in multiples of the output."""
    resize_bilinear_tf(src, 300, 300)  # the sampling plan is cached from here on
    tracemalloc.start()
    try:
        out = resize_bilinear_tf(src, 300, 300)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return float(peak / out.nbytes)


def test_a_resize_holds_a_band_of_float_temporaries_not_whole_images() -> None:
    # Each thread's malloc arena keeps what it freed: whole-image temporaries (four float32 outputs and two
    # row gathers, over 5x the output) cost 12 MB of peak RSS at 2 clients (200.2 against 188.2 MB).
    src = np.random.default_rng(4).integers(0, 256, (540, 960, 3), dtype=np.uint8)
    assert (peak := _resize_peak(src)) < 3, f"peak {peak:.2f}x the output"


def test_output_shape_dtype_and_raw_value_range() -> None:
    out = preprocess(image_bytes((255, 128, 0), size=(200, 100)), SPEC, LIMIT)
    assert out.shape == (30, 40, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], [255, 128, 0])


def test_value_range_is_applied() -> None:
    px = np.array([[[0, 255, 51]]], dtype=np.float32)
    np.testing.assert_allclose(scale_values(px, (-1.0, 1.0)), [[[-1.0, 1.0, -0.6]]], atol=1e-6)
    np.testing.assert_allclose(scale_values(px, (0.0, 1.0)), [[[0.0, 1.0, 0.2]]], atol=1e-6)


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [
        ("L", 100, (100, 100, 100)),
        ("LA", (100, 0), (255, 255, 255)),  # fully transparent: the white background shows
        ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
        ("RGBA", (0, 0, 0, 0), (255, 255, 255)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("1", 1, (255, 255, 255)),
    ],
)
def test_every_mode_becomes_rgb(mode: str, colour: object, expected: tuple[int, int, int]) -> None:
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    out = preprocess(image_bytes(colour, size=(20, 20), mode=mode, fmt=fmt), SPEC, LIMIT)  # type: ignore[arg-type]
    np.testing.assert_allclose(out[5, 5], expected, atol=1)


def test_palette_with_transparency() -> None:
    image = Image.new("P", (20, 20), 0)
    image.putpalette([200, 10, 10] + [0, 0, 0] * 255)
    opaque = preprocess(encoded(image, "PNG"), SPEC, LIMIT)
    np.testing.assert_allclose(opaque[0, 0], (200, 10, 10))
    transparent = preprocess(encoded(image, "PNG", transparency=0), SPEC, LIMIT)
    np.testing.assert_allclose(transparent[0, 0], (255, 255, 255))


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    image = Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16))
    out = preprocess(encoded(image, "PNG"), SPEC, LIMIT)
    np.testing.assert_allclose(out[0, 0], [40000 / 257] * 3, atol=1)


def test_exif_orientation_is_applied() -> None:
    # Left half red, right half blue, stored rotated with orientation 6 (rotate 90° clockwise to view).
    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    pixels[:, :30] = (255, 0, 0)
    pixels[:, 30:] = (0, 0, 255)
    stored = Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_90)  # 60x40 -> 40x60 stored
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encoded(stored, "JPEG", exif=exif, quality=95)
    out = preprocess(data, replace(SPEC, height=40, width=60), LIMIT)
    assert out[20, 5, 0] > 200 and out[20, 5, 2] < 60  # left is red again
    assert out[20, 55, 2] > 200 and out[20, 55, 0] < 60  # right is blue


def test_jpeg_draft_decodes_large_images_at_reduced_scale() -> None:
    rng = np.random.default_rng(2)
    big = Image.fromarray(rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8)).resize((1600, 1200))
    data = encoded(big, "JPEG", quality=90)
    spec = Preprocessing(height=300, width=300)
    with_draft = preprocess(data, spec, LIMIT)
    full = preprocess(data, replace(spec, jpeg_draft=False), LIMIT)
    assert with_draft.shape == full.shape == (300, 300, 3)
    # Same picture, a slightly different sampling: decoded at 1/4 scale (1600x1200 -> 400x300), then resized.
    assert float(np.abs(with_draft - full).mean()) < 40
    np.testing.assert_array_equal(with_draft, _expected_with_draft(data, spec, (300, 300)))
    assert not np.array_equal(with_draft, full)
    image = Image.open(BytesIO(data))
    image.draft("RGB", (300, 300))
    assert image.size == (400, 300)  # 1/4 scale: both sides still >= 300


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [Image.new("RGB", (20, 20), c) for c in ((0, 255, 0), (255, 0, 0))]
    buffer = BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    out = preprocess(buffer.getvalue(), SPEC, LIMIT)
    assert out[0, 0, 1] > 200 and out[0, 0, 0] < 50


def test_errors() -> None:
    with pytest.raises(EmptyImage):
        preprocess(b"", SPEC, LIMIT)
    with pytest.raises(InvalidImage):
        preprocess(b"GIF89a garbage", SPEC, LIMIT)
    with pytest.raises(ImageTooLarge):
        preprocess(image_bytes(0, size=(200, 100), mode="L"), SPEC, 19_999)
    jpeg = image_bytes((1, 2, 3), size=(300, 200), fmt="JPEG")
    with pytest.raises(InvalidImage):
        preprocess(jpeg[: len(jpeg) // 2], SPEC, LIMIT)


def test_float_greyscale_is_scaled_from_zero_to_one() -> None:
    # Mode F: 0..1 floats (the usual range) are stretched to 0..255; Pillow's own convert would clip them to 0/1.
    image = Image.fromarray(np.full((20, 20), 0.5, dtype=np.float32))
    assert image.mode == "F"
    np.testing.assert_allclose(preprocess(encoded(image, "TIFF"), SPEC, LIMIT)[0, 0], [128, 128, 128], atol=0.5)
    # Floats already on 0..255 stay as they are.
    image = Image.fromarray(np.full((20, 20), 200.0, dtype=np.float32))
    np.testing.assert_allclose(preprocess(encoded(image, "TIFF"), SPEC, LIMIT)[0, 0], [200, 200, 200], atol=0.5)
    # Exactly 1.0 is the top of the 0..1 range.
    image = Image.fromarray(np.full((20, 20), 1.0, dtype=np.float32))
    np.testing.assert_allclose(preprocess(encoded(image, "TIFF"), SPEC, LIMIT)[0, 0], [255, 255, 255])


def test_32_bit_integer_greyscale() -> None:
    # Mode I: values past 255 are taken as 16-bit and scaled down; small ones stay.
    image = Image.fromarray(np.full((20, 20), 51400, dtype=np.int32))
    assert image.mode == "I"
    np.testing.assert_allclose(preprocess(encoded(image, "TIFF"), SPEC, LIMIT)[0, 0], [200, 200, 200], atol=0.5)
    image = Image.fromarray(np.full((20, 20), 255, dtype=np.int32))
    np.testing.assert_allclose(preprocess(encoded(image, "TIFF"), SPEC, LIMIT)[0, 0], [255, 255, 255])
    image = Image.fromarray(np.full((20, 20), 90, dtype=np.int32))
    np.testing.assert_allclose(preprocess(encoded(image, "TIFF"), SPEC, LIMIT)[0, 0], [90, 90, 90])


def _expected_with_draft(data: bytes, spec: Preprocessing, draft_size: tuple[int, int] | None) -> np.ndarray:
    """The reference pipeline, step by step: draft at `draft_size`, decode, orient, TF-exact resize."""
    image = Image.open(BytesIO(data))
    if draft_size is not None:
        image.draft("RGB", draft_size)
    image = ImageOps.exif_transpose(image)
    return resize_bilinear_tf(np.asarray(image.convert("RGB")), spec.height, spec.width)


@pytest.mark.parametrize("orientation", [1, 3, 5, 6, 7, 8])
def test_jpeg_draft_keeps_the_displayed_image_at_least_model_sized(orientation: int) -> None:
    # Stored 400 wide x 1200 tall. Orientations 5-8 turn it to 1200 x 400 on display: the draft must be asked
    # for the model's size in *stored* terms (width and height swapped), or it picks the wrong DCT scale.
    rng = np.random.default_rng(orientation)
    stored = Image.fromarray(rng.integers(0, 256, (1200, 400, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encoded(stored, "JPEG", exif=exif, quality=90)
    spec = Preprocessing(height=100, width=300)
    rotated = orientation in (5, 6, 7, 8)
    out = preprocess(data, spec, LIMIT)
    np.testing.assert_array_equal(out, _expected_with_draft(data, spec, (100, 300) if rotated else (300, 100)))
    # Rotated, the stored image is 4x the model's size in stored terms: a 1/4 decode. Upright, its 400-pixel
    # width allows no reduction for a 300-wide model: a full decode.
    assert np.array_equal(out, _expected_with_draft(data, spec, None)) is not rotated


def test_open_image_reads_only_the_header() -> None:
    data = image_bytes((1, 2, 3), size=(300, 200), fmt="PNG")
    image = open_image(data, 60_000)
    assert image.size == (300, 200) and image.format == "PNG"
    with pytest.raises(ImageTooLarge, match=r"300x200 = 60,000 pixels; the limit is 59,999 \(MAX_IMAGE_PIXELS\)"):
        open_image(data, 59_999)
    with pytest.raises(EmptyImage, match=r"^the image is empty \(0 bytes\)$"):
        open_image(b"", 100)
    unsupported = r"^the data is not an image in a supported format \(JPEG, PNG, WEBP, GIF, BMP, TIFF\)$"
    with pytest.raises(InvalidImage, match=unsupported):
        open_image(b"%!PS-Adobe-3.0 EPSF-3.0\n", 100)


def test_an_image_with_no_pixels_is_refused() -> None:
    gif = bytearray(image_bytes((1, 2, 3), size=(1, 1), fmt="GIF"))
    gif[6:10] = b"\x00\x00\x00\x00"
    frame = gif.index(b",")
    gif[frame + 5 : frame + 9] = b"\x00\x00\x00\x00"
    with pytest.raises(InvalidImage):
        preprocess(bytes(gif), SPEC, LIMIT)


@pytest.mark.parametrize("name", ["bilinear", "bicubic", "nearest", "lanczos", "box", "hamming"])
def test_pillow_filters_are_the_ones_named(name: str) -> None:
    src = Image.fromarray(np.random.default_rng(4).integers(0, 256, (45, 61, 3), dtype=np.uint8))
    spec = Preprocessing(height=30, width=40, resize=name)
    filters = {
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "nearest": Image.Resampling.NEAREST,
        "lanczos": Image.Resampling.LANCZOS,
        "box": Image.Resampling.BOX,
        "hamming": Image.Resampling.HAMMING,
    }
    expected = np.asarray(src.resize((40, 30), resample=filters[name]), dtype=np.float32)
    out = preprocess(encoded(src, "PNG"), spec, LIMIT)
    assert out.dtype == np.float32 and out.shape == (30, 40, 3)
    np.testing.assert_array_equal(out, expected)


def test_raw_range_is_passed_through_untouched() -> None:
    px = np.array([[[0, 255, 51]]], dtype=np.float32)
    assert scale_values(px, (0.0, 255.0)) is px
    scaled = scale_values(px, (10.0, 20.0))
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled, [[[10.0, 20.0, 12.0]]], atol=1e-5)


def test_background_shows_through_transparency() -> None:
    spec = replace(SPEC, background=(0, 128, 255))
    out = preprocess(image_bytes((9, 9, 9, 0), size=(20, 20), mode="RGBA"), spec, LIMIT)
    np.testing.assert_allclose(out[3, 3], (0, 128, 255))
    half = preprocess(image_bytes((200, 0, 0, 128), size=(20, 20), mode="RGBA"), spec, LIMIT)
    np.testing.assert_allclose(half[3, 3], (100, 64, 127), atol=1)


def test_jpeg_draft_is_skipped_when_the_manifest_says_so() -> None:
    big = Image.fromarray(np.random.default_rng(5).integers(0, 256, (1200, 1600, 3), dtype=np.uint8))
    data = encoded(big, "JPEG", quality=90)
    spec = Preprocessing(height=300, width=300, jpeg_draft=False)
    np.testing.assert_array_equal(preprocess(data, spec, LIMIT), _expected_with_draft(data, spec, None))


def test_warm_up_decodes_without_error() -> None:
    warm_up()


def test_resize_plans_are_shared_and_read_only() -> None:
    src = np.zeros((17, 23, 3), dtype=np.uint8)
    resize_bilinear_tf(src, 5, 7)
    with pytest.raises(ValueError):
        _resize_plan(17, 23, 3, 5, 7).rows_low[0] = 1


def test_formats_pillow_reads_but_the_service_does_not_accept_are_refused() -> None:
    # Pillow opens PPM and ICO happily; only the six upload formats are let through.
    for fmt in ("PPM", "ICO"):
        with pytest.raises(InvalidImage, match=r"^the data is not an image in a supported format \("):
            open_image(image_bytes((1, 2, 3), size=(16, 16), fmt=fmt), LIMIT)


def test_a_corrupt_header_and_corrupt_data_say_which() -> None:
    png = image_bytes((1, 2, 3), size=(64, 48))
    with pytest.raises(InvalidImage, match=r"^the image header is corrupt: \S"):
        open_image(png[:20], LIMIT)  # cut inside the IHDR chunk
    jpeg = image_bytes((1, 2, 3), size=(300, 200), fmt="JPEG")
    with pytest.raises(InvalidImage, match=r"^the image could not be decoded: \S"):
        preprocess(jpeg[: len(jpeg) // 2], SPEC, LIMIT)


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (7, 1)])
def test_a_one_pixel_wide_or_tall_image_is_accepted(size: tuple[int, int]) -> None:
    out = preprocess(image_bytes((30, 60, 90), size=size), SPEC, LIMIT)
    np.testing.assert_allclose(out[0, 0], (30, 60, 90))


def test_an_rgb_image_is_passed_on_without_a_copy() -> None:
    image = Image.new("RGB", (20, 20), (1, 2, 3))
    assert decode_rgb(image, SPEC) is image


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I;16N"])
def test_sixteen_bit_grey_of_either_byte_order_is_scaled(mode: str) -> None:
    # Big-endian TIFFs open as I;16B; Pillow's own convert("RGB") would clip 40000 to 255.
    rgb = decode_rgb(Image.new(mode, (4, 4), 40000), SPEC)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (156, 156, 156)  # 40000 / 257, rounded


def test_float_greyscale_without_a_value_is_black_and_stays_in_range() -> None:
    values = np.array([[np.nan, np.inf, -np.inf, -0.5, 0.0, 0.8, 1.0]], dtype=np.float32)
    grey = np.asarray(decode_rgb(Image.fromarray(values), SPEC))[0, :, 0]
    # No value (NaN, infinities) is black; the 0..1 range is stretched to 0..255, and below 0 is clipped to 0.
    np.testing.assert_array_equal(grey, [0, 0, 0, 0, 0, 204, 255])
    # A peak above 1 means the floats are already on the 0..255 scale.
    above_one = np.array([[2.0, 0.4]], dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(decode_rgb(Image.fromarray(above_one), SPEC))[0, :, 0], [2, 0])


def test_integer_greyscale_past_255_is_taken_as_sixteen_bit_and_clipped() -> None:
    values = np.array([[256, 70000, 0, 51400]], dtype=np.int32)  # 256 is past 8 bits; 70000 past 16
    grey = np.asarray(decode_rgb(Image.fromarray(values), SPEC))[0, :, 0]
    np.testing.assert_array_equal(grey, [1, 255, 0, 200])
    # A peak of 256 is already past 8 bits: the whole image is scaled as 16-bit (256 -> 1), not clipped to 255.
    just_past = np.array([[256, 0]], dtype=np.int32)
    np.testing.assert_array_equal(np.asarray(decode_rgb(Image.fromarray(just_past), SPEC))[0, :, 0], [1, 0])


@pytest.mark.parametrize(("mode", "colour"), [("PA", (0, 0)), ("RGBa", (0, 0, 0, 0)), ("LA", (0, 0))])
def test_every_mode_with_alpha_shows_the_background(mode: str, colour: tuple[int, ...]) -> None:
    # PA (palette + alpha) and RGBa (premultiplied) come from decoders, not from files the tests can write.
    spec = replace(SPEC, background=(0, 128, 255))
    rgb = decode_rgb(Image.new(mode, (4, 4), colour), spec)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (0, 128, 255)


def test_an_mpo_file_is_drafted_like_a_jpeg() -> None:
    # MPO (multi-picture JPEG, as many phone cameras write): the same reduced-scale decode as a JPEG.
    rng = np.random.default_rng(6)
    frames = [Image.fromarray(rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8)) for _ in range(2)]
    buffer = BytesIO()
    frames[0].save(buffer, format="MPO", save_all=True, append_images=frames[1:], quality=90)
    data = buffer.getvalue()
    assert Image.open(BytesIO(data)).format == "MPO"
    spec = Preprocessing(height=300, width=300)
    out = preprocess(data, spec, LIMIT)
    np.testing.assert_array_equal(out, _expected_with_draft(data, spec, (300, 300)))
    assert not np.array_equal(out, _expected_with_draft(data, spec, None))


# Large images: only the rows the resize reads are converted, and what decoding costs is bounded up front.


def _modes_of(rgba: Image.Image) -> dict[str, Image.Image]:
    palette = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    keyed = palette.copy()
    keyed.info["transparency"] = 3
    return {
        "RGB": rgba.convert("RGB"),
        "RGBA": rgba,
        "RGBa": rgba.convert("RGBa"),
        "L": rgba.convert("L"),
        "LA": rgba.convert("LA"),
        "1": rgba.convert("1"),
        "CMYK": rgba.convert("CMYK"),
        "YCbCr": rgba.convert("RGB").convert("YCbCr"),
        "P": palette,
        "P with a transparent index": keyed,
        "PA": rgba.convert("PA"),
    }


@pytest.mark.parametrize("out_size", [(30, 40), (1, 7), (166, 240), (400, 333)])
def test_converting_only_the_rows_the_resize_reads_gives_the_same_values(out_size: tuple[int, int]) -> None:
    rng = np.random.default_rng(11)
    rgba = Image.fromarray(rng.integers(0, 256, (167, 241, 4), dtype=np.uint8), "RGBA")
    background = (0, 128, 255)
    for mode, image in _modes_of(rgba).items():
        whole = resize_bilinear_tf(np.asarray(_to_rgb(image, background), dtype=np.uint8), *out_size)
        np.testing.assert_array_equal(resize_rows_bilinear_tf(image, background, *out_size), whole, err_msg=mode)


def test_a_large_image_is_preprocessed_from_its_rows_with_the_same_values() -> None:
    rng = np.random.default_rng(12)
    side = int(ROWS_ONLY_ABOVE_PIXELS**0.5) + 20
    rgba = Image.fromarray(rng.integers(0, 256, (side, side, 4), dtype=np.uint8), "RGBA")
    spec = Preprocessing(height=300, width=300)
    data = encoded(rgba, "PNG")
    expected = resize_bilinear_tf(np.asarray(_to_rgb(rgba, spec.background), dtype=np.uint8), 300, 300)
    np.testing.assert_array_equal(preprocess(data, spec, LIMIT, max_decode_bytes=64 << 20), expected)


def _truncated(data: bytes) -> bytes:
    """The header and a first slice of the pixels: decoding it fails, reading its header does not."""
    return data[: len(data) // 3]


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "TIFF", "BMP"])  # WebP cannot even be opened truncated: below
def test_an_image_too_costly_to_decode_is_refused_before_a_pixel_is_decoded(fmt: str) -> None:
    rng = np.random.default_rng(13)
    noise = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    image = noise.convert("P") if fmt == "GIF" else noise
    data = _truncated(encoded(image, fmt))
    spec = Preprocessing(height=30, width=40)
    # The limit is read from the header: a truncated file is refused as too costly, not found broken.
    with pytest.raises(ImageTooLarge, match=r"\(MAX_DECODE_BYTES\)"):
        preprocess(data, spec, LIMIT, max_decode_bytes=100_000)
    with pytest.raises(InvalidImage):
        preprocess(data, spec, LIMIT, max_decode_bytes=64 << 20)


def test_a_webp_costs_four_times_its_decoded_size() -> None:
    # libwebp's buffer, the bytes Python gets, and the image (decode-cost-after.md: 63.7 MB for 4 MP of RGB).
    data = encoded(Image.new("RGB", (400, 300), (10, 20, 30)), "WEBP", lossless=True)
    spec = Preprocessing(height=30, width=40)
    cost = 4 * 400 * 300 * 4 + 2 * 30 * 400 * 3  # and the 60 rows the resize reads, in RGB
    assert decode_cost(Image.open(BytesIO(data)), turn=None, out_height=30) == cost
    with pytest.raises(ImageTooLarge, match=r"\(MAX_DECODE_BYTES\)"):
        preprocess(data, spec, LIMIT, max_decode_bytes=cost - 1)
    assert preprocess(data, spec, LIMIT, max_decode_bytes=cost).shape == (30, 40, 3)


def test_a_jpeg_costs_what_it_is_decoded_at_not_its_full_size() -> None:
    rng = np.random.default_rng(14)
    photo = Image.fromarray(rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8))
    spec = Preprocessing(height=300, width=300)
    # 12 MP is 48 MB decoded whole; drafted to 500x375 (1/8), with the rows the resize reads, a JPEG takes 1.3 MB.
    jpeg = preprocess(encoded(photo, "JPEG", quality=80), spec, 40_000_000, max_decode_bytes=2 << 20)
    assert jpeg.shape == (300, 300, 3)
    with pytest.raises(ImageTooLarge, match="Only a JPEG is decoded reduced"):
        preprocess(encoded(photo, "PNG", compress_level=1), spec, 40_000_000, max_decode_bytes=2 << 20)


def test_a_png_turned_by_an_orientation_after_its_pixels_counts_the_turned_copy() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # turned a quarter: exif_transpose makes a turned copy of the decoded image
    noise = np.random.default_rng(15).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    data = encoded(Image.fromarray(noise), "PNG", exif=exif)
    chunks = png_chunks(data)
    assert [c[4:8] for c in chunks].index(b"eXIf") < [c[4:8] for c in chunks].index(b"IDAT")
    exif_chunk = next(c for c in chunks if c[4:8] == b"eXIf")
    rest = [c for c in chunks if c is not exif_chunk]
    after = data[:8] + b"".join([*rest[:-1], exif_chunk, rest[-1]])  # just before IEND
    spec = Preprocessing(height=30, width=40)
    rows = 2 * 30 * 400 * 3
    upright, turned = 400 * 300 * 4 + rows, 2 * 400 * 300 * 4 + rows
    for png in (data, after):  # the chunk ahead of the pixels is read before decoding, the one after them once decoded
        with pytest.raises(ImageTooLarge, match=r"\(MAX_DECODE_BYTES\)"):
            preprocess(png, spec, LIMIT, max_decode_bytes=upright)
        assert preprocess(png, spec, LIMIT, max_decode_bytes=turned).shape == (30, 40, 3)
    with pytest.raises(ImageTooLarge):  # ahead of the pixels: refused before them, so a truncated file too
        preprocess(_truncated(data), spec, LIMIT, max_decode_bytes=upright)


@pytest.mark.parametrize(
    ("fmt", "mode", "options", "megapixels"),
    [
        ("PNG", "RGBA", {"optimize": True}, 8.0),
        ("PNG", "P", {"transparency": 0}, 8.0),
        ("WEBP", "RGB", {"lossless": True}, 3.0),
        ("TIFF", "1", {"compression": "group4"}, 8.0),
        # libjpeg holds a progressive JPEG's coefficients at full size (36 MB here), whatever it decodes at.
        ("JPEG", "RGB", {"progressive": True, "quality": 90}, 12.0),
        # libtiff decodes a compressed single strip into a second whole image.
        ("TIFF", "RGB", {"compression": "tiff_lzw", "strip_size": 1 << 40}, 7.0),
    ],
)
def test_decoding_takes_no_more_memory_than_its_cost_says(
    fmt: str, mode: str, options: dict[str, object], megapixels: float, tmp_path: Path
) -> None:
    # Each image in a fresh process (tests/hostile_files.py): how much its peak RSS grew decoding it. Whole,
    # an 8 MP RGBA PNG took 150 MB (RGBA, background, blend, RGB and numpy's copy) and a palette one 130 MB.
    measured = measure(fmt, mode, options, megapixels, tmp_path)
    assert measured["outcome"] == "decoded", measured
    image = open_image(encoded(flat_image(mode, megapixels), fmt, **options), 40_000_000)
    buffers = decoder_buffers(image)
    if fmt == "JPEG":
        image.draft("RGB", (300, 300))  # as decode() does, after reading what the decoder holds besides
    cost_mb = decode_cost(image, None, 300, buffers) / 1e6
    # Beyond what the cost counts: libpng's and libtiff's buffers, and Python's own.
    assert measured["peak_rss_growth_mb"] <= cost_mb * 1.1 + 12, (measured, cost_mb)


def test_a_very_wide_image_is_resized_without_a_copy_of_its_row_per_output_row() -> None:
    # 2 million pixels in one row: every output row reads that row. Gathered per output row it was copied 64
    # times a band (1.5 GB for a 2.1 KiB PNG); read once, the resize holds about its output.
    src = np.full((1, 2_000_000, 3), 7, dtype=np.uint8)
    assert (peak := _resize_peak(src)) < 3, f"peak {peak:.2f}x the output"


def _png_with_exif(image: Image.Image, exif: bytes) -> bytes:
    return png_with(image, png_chunk(b"eXIf", exif))


@pytest.mark.parametrize("orientation", [0, 9])
def test_an_orientation_that_turns_nothing_costs_nothing_more(orientation: int) -> None:
    # exif_transpose leaves an image with orientation 0 or 9 as it is: no turned copy to count.
    image = Image.new("RGB", (400, 300), (10, 20, 30))
    spec = Preprocessing(height=30, width=40)
    cost = decode_cost(Image.open(BytesIO(_png_with_exif(image, exif_block(1)))), None, 30)
    odd = _png_with_exif(image, exif_block(orientation))
    assert preprocess(odd, spec, LIMIT, max_decode_bytes=cost).shape == (30, 40, 3)
    with pytest.raises(ImageTooLarge):
        preprocess(_png_with_exif(image, exif_block(6)), spec, LIMIT, max_decode_bytes=cost)


def test_a_tall_image_turned_on_its_side_counts_the_rows_it_is_read_by_once_turned(tmp_path: Path) -> None:
    # 300x20000, orientation 6: once turned the resize reads up to 300 rows 20000 pixels wide (18 MB of RGB),
    # not 600 rows 300 wide as the header's own width would say.
    path = tmp_path / "tall.png"
    path.write_bytes(_png_with_exif(Image.new("L", (300, 20000), 90), exif_block(6)))
    measured = decode_in_a_fresh_process(path)
    assert measured["outcome"] == "decoded", measured
    cost_mb = decode_cost(open_image(path.read_bytes(), 40_000_000), Image.Transpose.ROTATE_270, 300) / 1e6
    assert cost_mb > 18 and measured["peak_rss_growth_mb"] <= cost_mb * 1.1 + 12, (measured, cost_mb)


def test_a_large_exif_block_is_not_turned_into_python_objects(tmp_path: Path) -> None:
    # 1.5 million SHORT values beside orientation 6 in a 1x1 PNG (3 MB): ImageOps.exif_transpose wrote the
    # block anew, every value a Python int first (964 MB for 4.9 million); only the pixels are turned now.
    path = tmp_path / "exif.png"
    path.write_bytes(_png_with_exif(Image.new("RGB", (1, 1), (1, 2, 3)), exif_block(6, padding_shorts=1_500_000)))
    measured = decode_in_a_fresh_process(path)
    assert measured["outcome"] == "decoded" and measured["peak_rss_growth_mb"] < 40, measured


def test_an_rle_bmp_counts_the_decoders_two_copies(tmp_path: Path) -> None:
    # Pillow's RLE decoder builds the pixels in a bytearray, then hands over a bytes copy: a 1 KiB file, 48 MB.
    path = tmp_path / "rle.bmp"
    path.write_bytes(rle8_bmp(4000, 4000))
    image = open_image(path.read_bytes(), 40_000_000)
    cost_mb = decode_cost(image, None, 300, decoder_buffers(image)) / 1e6
    measured = decode_in_a_fresh_process(path)
    assert measured["outcome"] == "decoded" and measured["peak_rss_growth_mb"] <= cost_mb * 1.1 + 12, (
        measured,
        cost_mb,
    )


def test_a_gif_frame_larger_than_its_screen_is_refused_before_pillow_fills_it(tmp_path: Path) -> None:
    # 43 bytes: a 1x1 screen, then an 8000x8000 first frame to be disposed of to the background. Opening it
    # filled a 64 MP disposal buffer before the pixel limit was looked at.
    path = tmp_path / "frame.gif"
    path.write_bytes(gif_with_a_large_frame(8000))
    measured = decode_in_a_fresh_process(path)
    assert measured["outcome"] == "413 image_too_large" and measured["peak_rss_growth_mb"] < 8, measured


def test_png_text_chunks_are_read_only_up_to_what_metadata_needs() -> None:
    # Read whole when the file is opened: Pillow allowed 64 Mi characters (253 MB of Python strings for a
    # 260 KiB file of 4-byte characters). XMP metadata of 200 KB still passes.
    spec = Preprocessing(height=30, width=40)
    assert preprocess(png_text(1, 200_000), spec, LIMIT).shape == (30, 40, 3)
    for body in (png_text(1, 300_000), png_text(8, 200_000)):  # past one chunk's 256 KiB, past 1 MiB in all
        with pytest.raises(InvalidImage, match="text chunks"):
            preprocess(body, spec, LIMIT)
