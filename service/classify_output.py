"""What `python -m service.classify` writes: one row per image (CSV or JSON Lines, the service's answer and error
shapes), the paths an earlier run finished (--resume), the progress bar and the summary."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO


@dataclass(frozen=True)
class Row:
    """One image's answer: its classes, best first, with their scores; or its error's code and message."""

    path: str
    ranked: list[tuple[str, float]] = field(default_factory=list)
    code: str = ""
    message: str = ""


class Writer:
    """Rows to `stream`, each flushed as written: an interrupted run leaves every finished row, whole."""

    def __init__(self, stream: TextIO, jsonl: bool, top_k: int | None, header: bool) -> None:
        self._stream = stream
        self._jsonl = jsonl
        self._top_k = top_k
        self._csv = csv.writer(stream, lineterminator="\n")
        if header and not jsonl:
            more = [f"{name}_{i}" for i in range(2, (top_k or 1) + 1) for name in ("class", "score")]
            self._csv.writerow(["path", "class", "score", *more, "error", "message"])

    def write(self, row: Row) -> None:
        if self._jsonl:
            self._stream.write(json.dumps(self._json(row), ensure_ascii=True) + "\n")
        else:
            width = 2 * (self._top_k or 1)
            scored = [value for label, score in row.ranked for value in (label, repr(score))]
            self._csv.writerow([row.path, *scored, *[""] * (width - len(scored)), row.code, row.message])
        self._stream.flush()

    def _json(self, row: Row) -> dict[str, object]:
        if row.code:
            return {"path": row.path, "error": {"code": row.code, "message": row.message}}
        label, score = row.ranked[0]
        body: dict[str, object] = {"path": row.path, "class": label, "score": score}
        if self._top_k is not None:
            body["top_k"] = [{"class": c, "score": s} for c, s in row.ranked]
        return body


def finished(out: Path, jsonl: bool) -> tuple[set[str], bool]:
    """The paths `out` has rows for, and whether it has any content (a header) already. A last line cut short
    (the process killed mid-write) is cut off, so that its image is classified again."""
    if not out.exists():
        return set(), False
    with out.open("r+b") as file:
        data = file.read()
        whole = data.rfind(b"\n") + 1
        if whole < len(data):
            file.truncate(whole)
    lines = data[:whole].decode("utf-8", "surrogateescape").splitlines()
    if jsonl:
        return {json.loads(line)["path"] for line in lines if line.strip()}, bool(lines)
    return {row[0] for row in list(csv.reader(lines))[1:] if row}, bool(lines)


class Tally:
    """Counts for the progress bar and the summary; draws the bar on `bar` (a terminal) at most 5 times a second."""

    def __init__(self, bar: TextIO | None) -> None:
        self.classified = 0
        self.failed: Counter[str] = Counter()
        self.skipped = 0
        self.resumed = 0  # paths the output has rows for already (--resume); counted by the reader thread
        self.total: int | None = None  # files to look at, once a count of them is done (for the time left)
        self._bar = bar
        self._started = time.monotonic()
        self._drawn = 0.0

    @property
    def seen(self) -> int:
        return self.classified + sum(self.failed.values()) + self.skipped + self.resumed

    @property
    def bar_shown(self) -> bool:
        return self._bar is not None

    def add(self, row: Row) -> None:
        if row.code:
            self.failed[row.code] += 1
        else:
            self.classified += 1
        self.draw()

    def skip(self) -> None:
        self.skipped += 1
        self.draw()

    def rate(self) -> float:
        images = self.classified + sum(self.failed.values())
        return images / max(time.monotonic() - self._started, 1e-9)

    def draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._bar is None or (now - self._drawn < 0.2 and not force):
            return
        self._drawn = now
        files = self.seen / max(now - self._started, 1e-9)
        done = f"{self.seen}/{self.total} files" if self.total else f"{self.seen} files"
        left = f", {_duration(max(self.total - self.seen, 0) / files)} left" if self.total and files else ""
        width = 30
        filled = min(width, width * self.seen // self.total) if self.total else 0
        bar = f"[{'#' * filled}{'.' * (width - filled)}] " if self.total else ""
        images = self.classified + sum(self.failed.values())
        self._bar.write(f"\r{bar}{done}, {images} images, {self.rate():.1f} images/s{left}\033[K")
        self._bar.flush()

    def summary(self, interrupted: bool) -> str:
        if self._bar is not None:
            self._bar.write("\r\033[K")
        failed = sum(self.failed.values())
        seconds = time.monotonic() - self._started
        line = f"classified {self.classified} of {self.classified + failed} images in {seconds:.1f} s"
        line += f" ({self.rate():.1f} images/s)"
        if failed:
            line += f"; {failed} failed (" + ", ".join(f"{n} {code}" for code, n in self.failed.most_common()) + ")"
        line += f"; {self.skipped} other files skipped" if self.skipped else ""
        line += f"; {self.resumed} already in the output" if self.resumed else ""
        return line + ("; interrupted: --resume finishes the rest" if interrupted else "")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def open_output(out: Path | None, append: bool) -> TextIO:
    """The output stream; a file name's bytes survive as they are (surrogateescape), whatever the locale."""
    if out is None:
        stream = sys.stdout
        assert isinstance(stream, io.TextIOWrapper)
        stream.reconfigure(errors="surrogateescape", newline="")
        return stream
    return open(out, "a" if append else "w", encoding="utf-8", errors="surrogateescape", newline="")  # noqa: SIM115


def is_terminal(stream: TextIO) -> bool:
    try:
        return os.isatty(stream.fileno())
    except (OSError, ValueError):
        return False
