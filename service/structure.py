"""What an image file's structure asks of a decoder, read from its bytes before Pillow opens it.

Pillow walks some structures whole while it opens a file, before any size is known to check: a GIF's
extension blocks, a PNG's chunks ahead of its pixels, a TIFF's strip or tile offsets (one Python tuple each).
And libjpeg decodes every scan of a JPEG, however many repeat the same coefficients. A few KiB to 10 MiB of
such structure took 100-640 MB or seconds of CPU (docs/security.md, "What one image costs to decode"); real
files have a handful of each. Counted here from the bytes, without decoding; a file past a bound is refused.
"""

from __future__ import annotations

import struct

import numpy as np

from service.errors import InvalidImage

MAX_JPEG_SCANS = 64  # libjpeg's progressive scripts use about 10; each scan is decoded over the whole image
MAX_TIFF_PARTS = 65_536  # strips or tiles: 8 KiB strips of a 40 MP RGB image are 15,000
MAX_GIF_BLOCKS = 4_096  # extension sub-blocks ahead of the first frame
MAX_PNG_CHUNKS = 1_024  # chunks ahead of the first IDAT
_TIFF_PART_TAGS = (273, 279, 324, 325)  # StripOffsets, StripByteCounts, TileOffsets, TileByteCounts


def check(data: bytes) -> int:
    """Refuse a file whose structure would cost a decoder far more than its pixels; for a JPEG, return its number
    of scans (more than one: libjpeg keeps every coefficient at full size), else 0."""
    if data.startswith(b"\xff\xd8"):
        scans = jpeg_scans(data)
        _bound(scans, MAX_JPEG_SCANS, "JPEG", "scans")
        return scans
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        _bound(_png_chunks_before_pixels(data), MAX_PNG_CHUNKS, "PNG", "chunks ahead of its pixels")
    elif data.startswith(b"GIF8"):
        _bound(_gif_blocks_before_frame(data), MAX_GIF_BLOCKS, "GIF", "extension blocks ahead of its first frame")
    elif data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        _bound(_tiff_parts(data), MAX_TIFF_PARTS, "TIFF", "strips or tiles")
    return 0


def _bound(count: int, most: int, kind: str, what: str) -> None:
    if count > most:
        raise InvalidImage(f"the {kind} has {count:,} {what}; the service reads at most {most:,}")


def jpeg_scans(data: bytes) -> int:
    """Start-of-scan markers of the first image (an MPO holds more after it). Within entropy-coded data 0xFF is
    always followed by 0x00 or a restart marker, so from the first scan on, every FF DA starts one and FF D9
    ends the image; before it, segments such as an EXIF thumbnail may hold any bytes, so they are skipped. The
    rare segment between two scans is read through: at worst a table holding FF DA counts a scan too many."""
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return 0  # not a marker where one must be: Pillow will say what is wrong
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0xDA:
            # What follows each 0xFF from here, up to the first end of image: numpy finds the few thousand 0xFF
            # bytes of a photo in a tenth of the time bytes.count and bytes.find take for two-byte markers.
            codes = np.frombuffer(data, dtype=np.uint8, offset=at)
            following = codes[np.flatnonzero(codes[:-1] == 0xFF) + 1]
            ends = np.flatnonzero(following == 0xD9)
            return int(np.count_nonzero(following[: ends[0] if len(ends) else len(following)] == 0xDA))
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            at += 2
            continue
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return 0


def _png_chunks_before_pixels(data: bytes) -> int:
    count, at = 0, 8
    while at + 8 <= len(data) and data[at + 4 : at + 8] != b"IDAT":
        count += 1
        if count > MAX_PNG_CHUNKS:
            break
        at += 12 + int.from_bytes(data[at : at + 4], "big")
    return count


def _gif_blocks_before_frame(data: bytes) -> int:
    if len(data) < 13:
        return 0
    flags = data[10]
    at = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # the global colour table
    count = 0
    while at + 2 <= len(data) and data[at] == 0x21:  # an extension: a label, then sub-blocks up to an empty one
        at += 2
        while at < len(data) and data[at]:
            count += 1
            if count > MAX_GIF_BLOCKS:
                return count
            at += 1 + data[at]
        at += 1
    return count


def _tiff_parts(data: bytes) -> int:
    """The most entries of the first directory's strip and tile tags (classic TIFF and BigTIFF)."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    try:
        if big:
            (ifd,) = struct.unpack_from(order + "Q", data, 8)
            (entries,) = struct.unpack_from(order + "Q", data, ifd)
            first, size, layout = ifd + 8, 20, order + "HHQ"
        else:
            (ifd,) = struct.unpack_from(order + "I", data, 4)
            (entries,) = struct.unpack_from(order + "H", data, ifd)
            first, size, layout = ifd + 2, 12, order + "HHI"
        most = 0
        for i in range(min(entries, (len(data) - first) // size)):
            tag, _, count = struct.unpack_from(layout, data, first + i * size)
            if tag in _TIFF_PART_TAGS:
                most = max(most, count)
        return most
    except struct.error:  # a directory past the end: Pillow will say what is wrong
        return 0
