"""Thread pools whose threads carry their names down to the OS.

Python 3.11 names threads for itself only; `top -H`, `ps -L`, /proc and the benchmarks' CPU accounting see
"python" for every thread. With the OS name set, a busy thread shows up as `inference_0` or `decode_1`.
"""

from __future__ import annotations

import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor

from service.memory import LIBC

_PR_SET_NAME = 15  # linux/prctl.h
_LINUX_NAME_BYTES = 15  # the kernel keeps 15 bytes and a NUL


def name_os_thread() -> None:
    """Give the calling OS thread its Python thread's name (Linux; elsewhere nothing happens)."""
    if LIBC is not None:
        name = threading.current_thread().name.encode("ascii", "replace")[:_LINUX_NAME_BYTES]
        LIBC.prctl(_PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)


def named_pool(workers: int, prefix: str) -> ThreadPoolExecutor:
    """A thread pool whose threads are `prefix_0`, `prefix_1`, ... to Python and to the OS alike."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=prefix, initializer=name_os_thread)
