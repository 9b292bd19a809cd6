"""What `python -m service.classify` reads: the paths it is given, folders walked in order, and each file's bytes
if they are an image in a format the service takes (recognised by its bytes, as the service does)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from PIL import Image

from service.errors import PayloadTooLarge
from service.imaging import FORMATS

UNREADABLE = "unreadable"  # a file the operating system would not let us read: no service code fits it
# Pillow's own signature checks for the formats the service takes: the first 16 bytes are what it passes them.
HEAD_BYTES = 16


@dataclass(frozen=True)
class Item:
    """One file: its image bytes, or why it gave none (an error row); `skipped` for a file that is no image."""

    path: str
    data: bytes | None = None
    code: str = ""
    message: str = ""
    skipped: bool = False


def _acceptors() -> list[object]:
    Image.init()  # registers every plugin, WebP and TIFF among them, not only the common five
    return [Image.OPEN[name][1] for name in FORMATS if name in Image.OPEN]


def looks_like_image(head: bytes, acceptors: list[object]) -> bool:
    return any(callable(accept) and accept(head) for accept in acceptors)


def paths(arguments: Iterable[str]) -> Iterator[str | Item]:
    """Every file named or under a folder named, in the order given (a folder's entries by name); `-` reads
    paths from standard input, one a line. A folder reached twice (a symlink loop) is walked once; one that
    cannot be listed is an error row."""
    seen: set[tuple[int, int]] = set()
    for argument in arguments:
        if argument == "-":
            for line in sys.stdin:
                if line.rstrip("\n"):
                    yield from _walk(line.rstrip("\n"), seen)
        else:
            yield from _walk(argument, seen)


def _walk(path: str, seen: set[tuple[int, int]]) -> Iterator[str | Item]:
    try:
        status = os.stat(path)
    except OSError:
        yield path  # reading it gives the reason as an error row (a broken symlink, a loop of links)
        return
    if not os.path.isdir(path):
        yield path
        return
    key = (status.st_dev, status.st_ino)
    if key in seen:
        return
    seen.add(key)
    try:
        names = sorted(os.listdir(path))
    except OSError as exc:
        yield Item(path, code=UNREADABLE, message=f"cannot list the folder: {exc.strerror or exc}")
        return
    for name in names:
        yield from _walk(os.path.join(path, name), seen)


def read(path: str, max_bytes: int, acceptors: list[object]) -> Item:
    """The file's bytes if it is an image of at most `max_bytes` (MAX_UPLOAD_BYTES, as an upload)."""
    too_large = Item(
        path, code=PayloadTooLarge.code, message=f"the file is larger than {max_bytes:,} bytes (MAX_UPLOAD_BYTES)"
    )
    try:
        with open(path, "rb") as file:
            head = file.read(HEAD_BYTES)
            if not looks_like_image(head, acceptors):
                return Item(path, skipped=True)
            # By its size first: read(n) would allocate all n bytes (MAX_UPLOAD_BYTES) for every file.
            if os.fstat(file.fileno()).st_size > max_bytes:
                return too_large
            file.seek(0)
            data = file.read()
    except OSError as exc:
        return Item(path, code=UNREADABLE, message=f"cannot read the file: {exc.strerror or exc}")
    return too_large if len(data) > max_bytes else Item(path, data)  # larger: it grew while being read


class Reader:
    """The next file to classify, one call at a time (in one thread: it advances the walk): paths already done
    (--resume) are passed over unread and counted."""

    def __init__(self, arguments: Iterable[str], done: set[str], max_bytes: int) -> None:
        self._paths = paths(arguments)
        self._done = done
        self._max_bytes = max_bytes
        self._acceptors = _acceptors()
        self.resumed = 0

    def next(self) -> Item | None:
        for entry in self._paths:
            if isinstance(entry, Item):
                return entry
            if entry in self._done:
                self.resumed += 1
                continue
            return read(entry, self._max_bytes, self._acceptors)
        return None
