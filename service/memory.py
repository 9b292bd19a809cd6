"""The process's C library, and its heap (glibc malloc): how many arenas it keeps, freed pages handed back."""

from __future__ import annotations

import ctypes
import os
import sys

_M_ARENA_MAX = -8  # malloc.h


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        # The process's own symbols, libc's among them. find_library("c") would run `ldconfig -p` in a
        # subprocess at import, on the path to the first answer.
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


LIBC = _libc()
"""The C library this process runs on (Linux), loaded once; None elsewhere."""


def limit_arenas(count: int) -> bool:
    """Let the threads allocated from here on share `count` malloc arenas; whether this libc took the setting.
    An arena count already set in the environment (glibc's MALLOC_ARENA_MAX, or glibc.malloc.arena_max in
    GLIBC_TUNABLES) is the operator's choice, applied by glibc at start-up: it is kept, and this returns False.

    By default glibc gives each new thread its own arena, up to 8 per core, and each keeps what was freed in
    it. A lone image is decoded on an inference thread and a queued one on a decode thread, so each of those
    threads' arenas held a decoding's worth of freed buffers: peak RSS at 2 clients 198.6 MB with them, 179.0
    with one arena, 171.1 before lone images were decoded there (benchmarks/results/sweep-fast-lone-arenas.md).
    Call before the threads start: a thread keeps the arena it was given.
    """
    if "MALLOC_ARENA_MAX" in os.environ or "glibc.malloc.arena_max=" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    mallopt = getattr(LIBC, "mallopt", None)
    return bool(mallopt is not None and mallopt(_M_ARENA_MAX, count) == 1)


def trim_heap() -> None:
    """Return the heap's free pages to the system (glibc's malloc_trim). Building a session leaves the graph
    optimizer's temporaries freed but kept by glibc: trimming after the startup load took 2.4 ms and 15 MB
    off the resident set (105.9 -> 90.6 MB, the committed artifact)."""
    trim = getattr(LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)
