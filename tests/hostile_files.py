"""Image files built byte by byte to cost a decoder the most for their size, and a way to see what one costs.

Each hostile file is one a review session of service/imaging.py found (tests/test_structure.py,
tests/test_imaging.py). `decode_in_a_fresh_process` preprocesses a file with the service's default limits in a
Python process of its own that has imported and warmed the decoder: the growth of its peak RSS (`VmHWM`) is
what the file cost, nothing else.
"""

from __future__ import annotations

import io
import json
import math
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, sys, time
from pathlib import Path
from service.imaging import preprocess, warm_up
from service.errors import ServiceError
from service.manifest import Manifest
from service.settings import Settings
settings = Settings.from_env({})
spec = Manifest.read(Path("artifacts")).preprocessing
limits = {"max_decode_bytes": settings.max_decode_bytes} if hasattr(settings, "max_decode_bytes") else {}
warm_up()
data = Path(sys.argv[1]).read_bytes()
def high_water_kib():
    # VmHWM, not ru_maxrss: Linux carries a parent's ru_maxrss into the child it forks and execs.
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1])
before = high_water_kib()
started = time.perf_counter()
try:
    preprocess(data, spec, settings.max_image_pixels, **limits)
    outcome = "decoded"
except ServiceError as exc:
    outcome = f"{exc.status_code} {exc.code}"
seconds = time.perf_counter() - started
after = high_water_kib()
growth_mb = round((after - before) / 1024, 1)
print(json.dumps({"outcome": outcome, "ms": round(seconds * 1000, 1), "peak_rss_growth_mb": growth_mb}))
"""


def encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_chunks(data: bytes) -> list[bytes]:
    """A PNG's chunks after its signature, each whole (length, type, data, CRC)."""
    chunks, at = [], 8
    while at < len(data):
        length = int.from_bytes(data[at : at + 4], "big")
        chunks.append(data[at : at + 12 + length])
        at += 12 + length
    return chunks


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def png_with(image: Image.Image, *chunks: bytes) -> bytes:
    """`image` as a PNG with `chunks` right after IHDR."""
    data = encoded(image, "PNG")
    parts = png_chunks(data)
    return data[:8] + parts[0] + b"".join(chunks) + b"".join(parts[1:])


def exif_block(orientation: int, padding_shorts: int = 0) -> bytes:
    """A big-endian EXIF block: the orientation, and optionally one private tag of that many SHORT values."""
    entries = [(0x0112, 3, 1, orientation << 16)]
    if padding_shorts:
        entries.append((0xC000, 3, padding_shorts, 8 + 2 + 12 * 2 + 4))
    ifd = len(entries).to_bytes(2, "big") + b"".join(
        tag.to_bytes(2, "big") + kind.to_bytes(2, "big") + count.to_bytes(4, "big") + value.to_bytes(4, "big")
        for tag, kind, count, value in entries
    )
    return b"MM\x00\x2a\x00\x00\x00\x08" + ifd + b"\x00" * 4 + b"\x01\x2c" * padding_shorts


def png_text(chunks: int, characters: int, character: str = "a") -> bytes:
    """A 1x1 PNG with `chunks` compressed iTXt chunks of `characters` characters each."""
    text = zlib.compress((character * characters).encode(), 9)
    return png_with(
        Image.new("RGB", (1, 1)),
        *(png_chunk(b"iTXt", f"k{i}".encode() + b"\x00\x01\x00\x00\x00" + text) for i in range(chunks)),
    )


def rle8_bmp(width: int, height: int) -> bytes:
    """An 8-bit RLE BMP of zeros: delta escapes of 255 rows each, then the end of the bitmap."""
    rows, data = height, b""
    while rows > 0:
        data += b"\x00\x02\x00" + bytes([min(rows, 255)])
        rows -= 255
    data += b"\x00\x01"
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(data), 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(data), 0, 0, offset) + info + palette + data


def gif_with_a_large_frame(side: int) -> bytes:
    """A 1x1 GIF screen whose first frame is side x side, to be disposed of to the background."""
    control = b"\x21\xf9\x04\x08\x00\x00\x00\x00"  # disposal 2: restore to the background
    frame = b"\x2c" + struct.pack("<HHHH", 0, 0, side, side) + b"\x00"
    screen = struct.pack("<HH", 1, 1) + b"\x80\x00\x00" + b"\x00" * 6
    return b"GIF89a" + screen + control + frame + b"\x02\x02\x4c\x01\x00\x3b"


def _tiff(entries: list[tuple[int, int, int, int]], tail: bytes) -> bytes:
    """A little-endian TIFF: one directory of (tag, type, count, value) right after the header, then `tail`."""
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\x00" * 4
    return b"II*\x00" + struct.pack("<I", 8) + ifd + tail


def tiff_in_one_tile(tile: int, side: int = 16) -> bytes:
    """A side x side greyscale TIFF in one deflate tile of tile x tile pixels."""
    data = zlib.compress(bytes(tile * tile), 9)
    start = 8 + 2 + 12 * 10 + 4
    tags = [(256, 3, 1, side), (257, 3, 1, side), (258, 3, 1, 8), (259, 3, 1, 8), (262, 3, 1, 1), (277, 3, 1, 1)]
    tags += [(322, 3, 1, tile), (323, 3, 1, tile), (324, 4, 1, start), (325, 4, 1, len(data))]
    return _tiff(tags, data)


def tiff_with_strips(strips: int, side: int = 16) -> bytes:
    """An uncompressed side x side greyscale TIFF whose StripOffsets list `strips` entries (all the same row)."""
    pixels = 8 + 2 + 12 * 9 + 4
    offsets = pixels + side * side
    counts = offsets + 2 * strips
    tags = [(256, 3, 1, side), (257, 3, 1, side), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1)]
    tags += [(273, 3, strips, offsets), (277, 3, 1, 1), (278, 3, 1, 1), (279, 3, strips, counts)]
    return _tiff(
        tags,
        bytes(side * side)
        + struct.pack(f"<{strips}H", *[pixels] * strips)
        + struct.pack(f"<{strips}H", *[side] * strips),
    )


def _segment(marker: int, payload: bytes) -> bytes:
    return b"\xff" + bytes([marker]) + struct.pack(">H", len(payload) + 2) + payload


def _one_code_table(kind: int, table: int, symbol: int) -> bytes:
    """A Huffman table whose only code is one bit long, for `symbol`."""
    return _segment(0xC4, bytes([(kind << 4) | table]) + bytes([1] + [0] * 15) + bytes([symbol]))


def _bits(values: list[tuple[int, int]]) -> bytes:
    """(value, bit count) pairs as entropy-coded data: 0xFF stuffed with 0x00, padded with ones."""
    out, acc, count = bytearray(), 0, 0
    for value, bits in [*values, (0x7F, 7)]:
        for i in range(bits - 1, -1, -1):
            acc, count = (acc << 1) | ((value >> i) & 1), count + 1
            if count == 8:
                out += b"\xff\x00" if acc == 0xFF else bytes([acc])
                acc, count = 0, 0
    return bytes(out)


def jpeg_with_scans(width: int, height: int, scans: int) -> bytes:
    """A grey progressive JPEG: its DC scan, then the same empty AC scan `scans` times (libjpeg decodes each)."""
    blocks = -(-width // 8) * -(-height // 8)
    head = b"\xff\xd8" + _segment(0xDB, b"\x00" + bytes([1] * 64))
    head += _segment(0xC2, struct.pack(">BHHB", 8, height, width, 1) + bytes([1, 0x11, 0]))
    head += _one_code_table(0, 0, 0) + _one_code_table(1, 0, 0xE0)
    dc = _segment(0xDA, bytes([1, 1, 0x00, 0, 0, 0])) + _bits([(0, 1)] * blocks)
    ac = _segment(0xDA, bytes([1, 1, 0x00, 1, 63, 0])) + _bits([(0, 1), (0x3FFF, 14)] * -(-blocks // 32767))
    return head + dc + ac * scans + b"\xff\xd9"


def jpeg_in_component_scans(width: int, height: int) -> bytes:
    """A baseline (SOF0) colour JPEG of zeros whose three components come in three scans, not interleaved."""
    blocks = -(-width // 8) * -(-height // 8)
    head = b"\xff\xd8" + _segment(0xDB, b"\x00" + bytes([1] * 64))
    head += _segment(0xC0, struct.pack(">BHHB", 8, height, width, 3) + bytes([1, 0x11, 0, 2, 0x11, 0, 3, 0x11, 0]))
    head += _one_code_table(0, 0, 0) + _one_code_table(1, 0, 0)
    scans = b"".join(
        _segment(0xDA, bytes([1, component, 0x00, 0, 63, 0])) + _bits([(0, 2)] * blocks) for component in (1, 2, 3)
    )
    return head + scans + b"\xff\xd9"


def gif_with_comment_blocks(blocks: int) -> bytes:
    """A 1x1 GIF with one comment extension of `blocks` two-byte sub-blocks ahead of its frame."""
    screen = struct.pack("<HH", 1, 1) + b"\x80\x00\x00" + b"\x00" * 6
    comment = b"\x21\xfe" + b"\x02ab" * blocks + b"\x00"
    frame = b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1) + b"\x00" + b"\x02\x02\x4c\x01\x00"
    return b"GIF89a" + screen + comment + frame + b"\x3b"


def png_with_private_chunks(chunks: int) -> bytes:
    """A 1x1 PNG with `chunks` empty private chunks ahead of its pixels."""
    return png_with(Image.new("RGB", (1, 1)), png_chunk(b"prIv", b"") * chunks)


def flat_image(mode: str, megapixels: float) -> Image.Image:
    """One colour over the whole frame (4:3): compresses to almost nothing, decodes to its full size."""
    width = round(math.sqrt(megapixels * 1e6 * 4 / 3))
    height = round(megapixels * 1e6 / width)
    colour: Any = {"RGB": (10, 200, 30), "RGBA": (10, 200, 30, 128), "1": 1}.get(mode, 100)
    return Image.new(mode, (width, height), colour)


def decode_in_a_fresh_process(path: Path) -> dict[str, Any]:
    """The outcome of preprocessing the file at `path` with the default limits, its time, its peak RSS growth."""
    child = subprocess.run([sys.executable, "-c", CHILD, str(path)], cwd=ROOT, capture_output=True, text=True)
    if child.returncode != 0:  # killed for its memory, or an error the service would have answered 500
        return {"outcome": f"process failed ({child.returncode}): {child.stderr.strip()[-200:]}", "ms": None}
    result: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    return result


def measure(fmt: str, mode: str, options: dict[str, Any], megapixels: float, work: Path) -> dict[str, Any]:
    buffer = io.BytesIO()
    image = flat_image(mode, megapixels)
    image.save(buffer, format=fmt, **options)
    path = work / f"{fmt}-{mode}-{megapixels}.img"
    path.write_bytes(buffer.getvalue())
    return {
        "format": fmt,
        "mode": mode,
        "size": f"{image.width}x{image.height}",
        "megapixels": megapixels,
        "upload_kib": round(len(buffer.getvalue()) / 1024, 1),
        **decode_in_a_fresh_process(path),
    }
