"""How a request waits for its images' answers: its deadline, its client leaving, and (several images) one
image's failure each fail the request's jobs themselves, so the request awaits only its jobs' futures and is
woken straight from the run that answers them (no watcher task and no asyncio.wait between the two)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from service.deadline import Deadline
from service.errors import ClientDisconnected, ServiceError

Gone = Callable[[], Awaitable[None]]
"""Returns once the client has gone."""

Answer = asyncio.Future["np.ndarray | ServiceError"]


def _fail(futures: Sequence[Answer], error: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(error)


async def answers(futures: Sequence[Answer], deadline: Deadline, gone: Gone | None) -> list[np.ndarray | ServiceError]:
    """Each future's result in order: 504 past `deadline`, 499 as soon as `gone()` completes, and with several
    images the first failure of any of them (an image's own ServiceError, such as undecodable, is its result)."""
    loop = asyncio.get_running_loop()
    timer = loop.call_later(max(deadline.remaining(), 0), _fail, futures, deadline.exceeded())
    watcher = asyncio.ensure_future(gone()) if gone is not None else None
    if watcher is not None:
        left = ClientDisconnected("the client closed the connection before the answer")
        watcher.add_done_callback(lambda _: _fail(futures, left))

    def spread(future: asyncio.Future[Any]) -> None:
        error = None if future.cancelled() else future.exception()
        if error is not None:
            _fail(futures, error)

    if len(futures) > 1:
        for future in futures:
            future.add_done_callback(spread)
    try:
        return [await future for future in futures]
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.cancel()
        # Synchronously, before any worker runs again: a job nobody waits for is skipped, not computed. And a
        # job already failed (the deadline fails them all) counts as seen: asyncio logs no error for it.
        for future in futures:
            future.cancel()
