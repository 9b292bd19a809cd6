"""The decode stage: DECODE_THREADS tasks take the scheduler's queue in order and decode each image (in the
decode threads, never on the event loop) just ahead of the engine, into the workers' small ready queue.

The cores never wait for a decoding (it overlaps the runs), yet the queue holds encoded bytes rather than a
megabyte of float32 pixels per waiting image, and an image whose client left or whose deadline passed while it
waited is never decoded. Decoding when a worker takes the image, with no overlap, answered 0.84-0.88x as many
requests under load.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from service.errors import DeadlineExceeded, ServiceError
from service.threads import named_pool

if TYPE_CHECKING:
    from service.scheduler import Job

log = logging.getLogger("service.scheduler")  # a part of the scheduler, logged as such


def expired(job: Job, now: float) -> bool:
    """Whether `job` is not to run at `now` (time.monotonic()): it has its answer already, nobody waits, or
    (then failed 504) its deadline passed while it waited."""
    if job.future.done():  # failed where it waited (deadline, client gone), or nobody waits
        return True
    if now > job.deadline:
        job.future.set_exception(DeadlineExceeded("the request expired in the queue"))
        return True
    return False


class DecodeStage:
    def __init__(
        self,
        decoders: int,
        queue: asyncio.Queue[Job],
        ready: asyncio.Queue[Job],
        on_change: Callable[[], None],
    ) -> None:
        self._decoders = decoders
        self._queue = queue
        self._ready = ready
        self._on_change = on_change
        self._pool = named_pool(decoders, "decode")
        self.decoding = 0  # images a decoder has taken from the queue and not yet handed to a worker

    def start(self) -> list[asyncio.Task[None]]:
        return [asyncio.create_task(self._decode(), name=f"decoder-{i}") for i in range(self._decoders)]

    async def _decode(self) -> None:
        """A decoder: takes the queue in order, decodes, and hands each image on to the workers."""
        while True:
            job = await self._queue.get()
            self.decoding += 1
            try:
                if await self._decoded(job):
                    await self._ready.put(job)  # waits while the workers' next batches are all decoded
            finally:
                self.decoding -= 1
                self._queue.task_done()  # after the put: close() joins this queue, then the ready one
                self._on_change()

    async def _decoded(self, job: Job) -> bool:
        """Whether `job` is still to run, with its pixels decoded; if not, it has its answer or nobody waits."""
        if expired(job, time.monotonic()):
            return False
        if isinstance(job.pixels, np.ndarray):
            return True
        try:
            pixels = await asyncio.get_running_loop().run_in_executor(self._pool, job.pixels)
        except Exception as exc:  # a fault of ours, not the image's: that request gets a 500
            log.exception("decoding failed", extra={"request_id": job.record.id} if job.record is not None else None)
            if not job.future.done():
                job.future.set_exception(exc)
            return False
        if job.future.done():  # the client left while its image was decoded
            return False
        if isinstance(pixels, ServiceError):  # the image's own answer (undecodable, too large)
            job.future.set_result(pixels)
            return False
        job.pixels = pixels
        return True

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
