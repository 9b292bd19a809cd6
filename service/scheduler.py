"""The inference scheduler: a bounded queue in front of WORKERS engine workers sharing the model.

Requests wait in one bounded queue; the decode stage (service/decode_stage.py) decodes them in order into a
small ready queue; each worker takes what waits there, up to MAX_BATCH (and, only with BATCH_WAIT_MS, waits
that long for a batch to fill), hands it to the inference threads, and resolves each request when its run ends
(service/waiter.py is how a request waits). There are two workers per inference thread: while the threads run their
batches, as many wait in the thread pool's own queue, so a thread that ends a run starts the next at once
instead of waiting for the event loop (busy with HTTP at 32 clients) to hand it one.

How many cores a run gets is decided per run, from the scheduler's own state: a run that starts while no
other run is in the engine and nobody waits is *wide* (every core: a lone request is answered as fast as the
engine allows); any other run is narrow (one core each: on 2 cores two single-threaded runs side by side
beat one two-threaded run).

A lone image that finds the scheduler idle (nothing queued, being decoded or in the engine; no batch held open:
MAX_BATCH 1, or no BATCH_WAIT_MS) has
nothing to overlap with: it goes to the workers undecoded, and the worker's thread decodes it just before its
run, sparing it two event-loop wake-ups (to a decode thread and back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from service import waiter
from service.deadline import Deadline
from service.decode_stage import DecodeStage, expired
from service.errors import Overloaded, ServiceError, ShuttingDown
from service.neighbours import Neighbours
from service.record import RequestRecord
from service.threads import named_pool

log = logging.getLogger(__name__)


class Engine(Protocol):
    """What the scheduler runs: service.model.Classifier. Each job names its own, so a model swapped in while
    jobs wait never runs a job accepted for the model before it."""

    @property
    def wide(self) -> object: ...

    def predict(self, batch: np.ndarray, wide: bool = False) -> np.ndarray: ...


Decode = Callable[[], "np.ndarray | ServiceError"]
"""Decodes one image, blocking (the scheduler calls it in a thread): its pixels, or the error that answers it."""

Rows = list["np.ndarray | ServiceError"]
Ran = list["np.ndarray | ServiceError | None"]
"""A run's answer for each of its jobs: as Rows, or None for a job left out of the run, answered already."""


@dataclass
class Job:
    pixels: np.ndarray | Decode
    deadline: float  # time.monotonic()
    engine: Engine = field(repr=False)
    future: waiter.Answer = field(repr=False)
    record: RequestRecord | None = field(default=None, repr=False)  # its request's, to time the engine run


@dataclass(frozen=True)
class SchedulerHooks:
    """Callbacks for metrics, so the scheduler does not depend on the metrics module."""

    on_batch: Callable[[int, float], None] = lambda size, seconds: None
    on_queue_depth: Callable[[int], None] = lambda depth: None
    on_in_flight: Callable[[int], None] = lambda count: None
    on_run: Callable[[bool], None] = lambda wide: None
    # On the inference thread, after each run: its (N, classes) probabilities.
    on_probabilities: Callable[[np.ndarray], None] = lambda probabilities: None


# Runs handed to the inference threads per thread: one running, one queued behind it. At 32 clients the cores
# idled 2.5-3.1% of the time between runs with one, 0.4-0.7% with two (benchmarks.ab, small set, 5 rounds).
RUNS_PER_THREAD = 2


def most_held(max_queue: int, workers: int, max_batch: int) -> int:
    """The most images a scheduler with these settings holds: its queue, and on each inference thread a run in the
    engine and one queued behind it."""
    return max_queue + RUNS_PER_THREAD * workers * max_batch


def share(waiting: int, idle_workers: int, max_batch: int) -> int:
    """How many of `waiting` decoded images a worker takes: an equal part for each thread with no run handed to
    it (so no core idles while another runs a long batch; none free, as when a run is queued: all), up to
    max_batch."""
    return min(max_batch, -(-waiting // max(1, idle_workers)))


def _ids(jobs: list[Job]) -> dict[str, str]:
    """The IDs of the requests `jobs` belong to, for a log line written off the requests' own tasks (its
    `extra`: service/logs.py writes them)."""
    ids = dict.fromkeys(job.record.id for job in jobs if job.record is not None)
    return {"request_id": ", ".join(ids)} if ids else {}


class Scheduler:
    def __init__(
        self,
        *,
        workers: int,
        max_batch: int,
        batch_wait_s: float,
        max_queue: int,
        decoders: int,
        retry_after_s: int = 1,
        hooks: SchedulerHooks | None = None,
        neighbours: Neighbours | None = None,
    ) -> None:
        self._workers = workers
        self._neighbours = neighbours
        self._max_batch = max_batch
        self._batch_wait_s = batch_wait_s
        # A batch held open for BATCH_WAIT_MS waits for images decoded: a lone image then goes to the decoders too.
        self._holds_for_company = max_batch > 1 and batch_wait_s > 0
        self._retry_after = str(retry_after_s)
        self._queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=max_queue)
        # Decoded, waiting for a worker: one batch per thread, which with the run queued behind each thread's run
        # makes each thread's next two batches decoded, so a slow decoding (a large photo, a busy event loop) never
        # leaves a core waiting, and at most twice this many decoded images wait outside the engine (plus one per
        # decoder waiting for room here). One batch ahead per thread answered 0.86x as many requests at 8 clients.
        self._ready: asyncio.Queue[Job] = asyncio.Queue(maxsize=workers * max_batch)
        self._hooks = hooks or SchedulerHooks()
        self._pool = named_pool(workers, "inference")
        self._decode = DecodeStage(decoders, self._queue, self._ready, self._report_depth)
        self._taking = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._in_flight = 0  # images in the engine, or handed to an inference thread
        self._counting = threading.Lock()
        self._runs = 0  # runs handed to the threads and not yet answered
        self._closing = False
        # Set once a run has ended with nothing else in the engine or waiting (cleared when one starts).
        self._settled = asyncio.Event()

    def start(self) -> None:
        workers = range(RUNS_PER_THREAD * self._workers)
        self._tasks = [asyncio.create_task(self._work(), name=f"inference-worker-{i}") for i in workers]
        self._tasks += self._decode.start()
        if self._neighbours is not None:
            self._neighbours.start()

    async def settled(self) -> None:
        """Return once a run has been answered and the engine is idle: the time for background work that
        would otherwise compete with answers (building a session holds the GIL for much of its build)."""
        await self._settled.wait()

    @property
    def capacity(self) -> int:
        """The most images one call of `infer` can queue (MAX_QUEUE: queued, being decoded, or decoded)."""
        return self._queue.maxsize

    async def infer(
        self,
        engine: Engine,
        images: Sequence[np.ndarray | Decode],
        deadline: Deadline,
        gone: waiter.Gone | None = None,
        *,
        record: RequestRecord | None = None,
    ) -> Rows:
        """Queue images for `engine`, all or none, and await their probabilities in order: (height, width, 3)
        pixels, or a Decode whose error, if it fails, is that image's answer.

        503 if the queue has no room for all of them, 504 past `deadline`, 499 as soon as `gone()` (the client
        leaving) completes. `record`: the request's, whose engine runs are timed in it.
        """
        if self._closing:
            raise ShuttingDown("the server is shutting down", headers={"Retry-After": self._retry_after})
        if self._queue.maxsize - self._waiting() < len(images):
            raise Overloaded(
                f"the inference queue is full ({self._queue.maxsize} waiting); retry shortly",
                headers={"Retry-After": self._retry_after},
            )
        loop = asyncio.get_running_loop()
        jobs = [Job(pixels, deadline.at, engine, loop.create_future(), record) for pixels in images]
        if record is not None:
            record.queued = time.perf_counter()
        if len(jobs) == 1 and not self._holds_for_company and self._idle():
            # Straight to the workers, undecoded: the worker's thread decodes it just before the run.
            self._ready.put_nowait(jobs[0])
        else:
            for job in jobs:  # room was checked above, and nothing awaits in between
                self._queue.put_nowait(job)
        self._report_depth()
        return await waiter.answers([job.future for job in jobs], deadline, gone)

    async def _next_batch(self) -> list[Job]:
        # One worker fills its batch at a time: two filling at once (BATCH_WAIT_MS) would split what arrives.
        async with self._taking:
            return await self._take_batch()

    async def _take_batch(self) -> list[Job]:
        jobs = [await self._ready.get()]
        if isinstance(jobs[0].pixels, np.ndarray):  # else a lone image, undecoded: it runs alone (infer)
            # What already waits joins the run, up to MAX_BATCH: nothing is held back for company unless
            # BATCH_WAIT_MS says so.
            take = share(1 + self._ready.qsize(), self._workers - self._runs, self._max_batch)
            while len(jobs) < take:
                jobs.append(self._ready.get_nowait())
        if self._holds_for_company and len(jobs) < self._max_batch:
            loop = asyncio.get_running_loop()
            until = loop.time() + self._batch_wait_s
            while len(jobs) < self._max_batch:
                remaining = until - loop.time()
                if remaining <= 0:
                    break
                try:
                    jobs.append(await asyncio.wait_for(self._ready.get(), remaining))
                except TimeoutError:
                    break
        self._report_depth()
        return jobs

    async def _work(self) -> None:
        while True:
            jobs = await self._next_batch()
            try:
                await self._run(jobs, time.monotonic())
            finally:
                # Only now: close() waits on join(), which must mean "answered", not "taken".
                for _ in jobs:
                    self._ready.task_done()

    async def _run(self, jobs: list[Job], now: float) -> None:
        by_engine: dict[int, list[Job]] = {}
        for job in jobs:
            if not expired(job, now):
                by_engine.setdefault(id(job.engine), []).append(job)
        # More than one engine only while a swapped-out model still has jobs queued: each runs on its own.
        for live in by_engine.values():
            await self._run_on(live[0].engine, live)

    async def _run_on(self, engine: Engine, live: list[Job]) -> None:
        """Run `live` on an inference thread; return once its jobs have their answers."""
        self._settled.clear()
        self._runs += 1
        self._count_in_engine(len(live))
        loop = asyncio.get_running_loop()
        answered = loop.create_future()

        def answer(run: Future[Ran | None]) -> None:
            try:
                rows = run.result()
                if rows is not None:  # None: nobody waits for it any more
                    for job, row in zip(live, rows, strict=True):  # fewer rows than images: a broken model
                        if row is not None and not job.future.done():  # None: left out, answered already
                            job.future.set_result(row)
            except Exception as exc:  # a run's own failure is logged in the thread, which knows which part failed
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(exc)
            finally:  # whatever happened above: this worker must go on to the next batch
                self._runs -= 1
                if self._runs == 0 and self._idle():  # every run answered, not only ended on its thread
                    self._settled.set()
                if not answered.done():
                    answered.set_result(None)

        def hand_back(run: Future[Ran | None]) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop has closed under a run nobody waits for
                loop.call_soon_threadsafe(answer, run)

        # The pool is shut down only by close(), once every worker has stopped: a submit here is never refused.
        run = self._pool.submit(self._counted_out, engine, live)
        # The answers go out from the thread's completion itself, not after this task has resumed from an
        # executor future: one event-loop turn less between the run and the client.
        run.add_done_callback(hand_back)
        await answered

    def _count_in_engine(self, images: int) -> None:
        with self._counting:  # in on the event loop, out on an inference thread
            self._in_flight += images
            self._hooks.on_in_flight(self._in_flight)

    def _counted_out(self, engine: Engine, live: list[Job]) -> Ran | None:
        """On an inference thread: _engine_run, its images counted out of the engine the moment it ends, so that
        the run queued behind it on this thread sees the engine as it is (alone: wide), not as the event loop
        has yet to learn."""
        try:
            return self._engine_run(engine, live)
        finally:
            self._count_in_engine(-len(live))

    def _engine_run(self, engine: Engine, live: list[Job]) -> Ran | None:
        """On an inference thread: one run of `live`, decoding first a lone image that came undecoded (infer).
        Each job's answer, in order: its probabilities, (a lone image) its own error, or None for a job left out
        of the run; None if nobody waits."""
        if len(live) == 1 and not isinstance(live[0].pixels, np.ndarray):
            decoded = self._decode_lone(live[0])
            if decoded is None or isinstance(decoded, ServiceError):
                return None if decoded is None else [decoded]
            running, pixels = live, [decoded]
        else:
            # Decoded ahead and still awaited: a run can wait in the pool's queue behind another, and its client
            # leave or its deadline pass meanwhile (the event loop has then answered its future).
            running = [job for job in live if not job.future.done()]
            if not running:
                return None
            pixels = [job.pixels for job in running if isinstance(job.pixels, np.ndarray)]
        # One image (the common case unbatched) is passed as a view: no copy of its megabyte.
        batch = pixels[0][None] if len(pixels) == 1 else np.stack(pixels)
        wide = self._wide(engine, len(live))  # as counted into the engine
        self._hooks.on_run(wide)
        started = time.perf_counter()
        try:
            probabilities = engine.predict(batch, wide)
        except Exception:
            log.exception("inference failed for a batch of %d", len(running), extra=_ids(running))
            raise
        ended = time.perf_counter()
        self._hooks.on_batch(len(running), ended - started)
        for job in running:
            if job.record is not None:
                job.record.ran(started, ended)
        self._hooks.on_probabilities(probabilities)
        rows: Ran = list(probabilities)
        if len(running) == len(live):  # answer() fails the run if a broken model answered too few or too many rows
            return rows
        by_job = dict(zip(map(id, running), rows, strict=True))  # raises there too: the run fails
        return [by_job.get(id(job)) for job in live]

    @staticmethod
    def _decode_lone(job: Job) -> np.ndarray | ServiceError | None:
        """A lone image's pixels, decoded on its inference thread; its own error (undecodable, too large); or None
        if nobody waits for it any more."""
        assert not isinstance(job.pixels, np.ndarray)
        try:
            decoded = job.pixels()
        except Exception:  # a fault of ours, not the image's: that request gets a 500
            log.exception("decoding failed", extra=_ids([job]))
            raise
        if isinstance(decoded, np.ndarray) and job.future.done():  # the client left, or its deadline passed
            return None
        return decoded

    def _wide(self, engine: Engine, images: int) -> bool:
        """Every core only if nothing else is in the engine or waiting to enter it. Decided at the last moment,
        from the scheduler's counters: each run was counted in on the event loop before it was handed to a
        thread (and is counted out on its thread as it ends), so of two runs starting together the later one to
        look sees the other; and waiting is read first, so a job the loop moves from waiting into the engine
        between the two reads is seen. And only while no neighbour holds one of the cores
        (service/neighbours.py), asked last: it reads files."""
        alone = self._waiting() == 0 and self._in_flight == images and engine.wide is not None
        return alone and (self._neighbours is None or not self._neighbours.busy())

    def _waiting(self) -> int:
        """Images accepted and not yet in the engine: queued, being decoded, or decoded for a worker."""
        return self._queue.qsize() + self._decode.decoding + self._ready.qsize()

    def _report_depth(self) -> None:
        self._hooks.on_queue_depth(self._waiting())

    def _idle(self) -> bool:
        """Nothing in the engine or waiting to enter it."""
        return self._in_flight == 0 and self._waiting() == 0

    async def close(self) -> None:
        """Refuse new work, answer everything already queued, then stop the workers."""
        self._closing = True
        await self._queue.join()  # every image decoded (or answered without running) and handed on
        await self._ready.join()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._pool.shutdown(wait=True)
        self._decode.shutdown()
        if self._neighbours is not None:
            self._neighbours.stop()
