"""A file's structure, counted from its bytes before Pillow opens it (service/structure.py), and what the cost
of decoding makes of it (service/imaging.py). Each hostile file is one a review session found: it cost
100 MB to 1 GB, or seconds of CPU, before these checks (docs/security.md, "What one image costs to decode")."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from service import structure
from service.errors import ImageTooLarge, InvalidImage
from service.imaging import preprocess
from service.manifest import Preprocessing
from tests.hostile_files import (
    gif_with_comment_blocks,
    jpeg_in_component_scans,
    jpeg_with_scans,
    png_with_private_chunks,
    tiff_in_one_tile,
    tiff_with_strips,
)

SPEC = Preprocessing(height=30, width=40)
PIXELS = 40_000_000


@pytest.mark.parametrize(
    ("make", "fine", "hostile", "message"),
    [
        (jpeg_with_scans, (64, 48, 10), (64, 48, 64), "65 scans"),  # its DC scan and 64 AC ones
        (tiff_with_strips, (16,), (70_000,), "70,000 strips or tiles"),
        (gif_with_comment_blocks, (100,), (5_000,), "extension blocks ahead of its first frame"),
        (png_with_private_chunks, (100,), (1_100,), "chunks ahead of its pixels"),
    ],
)
def test_a_file_whose_structure_a_decoder_would_walk_at_length_is_refused_unopened(
    make: object, fine: tuple[int, ...], hostile: tuple[int, ...], message: str
) -> None:
    assert callable(make)
    assert preprocess(make(*fine), SPEC, PIXELS).shape == (30, 40, 3)
    with pytest.raises(InvalidImage, match=message):
        preprocess(make(*hostile), SPEC, PIXELS)


def test_a_jpeg_in_several_scans_counts_its_coefficients_at_full_size() -> None:
    # A baseline JPEG with a scan per component: libjpeg keeps every coefficient (2 bytes each, 3 components)
    # whatever scale it decodes at, as for a progressive one. 2000x1500: 18 MB; drafted to 1/4 it decodes into 0.4.
    limit = 8 << 20
    interleaved = io.BytesIO()
    Image.new("RGB", (2000, 1500), (10, 20, 30)).save(interleaved, "JPEG")
    assert structure.jpeg_scans(interleaved.getvalue()) == 1
    assert preprocess(interleaved.getvalue(), SPEC, PIXELS, max_decode_bytes=limit).shape == (30, 40, 3)
    separate = jpeg_in_component_scans(2000, 1500)
    assert structure.jpeg_scans(separate) == 3
    with pytest.raises(ImageTooLarge, match="MAX_DECODE_BYTES"):
        preprocess(separate, SPEC, PIXELS, max_decode_bytes=limit)
    assert preprocess(separate, SPEC, PIXELS, max_decode_bytes=64 << 20).shape == (30, 40, 3)


def test_a_tiff_tile_larger_than_its_image_counts_whole() -> None:
    # libtiff decodes a compressed tile whole into its own buffer: 16x16 pixels in a 4096x4096 tile take 16 MB.
    with pytest.raises(ImageTooLarge, match="MAX_DECODE_BYTES"):
        preprocess(tiff_in_one_tile(4096), SPEC, PIXELS, max_decode_bytes=8 << 20)
    assert preprocess(tiff_in_one_tile(4096), SPEC, PIXELS, max_decode_bytes=32 << 20).shape == (30, 40, 3)


def test_the_scans_counted_are_the_first_images_only() -> None:
    # An MPO holds a JPEG per picture after the first one's end; a thumbnail ahead of the first scan is skipped.
    frames = [Image.new("RGB", (64, 48), colour) for colour in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    mpo = io.BytesIO()
    frames[0].save(mpo, "MPO", save_all=True, append_images=frames[1:])
    assert mpo.getvalue().count(b"\xff\xda") == 3
    assert structure.jpeg_scans(mpo.getvalue()) == 1
    progressive = io.BytesIO()
    frames[0].save(progressive, "JPEG", progressive=True)
    assert structure.jpeg_scans(progressive.getvalue()) > 1


def test_truncated_or_odd_structures_are_left_to_pillow_to_name() -> None:
    for data in (b"\xff\xd8\xff", b"\xff\xd8\x00\x00\x00", b"II*\x00\xff\xff\xff\x7f", b"MM\x00+\x00\x08", b"GIF89a"):
        assert structure.check(data) == 0
        with pytest.raises(InvalidImage):
            preprocess(data, SPEC, PIXELS)
