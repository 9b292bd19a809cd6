"""One request's record: its ID, the model that answered, and when each stage of its path began and ended.

Made by the outermost middleware (service/observe.py) and reached through a context variable by whatever runs
in the request's task (the data plane, the error renderers); the scheduler carries it with the request's jobs
into the decode and inference threads, which write their stages' times. The access log line and the trace
spans are made from it once the answer has gone out, so the request's path pays a few clock reads, no more.
"""

from __future__ import annotations

import os
import time
from contextvars import ContextVar
from dataclasses import dataclass

MAX_ID_LENGTH = 128


def sane_id(value: str) -> bool:
    """A client's request ID worth keeping: printable ASCII, at most MAX_ID_LENGTH characters."""
    return 0 < len(value) <= MAX_ID_LENGTH and value.isascii() and value.isprintable()


def new_id() -> str:
    return os.urandom(16).hex()


def header_text(text: str) -> str:
    """`text` as a header value may carry it: printable ASCII, anything else a `?`."""
    return "".join(c if c.isascii() and c.isprintable() else "?" for c in text)


@dataclass(slots=True, eq=False)
class RequestRecord:
    id: str
    started: float = 0.0  # time.perf_counter(), as every time below
    model: str = ""  # the model that answered, as the X-Model header names it
    read_start: float = 0.0  # the body: from its first read to its last byte (0: no body)
    read_end: float = 0.0
    queued: float = 0.0  # the images handed to the scheduler (0: none were)
    decode_start: float = 0.0  # the first image's decoding began; the last one's ended
    decode_end: float = 0.0
    decode_s: float = 0.0  # every image's decoding, added up
    engine_start: float = 0.0  # the first engine run with one of its images began; the last one ended
    engine_end: float = 0.0
    engine_s: float = 0.0
    answered: float = 0.0  # the scheduler's answers are in
    images: int = 0
    bytes_in: int = 0
    error: str = ""  # the code of the error that answered it

    def decoded(self, start: float, end: float) -> None:
        if not self.decode_start:
            self.decode_start = start
        self.decode_end = max(self.decode_end, end)
        self.decode_s += end - start

    def ran(self, start: float, end: float) -> None:
        if not self.engine_start:
            self.engine_start = start
        self.engine_end = max(self.engine_end, end)
        self.engine_s += end - start

    @property
    def read_s(self) -> float:
        return self.read_end - self.read_start

    @property
    def queue_s(self) -> float:
        """Time its images waited: queued to answered, less their decoding and engine runs."""
        if not self.queued or not self.answered:
            return 0.0
        return max(0.0, self.answered - self.queued - self.decode_s - self.engine_s)


current: ContextVar[RequestRecord | None] = ContextVar("request", default=None)


def current_id() -> str | None:
    record = current.get()
    return record.id if record is not None else None


def start(request_id: str | None) -> RequestRecord:
    """A record for a request that arrives now, under the client's ID if it is sane."""
    record = RequestRecord(request_id if request_id is not None and sane_id(request_id) else new_id())
    record.started = time.perf_counter()
    current.set(record)  # the request's own task: the variable goes with it
    return record
