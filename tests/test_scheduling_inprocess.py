"""The scheduler itself, driven directly: a real Scheduler, the service's real metrics hooks, a real onnxruntime
session of the tiny test model behind a gate the test opens (tests.helpers.GatedClassifier), a real event loop.

test_serving.py drives the same code through the app; these tests reach states the app cannot reach on demand:
two runs in the engine at once, a batch holding jobs of two models, a cancelled or expired job ahead of a live
one in the same batch, a wide session, a caller with no disconnect watcher. Fast enough to run once per mutant
(docs/security.md, "Mutation testing").
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.deadline import Deadline
from service.errors import ClientDisconnected, DeadlineExceeded, InvalidImage, Overloaded
from service.metrics import Metrics
from service.scheduler import Decode, Job, Scheduler, share
from tests.helpers import GatedClassifier, until

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "dark": (10, 10, 10)}
TIMEOUT_S = 20.0  # a bound for a broken scheduler, not a measurement: every answer here takes milliseconds


def _pixels(name: str) -> np.ndarray:
    return np.full((8, 8, 3), COLOURS[name], dtype=np.float32)  # the tiny model's input size


def _undecodable() -> InvalidImage:
    return InvalidImage("not an image")


def _broken() -> np.ndarray:
    raise RuntimeError("a fault of the decoder")


def _faults(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The scheduler's log lines that carry a traceback: the operator's only trace of a 500 not the image's."""
    return [r.getMessage() for r in caplog.records if r.name == "service.scheduler" and r.exc_info]


class RecordingClassifier(GatedClassifier):
    """The gated classifier, recording for each engine run whether it was asked to be wide and on which thread."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[object, str]] = []

    def predict(self, batch: np.ndarray, wide: bool = False) -> np.ndarray:  # type: ignore[override]
        self.calls.append((wide, threading.current_thread().name))
        return super().predict(batch, wide)


def _engine(model_dir: Path) -> RecordingClassifier:
    engine = RecordingClassifier.from_dir(model_dir)
    assert isinstance(engine, RecordingClassifier)
    engine.calls.clear()  # the warm-up run
    return engine


@pytest.fixture
def engine(tiny_artifact: Path) -> RecordingClassifier:
    return _engine(tiny_artifact)


def _scheduler(**settings: Any) -> tuple[Scheduler, Metrics]:
    metrics = Metrics()
    options: dict[str, Any] = {"workers": 1, "max_batch": 1, "batch_wait_s": 0.0, "max_queue": 8, "decoders": 1}
    options |= settings
    return Scheduler(**options, hooks=metrics.scheduler_hooks()), metrics


@contextlib.asynccontextmanager
async def _running(**settings: Any) -> AsyncIterator[tuple[Scheduler, Metrics]]:
    """A started scheduler, closed on the way out whatever the scenario raised."""
    scheduler, metrics = _scheduler(**settings)
    scheduler.start()
    try:
        yield scheduler, metrics
    finally:
        await scheduler.close()


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else float(value)


def _classes(engine: GatedClassifier, rows: list[np.ndarray]) -> list[str]:
    return [engine.top(row, 1)[0].label for row in rows]


def _infer(
    scheduler: Scheduler,
    engine: GatedClassifier,
    names: list[str],
    gone: Callable[[], Awaitable[None]] | None = None,
) -> asyncio.Task[list[np.ndarray]]:
    return asyncio.ensure_future(
        scheduler.infer(engine, [_pixels(name) for name in names], Deadline.after(TIMEOUT_S), gone)
    )


async def _a_decoder_fault_fails_only_its_request(scheduler: Scheduler, engine: GatedClassifier) -> None:
    """A fault that is not the image's fails its request (a 500), and the worker goes on serving."""
    with pytest.raises(RuntimeError, match="a fault of the decoder"):
        await scheduler.infer(engine, [_broken], Deadline.after(TIMEOUT_S))
    assert _classes(engine, await _infer(scheduler, engine, ["dark"])) == ["dark"]


def test_a_run_alone_is_wide_and_runs_side_by_side_are_narrow(engine: RecordingClassifier) -> None:
    engine.add_wide_session(2)
    assert engine.wide is not None
    metrics: Metrics | None = None

    async def scenario() -> None:
        nonlocal metrics
        scheduler, metrics = _scheduler(workers=2)
        scheduler.start()
        assert {"inference-worker-0", "inference-worker-1"} <= {task.get_name() for task in asyncio.all_tasks()}
        try:
            # Alone: nothing in the engine, nobody waiting.
            assert _classes(engine, await _infer(scheduler, engine, ["red"])) == ["red"]
            with engine.held():
                first = _infer(scheduler, engine, ["green"])
                await until(lambda: engine.runs == 2, "the green run in the engine")
                second = _infer(scheduler, engine, ["blue"])  # the second worker runs it beside the first
                await until(lambda: engine.runs == 3, "the blue run beside it")
                assert _value(metrics, "inference_in_flight") == 2
            assert _classes(engine, await first + await second) == ["green", "blue"]
            assert _value(metrics, "inference_in_flight") == 0
        finally:
            await scheduler.close()

    began = time.perf_counter()
    asyncio.run(scenario())
    elapsed = time.perf_counter() - began
    assert metrics is not None
    # The run on its own and the first of the two were wide (every core); the one beside it was narrow.
    assert [wide for wide, _ in engine.calls] == [True, True, False]
    assert _value(metrics, "inference_runs_total", session="wide") == 2
    assert _value(metrics, "inference_runs_total", session="narrow") == 1
    # On the scheduler's own named pool (the OS sees the names too), not the event loop's default executor.
    assert all(thread.startswith("inference_") for _, thread in engine.calls), engine.calls
    # The engine time each batch reports lies within the test's own span, at most two runs at a time (a
    # consistency check, not a timing).
    assert _value(metrics, "inference_seconds_count") == 3
    assert 0 < _value(metrics, "inference_seconds_sum") <= 2 * elapsed


def test_a_batch_holds_what_is_queued_and_each_job_runs_on_its_own_model(tiny_artifact: Path) -> None:
    first_model, second_model = _engine(tiny_artifact), _engine(tiny_artifact)  # as during a hot swap
    left = asyncio.Event()

    async def scenario() -> None:
        async with _running(max_batch=2, batch_wait_s=60.0) as (scheduler, metrics):
            with first_model.held():
                opening = _infer(scheduler, first_model, ["red", "green"])
                await until(lambda: first_model.runs == 1, "the first batch in the engine")
                assert first_model.images == 2, "the two queued images were not batched together"
                gone = _infer(scheduler, first_model, ["blue"], gone=left.wait)
                alone = _infer(scheduler, second_model, ["dark"])
                mixed = [_infer(scheduler, first_model, ["green"]), _infer(scheduler, second_model, ["blue"])]
                # The thread's second worker takes the next two (a run queued behind the one running), and the
                # other two wait.
                await until(lambda: _value(metrics, "inference_queue_depth") == 2, "a batch taken, two queued")
                left.set()  # the first of them is abandoned while it waits
                with pytest.raises(ClientDisconnected):
                    await gone
            # Batches [abandoned, dark on the second model] and [green on the first, blue on the second]: the
            # abandoned job is skipped without dropping the one behind it, and each model runs only its own jobs.
            assert _classes(first_model, await opening) == ["red", "green"]
            assert _classes(second_model, await alone) == ["dark"]
            assert [_classes(first_model, await task)[0] for task in mixed] == ["green", "blue"]

    asyncio.run(scenario())
    assert (first_model.runs, first_model.images) == (2, 3)
    assert (second_model.runs, second_model.images) == (2, 2)


def test_a_short_batch_wait_still_takes_what_is_already_queued(engine: RecordingClassifier) -> None:
    async def scenario() -> list[list[np.ndarray]]:
        async with _running(max_batch=2, batch_wait_s=0.5) as (scheduler, _):
            # Both are queued before the worker wakes: the batch fills at once, whatever the wait.
            return list(await asyncio.gather(_infer(scheduler, engine, ["red"]), _infer(scheduler, engine, ["dark"])))

    answers = asyncio.run(scenario())
    assert [_classes(engine, rows)[0] for rows in answers] == ["red", "dark"]
    assert (engine.runs, engine.images) == (1, 2)


def test_without_a_batch_wait_what_waits_runs_together_and_a_lone_image_waits_for_nothing(
    engine: RecordingClassifier,
) -> None:
    # MAX_BATCH=4, BATCH_WAIT_MS=0 (adaptive): the first image finds the scheduler idle and runs at once, alone
    # and undecoded as with MAX_BATCH=1; the three that queue behind it go together as one batch, handed to the
    # thread behind the run.
    decoded_on: list[str] = []

    def decode() -> np.ndarray:
        decoded_on.append(threading.current_thread().name)
        return _pixels("red")

    async def scenario() -> list[list[np.ndarray]]:
        async with _running(max_batch=4, batch_wait_s=0.0) as (scheduler, metrics):
            with engine.held():
                first = asyncio.ensure_future(scheduler.infer(engine, [decode], Deadline.after(TIMEOUT_S)))
                await until(lambda: engine.runs == 1, "the lone image in the engine")
                behind = [_infer(scheduler, engine, [name]) for name in ("green", "blue", "dark")]
                await until(lambda: _value(metrics, "inference_in_flight") == 4, "three images as one batch")
            return [await first] + [await task for task in behind]

    answers = asyncio.run(scenario())
    assert [_classes(engine, rows)[0] for rows in answers] == ["red", "green", "blue", "dark"]
    assert (engine.runs, engine.images) == (2, 4)
    assert decoded_on == ["inference_0"], decoded_on


@pytest.mark.parametrize(
    ("waiting", "idle_workers", "max_batch", "taken"),
    [(1, 2, 4, 1), (4, 2, 4, 2), (3, 2, 8, 2), (4, 1, 4, 4), (9, 1, 4, 4), (5, 0, 8, 5)],
)
def test_a_worker_takes_its_share_of_what_waits(waiting: int, idle_workers: int, max_batch: int, taken: int) -> None:
    # With both workers free, four waiting images make two runs of two (on 2 cores, side by side), not one of
    # four beside an idle core; a worker alone takes all that waits, up to MAX_BATCH.
    assert share(waiting, idle_workers, max_batch) == taken


def test_several_images_without_a_watcher_are_answered_in_order_one_run_each(engine: RecordingClassifier) -> None:
    async def scenario() -> list[np.ndarray]:
        async with _running() as (scheduler, _):  # MAX_BATCH=1: the answers come back one run at a time
            return await scheduler.infer(engine, [_pixels(name) for name in COLOURS], Deadline.after(TIMEOUT_S))

    assert _classes(engine, asyncio.run(scenario())) == list(COLOURS)
    assert (engine.runs, engine.images) == (4, 4)


def test_the_disconnect_watcher_is_cancelled_once_the_answer_is_in(engine: RecordingClassifier) -> None:
    watched = asyncio.Event()
    cancelled = asyncio.Event()

    async def never_gone() -> None:
        watched.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def scenario() -> None:
        async with _running() as (scheduler, _):
            assert _classes(
                engine, await scheduler.infer(engine, [_pixels("blue")], Deadline.after(TIMEOUT_S), never_gone)
            ) == ["blue"]
            assert watched.is_set()
            # Cancelled as the call returns; it learns so the next time the loop runs it.
            await asyncio.wait_for(cancelled.wait(), TIMEOUT_S)

    asyncio.run(scenario())


def test_settled_waits_for_the_queue_and_the_engine_to_be_empty(engine: RecordingClassifier) -> None:
    async def scenario() -> None:
        scheduler, _ = _scheduler()
        scheduler.start()
        settled = asyncio.ensure_future(scheduler.settled())
        try:
            with engine.held():
                first = _infer(scheduler, engine, ["red"])
                await until(lambda: engine.runs == 1, "the first run in the engine")
                second = _infer(scheduler, engine, ["green"])
                await asyncio.sleep(0)
                assert not settled.done()
                # Let the first run end while the second still waits in the queue, and hold the second: the loop
                # is blocked here, so the worker cannot start the second before the gate is closed again.
                engine.finished.clear()
                engine.gate.set()
                assert engine.finished.wait(TIMEOUT_S)
                engine.gate.clear()
                await until(lambda: engine.runs == 2, "the second run in the engine")
                assert _classes(engine, await first) == ["red"]
                assert not settled.done(), "settled while a request was still queued"
            assert _classes(engine, await second) == ["green"]
            await asyncio.wait_for(settled, TIMEOUT_S)
        finally:
            await scheduler.close()

    asyncio.run(scenario())


def test_an_expired_job_is_answered_504_and_the_rest_of_its_batch_still_runs(engine: RecordingClassifier) -> None:
    # The worker's own step, on a batch it has taken: the app cannot line up an expired job ahead of a live one
    # on demand (the waiting request notices its own deadline first), so the batch is built here.
    async def scenario() -> list[Job]:
        scheduler, _ = _scheduler(max_batch=3)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        jobs = [
            Job(_pixels("red"), now - 1.0, engine, loop.create_future()),  # expired while it waited
            Job(_pixels("green"), now, engine, loop.create_future()),  # due this instant: still in time
            Job(_pixels("blue"), now + 60.0, engine, loop.create_future()),
        ]
        await scheduler._run(jobs, now)
        await scheduler.close()
        return jobs

    expired, due, live = asyncio.run(scenario())
    with pytest.raises(DeadlineExceeded, match="^the request expired in the queue$"):
        expired.future.result()
    assert _classes(engine, [due.future.result(), live.future.result()]) == ["green", "blue"]
    assert (engine.runs, engine.images) == (1, 2)


def test_a_run_beside_an_image_being_decoded_is_narrow(engine: RecordingClassifier) -> None:
    # An image being decoded is about to run: a run that starts meanwhile is not alone and must not take
    # every core. And the image decoded meanwhile, alone when it arrived, is not alone when it runs.
    engine.add_wide_session(2)
    decoding, decoded = threading.Event(), threading.Event()

    def decode_red() -> np.ndarray:
        decoding.set()
        assert decoded.wait(TIMEOUT_S)
        return _pixels("red")

    async def scenario() -> None:
        async with _running(workers=2, decoders=2) as (scheduler, metrics):  # blue passes red while red decodes
            slow = asyncio.ensure_future(scheduler.infer(engine, [decode_red], Deadline.after(TIMEOUT_S)))
            await until(decoding.is_set, "red being decoded")
            with engine.held():
                beside = _infer(scheduler, engine, ["blue"])
                await until(lambda: engine.runs == 1, "the blue run in the engine")
                decoded.set()
                await until(lambda: engine.runs == 2, "the red run beside it")
            assert _classes(engine, await beside + await slow) == ["blue", "red"]
            assert _value(metrics, "inference_runs_total", session="wide") == 0

    asyncio.run(scenario())
    assert [wide for wide, _ in engine.calls] == [False, False]


def test_a_run_with_images_waiting_behind_it_is_narrow(engine: RecordingClassifier) -> None:
    # One inference thread: nothing else is in the engine when green starts (queued behind red), but blue waits
    # for it; only blue, the last, has the engine to itself.
    engine.add_wide_session(2)

    async def scenario() -> None:
        async with _running(workers=1) as (scheduler, _):
            with engine.held():
                red = _infer(scheduler, engine, ["red"])
                await until(lambda: engine.runs == 1, "red in the engine")
                green, blue = _infer(scheduler, engine, ["green"]), _infer(scheduler, engine, ["blue"])
                await until(lambda: scheduler._waiting() == 1 and engine.runs == 1, "blue waiting")
            assert _classes(engine, await red + await green + await blue) == ["red", "green", "blue"]

    asyncio.run(scenario())
    assert [wide for wide, _ in engine.calls] == [True, False, True]


def test_a_lone_image_is_decoded_and_run_on_one_inference_thread_and_a_queued_one_in_the_decoders(
    engine: RecordingClassifier,
) -> None:
    # Idle scheduler: the lone image skips the decoders and the ready queue; one inference thread decodes and
    # runs it. Behind a run in the engine, an image is queued and decoded by a decoder as before.
    engine.add_wide_session(2)
    decoded_on: list[tuple[str, str]] = []

    def decoder(name: str) -> Callable[[], np.ndarray]:
        def decode() -> np.ndarray:
            decoded_on.append((name, threading.current_thread().name))
            return _pixels(name)

        return decode

    async def scenario() -> None:
        async with _running(workers=2, decoders=1) as (scheduler, metrics):
            assert _classes(engine, await scheduler.infer(engine, [decoder("red")], Deadline.after(TIMEOUT_S))) == [
                "red"
            ]
            assert _value(metrics, "inference_in_flight") == 0
            with engine.held():
                running = asyncio.ensure_future(scheduler.infer(engine, [decoder("green")], Deadline.after(TIMEOUT_S)))
                await until(lambda: engine.runs == 2, "green in the engine")
                assert _value(metrics, "inference_in_flight") == 1  # counted in the engine while it runs
                queued = asyncio.ensure_future(scheduler.infer(engine, [decoder("blue")], Deadline.after(TIMEOUT_S)))
                await until(lambda: engine.runs == 3, "blue beside it")
            assert _classes(engine, await running + await queued) == ["green", "blue"]
            await asyncio.wait_for(scheduler.settled(), TIMEOUT_S)

    asyncio.run(scenario())
    threads = {name: thread for name, thread in decoded_on}
    assert threads["red"].startswith("inference_") and threads["green"].startswith("inference_"), decoded_on
    assert threads["blue"].startswith("decode_"), decoded_on
    # Each alone ran wide and on the thread that decoded it; blue, beside green, ran narrow.
    assert engine.calls == [(True, threads["red"]), (True, threads["green"]), (False, engine.calls[2][1])]


def test_with_batching_on_a_lone_image_is_queued_to_the_decoders_like_the_rest(engine: RecordingClassifier) -> None:
    # MAX_BATCH > 1: a lone image waits for a batch to fill (BATCH_WAIT_MS), so it goes through the decoders and
    # joins the images behind it decoded.
    decoded_on: list[str] = []

    def decode() -> np.ndarray:
        decoded_on.append(threading.current_thread().name)
        return _pixels("red")

    async def scenario() -> list[list[np.ndarray]]:
        async with _running(max_batch=2, batch_wait_s=TIMEOUT_S) as (scheduler, _):
            first = asyncio.ensure_future(scheduler.infer(engine, [decode], Deadline.after(TIMEOUT_S)))
            await asyncio.sleep(0)
            return list(await asyncio.gather(first, scheduler.infer(engine, [decode], Deadline.after(TIMEOUT_S))))

    answers = asyncio.run(scenario())
    assert [_classes(engine, rows) for rows in answers] == [["red"], ["red"]]
    assert (engine.runs, engine.images) == (1, 2)
    assert all(name.startswith("decode_") for name in decoded_on), decoded_on


def test_a_lone_image_is_answered_with_its_own_decoding_error_and_a_decoder_fault_fails_only_its_request(
    engine: RecordingClassifier, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with _running() as (scheduler, _):
            (error,) = await scheduler.infer(engine, [_undecodable], Deadline.after(TIMEOUT_S))
            assert isinstance(error, InvalidImage) and str(error) == "not an image"
            await _a_decoder_fault_fails_only_its_request(scheduler, engine)

    asyncio.run(scenario())
    assert engine.runs == 1  # dark only
    assert _faults(caplog) == ["decoding failed"], caplog.text


def test_a_batch_alone_in_the_engine_is_wide(engine: RecordingClassifier) -> None:
    engine.add_wide_session(2)

    async def scenario() -> list[np.ndarray]:
        async with _running(max_batch=2, batch_wait_s=TIMEOUT_S) as (scheduler, _):
            return await scheduler.infer(engine, [_pixels("red"), _pixels("green")], Deadline.after(TIMEOUT_S))

    assert _classes(engine, asyncio.run(scenario())) == ["red", "green"]
    assert (engine.runs, engine.images) == (1, 2)
    assert [wide for wide, _ in engine.calls] == [True]


def test_a_lone_image_whose_client_left_while_it_was_decoded_never_runs(engine: RecordingClassifier) -> None:
    decoding, release = threading.Event(), threading.Event()
    left = asyncio.Event()

    def decode() -> np.ndarray:
        decoding.set()
        assert release.wait(TIMEOUT_S)
        return _pixels("red")

    async def scenario() -> None:
        scheduler, metrics = _scheduler()
        scheduler.start()
        try:
            request = asyncio.ensure_future(scheduler.infer(engine, [decode], Deadline.after(TIMEOUT_S), left.wait))
            await until(decoding.is_set, "the image being decoded")
            left.set()
            with pytest.raises(ClientDisconnected):
                await request
            release.set()
            await asyncio.wait_for(scheduler.settled(), TIMEOUT_S)
            assert _value(metrics, "inference_in_flight") == 0
            assert _classes(engine, await _infer(scheduler, engine, ["blue"])) == ["blue"]  # serving on
        finally:
            release.set()
            await scheduler.close()

    asyncio.run(scenario())
    assert engine.runs == 1  # blue only


def test_a_lone_run_that_fails_fails_its_request_and_close_waits_for_a_lone_run(
    engine: RecordingClassifier, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        scheduler, metrics = _scheduler()
        scheduler.start()
        engine.fail_with = RuntimeError("a fault of the engine")
        with pytest.raises(RuntimeError, match="a fault of the engine"):
            await _infer(scheduler, engine, ["red"])
        engine.fail_with = None
        assert _value(metrics, "inference_in_flight") == 0
        with engine.held():
            running = _infer(scheduler, engine, ["green"])
            await until(lambda: engine.runs == 2, "green in the engine")
            closing = asyncio.ensure_future(scheduler.close())
            for _ in range(20):
                await asyncio.sleep(0)
            assert not closing.done(), "close() returned with a run still in the engine"
        await asyncio.wait_for(closing, TIMEOUT_S)
        assert running.done() and _classes(engine, running.result()) == ["green"]

    asyncio.run(scenario())
    assert _faults(caplog) == ["inference failed for a batch of 1"], caplog.text


def test_an_image_that_fails_to_decode_is_answered_with_its_error_and_the_rest_run(
    engine: RecordingClassifier, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with _running(max_batch=3, batch_wait_s=0.05) as (scheduler, metrics):
            with engine.held():
                first = _infer(scheduler, engine, ["red"])
                await until(lambda: engine.runs == 1, "the red run in the engine")
                batch = asyncio.ensure_future(
                    scheduler.infer(
                        engine, [_pixels("green"), _undecodable, _pixels("blue")], Deadline.after(TIMEOUT_S)
                    )
                )
                # Decoded ahead of the engine: green and blue, one batch, queued behind red; the bad image has its
                # answer.
                await until(lambda: _value(metrics, "inference_in_flight") == 3, "green and blue decoded")
            assert _classes(engine, await first) == ["red"]
            green, error, blue = await batch
            assert isinstance(error, InvalidImage) and str(error) == "not an image"
            assert _classes(engine, [green, blue]) == ["green", "blue"]  # type: ignore[list-item]
            await _a_decoder_fault_fails_only_its_request(scheduler, engine)

    asyncio.run(scenario())
    assert (engine.runs, engine.images) == (3, 4)  # red; green and blue as one batch; dark
    # The fault is in the log with its traceback: the operator's only trace of a 500 that is not the image's.
    assert _faults(caplog) == ["decoding failed"], caplog.text


def test_images_are_decoded_just_ahead_of_the_engine_and_never_once_their_client_left(
    engine: RecordingClassifier,
) -> None:
    # Waiting images stay encoded: only what the threads run next is decoded (2 x WORKERS x MAX_BATCH: a run
    # queued on each thread and as many waiting for a worker, plus one per decoder waiting for room), so the queue
    # does not hold a decoded megabyte per waiting image.
    decoded: list[str] = []

    def decoder(name: str) -> Callable[[], np.ndarray]:
        def decode() -> np.ndarray:
            decoded.append(name)
            return _pixels(name)

        return decode

    names = ["red", "green", "blue", "dark", "red", "green"]

    async def scenario() -> None:
        async with _running(workers=1, max_batch=1, decoders=1) as (scheduler, metrics):
            with engine.held():
                running = asyncio.ensure_future(scheduler.infer(engine, [decoder("dark")], Deadline.after(TIMEOUT_S)))
                await until(lambda: engine.runs == 1, "a run in the engine")
                left = asyncio.Event()
                waiting = [
                    asyncio.ensure_future(
                        scheduler.infer(
                            engine, [decoder(name)], Deadline.after(TIMEOUT_S), left.wait if i == 5 else None
                        )
                    )
                    for i, name in enumerate(names)
                ]
                # One in the engine; of the six waiting, one queued behind it, one decoded for the worker and one
                # held by the decoder.
                await until(lambda: len(decoded) == 4, "the decoder to fill the thread's next batches")
                for _ in range(20):
                    await asyncio.sleep(0)
                assert decoded == ["dark", "red", "green", "blue"]
                assert (_value(metrics, "inference_in_flight"), _value(metrics, "inference_queue_depth")) == (2, 5)
                left.set()  # the last request's client leaves while its image waits, encoded
                with pytest.raises(ClientDisconnected):
                    await waiting[5]
            assert _classes(engine, await running) == ["dark"]
            assert [_classes(engine, await request) for request in waiting[:5]] == [[name] for name in names[:5]]

    asyncio.run(scenario())
    assert decoded == ["dark", *names[:5]], "the image of a client that left was decoded"
    assert (engine.runs, engine.images) == (6, 6)


def test_two_workers_taking_batches_of_two_have_eight_images_decoded_ahead(engine: RecordingClassifier) -> None:
    # The bound is 2 x WORKERS x MAX_BATCH images waiting decoded (plus one the decoder holds until there is
    # room): enough for each worker's next two batches, whatever the settings, and no more.
    decoded: list[int] = []

    def decoder(i: int) -> Callable[[], np.ndarray]:
        def decode() -> np.ndarray:
            decoded.append(i)
            return _pixels("red")

        return decode

    async def scenario() -> None:
        async with _running(workers=2, max_batch=2, decoders=1, max_queue=16) as (scheduler, metrics):
            with engine.held():
                busy = [_infer(scheduler, engine, ["dark"]) for _ in range(2)]
                await until(lambda: engine.runs == 2, "both workers in the engine")
                waiting = asyncio.ensure_future(
                    scheduler.infer(engine, [decoder(i) for i in range(12)], Deadline.after(TIMEOUT_S))
                )
                # A run queued on each thread takes what is decoded when it is handed on (one image or two).
                await until(lambda: len(decoded) >= 7, "the decoder to fill both threads' next two batches")
                for _ in range(20):
                    await asyncio.sleep(0)
                assert 7 <= len(decoded) <= 9 and decoded == list(range(len(decoded)))
                in_flight = _value(metrics, "inference_in_flight")
                assert in_flight + _value(metrics, "inference_queue_depth") == 14
            for request in busy:
                assert _classes(engine, await request) == ["dark"]
            assert _classes(engine, await waiting) == ["red"] * 12

    asyncio.run(scenario())
    assert decoded == list(range(12))
    assert engine.images == 14


def test_close_ends_every_task_start_began_and_every_thread_it_used(engine: RecordingClassifier) -> None:
    threads_before = set(threading.enumerate())

    async def scenario() -> None:
        scheduler, _ = _scheduler(workers=2, decoders=2)
        before = asyncio.all_tasks()
        scheduler.start()
        began = asyncio.all_tasks() - before
        # Named, so a dump of the event loop's tasks says which is which.
        names = ["decoder-0", "decoder-1", *(f"inference-worker-{i}" for i in range(4))]  # two per thread
        assert sorted(task.get_name() for task in began) == names
        with engine.held():
            alone = _infer(scheduler, engine, ["red"])
            await until(lambda: engine.runs == 1, "red in the engine")
            queued = asyncio.ensure_future(
                scheduler.infer(engine, [lambda: _pixels("blue")], Deadline.after(TIMEOUT_S))
            )
            await until(lambda: engine.runs == 2, "blue, decoded by a decoder, beside it")
        assert _classes(engine, await alone + await queued) == ["red", "blue"]
        started = {thread.name for thread in set(threading.enumerate()) - threads_before}
        assert {"inference_0", "inference_1", "decode_0"} <= started, started
        await scheduler.close()
        assert [task.get_name() for task in began if not task.done()] == []
        # Joined by close(), while the scheduler still exists (a pool nobody refers to stops its threads too).
        assert [thread.name for thread in set(threading.enumerate()) - threads_before] == []

    asyncio.run(scenario())


def test_past_its_timeout_a_request_is_told_how_long_it_waited(engine: RecordingClassifier) -> None:
    async def scenario() -> None:
        async with _running() as (scheduler, _):
            with engine.held():
                running = _infer(scheduler, engine, ["red"])
                await until(lambda: engine.runs == 1, "a run in the engine")
                with pytest.raises(DeadlineExceeded, match=r"^no answer within 0\.05 s$"):
                    await scheduler.infer(engine, [_pixels("green")], Deadline.after(0.05))
                with pytest.raises(DeadlineExceeded, match=r"^no answer within 0\.05 s \(REQUEST_TIMEOUT_S\)$"):
                    await scheduler.infer(engine, [_pixels("blue")], Deadline.after(0.05, "REQUEST_TIMEOUT_S"))
            assert _classes(engine, await running) == ["red"]

    asyncio.run(scenario())
    assert engine.images == 1  # the two that timed out in the queue never ran


def test_a_request_of_several_images_past_its_timeout_leaves_no_failure_unseen(
    engine: RecordingClassifier, caplog: pytest.LogCaptureFixture
) -> None:
    # The deadline fails every job still waiting; the request raises one of those failures. The others must
    # still count as seen (cancel() does that), or asyncio logs each as an exception "never retrieved" once
    # its future is freed.
    async def scenario() -> None:
        async with _running() as (scheduler, _):
            with engine.held(), pytest.raises(DeadlineExceeded, match=r"^no answer within 0\.05 s$"):
                await scheduler.infer(engine, [_pixels(name) for name in COLOURS], Deadline.after(0.05))

    asyncio.run(scenario())
    gc.collect()  # the raised error's traceback holds the request's frame, and so the jobs: a cycle
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
    assert engine.images == 1  # the first image was in the engine; the other three never ran


def test_an_image_that_expires_before_a_decoder_takes_it_is_answered_504_and_never_decoded(
    engine: RecordingClassifier,
) -> None:
    decoded: list[str] = []

    def decode() -> np.ndarray:
        decoded.append("red")
        return _pixels("red")

    async def scenario() -> None:
        async with _running() as (scheduler, _):
            with engine.held():
                running = _infer(scheduler, engine, ["dark"])  # in the engine: the next image is queued
                await until(lambda: engine.runs == 1, "a run in the engine")
                request = asyncio.ensure_future(scheduler.infer(engine, [decode], Deadline.after(0.05)))
                await asyncio.sleep(0)  # the request queues its image, which wakes the decoder on the next turn
                # The event loop held past the deadline: the decoder, woken first, takes the image before the
                # request's own timer fires, and answers it without decoding it.
                time.sleep(0.1)
                with pytest.raises(DeadlineExceeded, match="^the request expired in the queue$"):
                    await request
            assert _classes(engine, await running) == ["dark"]

    asyncio.run(scenario())
    assert decoded == [] and engine.runs == 1


def test_images_a_decoder_holds_count_against_the_queue_bound(engine: RecordingClassifier) -> None:
    # MAX_QUEUE bounds the images accepted and not yet in the engine, those being decoded included: two images
    # in the decoders fill a queue of two, so a third is refused at once, however empty the queue itself looks.
    decoding: list[int] = []
    release = threading.Event()

    def held_decode() -> np.ndarray:
        decoding.append(1)
        assert release.wait(TIMEOUT_S)
        return _pixels("red")

    async def scenario() -> None:
        scheduler, metrics = _scheduler(max_queue=2, decoders=2)
        scheduler.start()
        try:
            first = asyncio.ensure_future(
                scheduler.infer(engine, [held_decode, held_decode], Deadline.after(TIMEOUT_S))
            )
            await until(lambda: len(decoding) == 2, "both images in the decoders")
            assert _value(metrics, "inference_queue_depth") == 2
            with pytest.raises(Overloaded, match="queue is full"):
                await scheduler.infer(
                    engine, [_pixels("blue")], Deadline.after(1.0)
                )  # accepted, it would wait and time out
            release.set()
            assert _classes(engine, await first) == ["red", "red"]
            assert _value(metrics, "inference_queue_depth") == 0
        finally:
            release.set()  # close() answers what is queued: the decoders must not stay held
            await scheduler.close()

    asyncio.run(scenario())
    assert engine.images == 2  # the refused image never ran


class ShortRows(GatedClassifier):
    """A broken model: one row of answers whatever the batch (the load-time checks read only the class count)."""

    def predict(self, batch: np.ndarray, wide: bool = False) -> np.ndarray:
        return super().predict(batch, wide)[:1]


def test_a_batch_answered_with_too_few_rows_fails_its_requests_and_the_worker_goes_on(tiny_artifact: Path) -> None:
    broken = ShortRows.from_dir(tiny_artifact)
    healthy = _engine(tiny_artifact)

    async def scenario() -> None:
        scheduler, metrics = _scheduler(max_batch=2, batch_wait_s=0.05)
        scheduler.start()
        try:
            with pytest.raises(ValueError, match="zip"):  # a 500, not a request left to its deadline
                await scheduler.infer(broken, [_pixels("red"), _pixels("green")], Deadline.after(TIMEOUT_S))
            assert _classes(healthy, await _infer(scheduler, healthy, ["blue"])) == ["blue"]
        finally:
            await asyncio.wait_for(scheduler.close(), TIMEOUT_S)  # the one worker was not left waiting
        assert _value(metrics, "inference_in_flight") == 0

    asyncio.run(scenario())


def test_a_fault_in_a_later_image_fails_the_request_while_an_earlier_one_still_runs(
    engine: RecordingClassifier,
) -> None:
    async def scenario() -> None:
        async with _running(workers=2) as (scheduler, _):
            with engine.held():
                engine.finished.clear()
                request = asyncio.ensure_future(
                    scheduler.infer(engine, [_pixels("red"), _broken], Deadline.after(TIMEOUT_S))
                )
                await until(lambda: request.done(), "the fault to fail the request, the first image still held")
                assert engine.runs == 1 and not engine.finished.is_set()
                with pytest.raises(RuntimeError, match="a fault of the decoder"):
                    request.result()

    asyncio.run(scenario())


def test_a_run_that_ends_after_its_event_loop_logs_nothing(
    engine: RecordingClassifier, caplog: pytest.LogCaptureFixture
) -> None:
    # A loop stopped without Scheduler.close() (a forced exit) while a run is in the engine: the run's answer
    # has nowhere to go, and that is no error.
    async def scenario() -> Scheduler:
        scheduler, _ = _scheduler()
        scheduler.start()
        engine.gate.clear()
        asyncio.ensure_future(scheduler.infer(engine, [_pixels("red")], Deadline.after(TIMEOUT_S)))
        await until(lambda: engine.runs == 1, "a run in the engine")
        return scheduler

    try:
        scheduler = asyncio.run(scenario())  # cancels the request and the workers, then closes the loop
    finally:
        engine.gate.set()
    scheduler._pool.shutdown(wait=True)
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []


def test_a_shutdown_answers_images_whose_decoding_has_not_started(engine: RecordingClassifier) -> None:
    # The drain holds for images still encoded in the queue: close() waits for the decoder to take every one and
    # for the workers to answer it (without the queue's join, close() found the engine and the ready queue empty
    # and stopped the decoder and the workers under them: the request was never answered).
    release = threading.Event()
    started: list[str] = []

    def held(name: str) -> Decode:
        def decode() -> np.ndarray:
            started.append(name)
            assert release.wait(TIMEOUT_S)
            return _pixels(name)

        return decode

    async def scenario() -> list[str]:
        scheduler, _ = _scheduler(max_queue=8, decoders=1)
        scheduler.start()
        names = ["red", "green", "blue"]
        request = asyncio.ensure_future(scheduler.infer(engine, [held(n) for n in names], Deadline.after(TIMEOUT_S)))
        await until(lambda: started == ["red"], "the decoder holding the first image, the others undecoded")
        closing = asyncio.ensure_future(scheduler.close())
        for _ in range(20):
            await asyncio.sleep(0)
        assert started == ["red"] and not closing.done()
        release.set()
        rows = await asyncio.wait_for(request, TIMEOUT_S)
        await asyncio.wait_for(closing, TIMEOUT_S)
        return _classes(engine, rows)

    assert asyncio.run(scenario()) == ["red", "green", "blue"]


def test_a_cancelled_request_of_several_images_runs_none_of_them(engine: RecordingClassifier) -> None:
    # Cancelling the request's task cancels only the future it awaits: the waiter cancels the others itself.

    async def scenario() -> None:
        async with _running() as (scheduler, _):
            with engine.held():
                running = _infer(scheduler, engine, ["red"])
                await until(lambda: engine.runs == 1, "a run in the engine")
                cancelled = _infer(scheduler, engine, ["green", "blue"])
                await asyncio.sleep(0)
                cancelled.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await cancelled
            await running

    asyncio.run(scenario())
    assert engine.images == 1


def _in_flight(metrics: Metrics) -> float:
    return _value(metrics, "inference_in_flight")


async def _red_running_green_behind(
    scheduler: Scheduler, metrics: Metrics, engine: RecordingClassifier
) -> tuple[asyncio.Task[list[np.ndarray]], asyncio.Task[list[np.ndarray]]]:
    """With the engine held and one inference thread: red in the engine, green queued behind it on the thread."""
    first, second = _infer(scheduler, engine, ["red"]), _infer(scheduler, engine, ["green"])
    await until(lambda: _in_flight(metrics) == 2, "green handed to the thread behind red")
    return first, second


def test_a_thread_that_ends_a_run_starts_the_next_without_waiting_for_the_event_loop(
    engine: RecordingClassifier,
) -> None:
    # One inference thread: while it runs red, green already waits in its pool's queue. The event loop is then
    # kept busy (as by HTTP work at 32 clients) while red ends: green must start all the same.

    async def scenario() -> None:
        async with _running() as (scheduler, metrics):
            with engine.held():
                first, second = await _red_running_green_behind(scheduler, metrics, engine)
                engine.gate.set()
                blocked_until = time.monotonic() + 10  # a bound for a broken scheduler: this takes milliseconds
                while engine.runs < 2 and time.monotonic() < blocked_until:
                    time.sleep(0.001)  # the event loop runs nothing meanwhile
                assert engine.runs == 2, "green waited for the event loop to start"
            assert _classes(engine, await first + await second) == ["red", "green"]

    asyncio.run(scenario())


def test_a_run_queued_behind_another_leaves_out_what_was_answered_while_it_waited(
    engine: RecordingClassifier,
) -> None:
    async def scenario() -> None:
        async with _running() as (scheduler, metrics):
            with engine.held():
                first, left = await _red_running_green_behind(scheduler, metrics, engine)
                left.cancel()  # its client left
                with pytest.raises(asyncio.CancelledError):
                    await left
            assert _classes(engine, await first) == ["red"]
            await until(lambda: _in_flight(metrics) == 0, "green's run over")
            assert engine.runs == 1, "green ran for nobody"
            assert _classes(engine, await _infer(scheduler, engine, ["blue"])) == ["blue"]

    asyncio.run(scenario())


def test_a_batch_queued_behind_another_runs_only_what_is_still_awaited(engine: RecordingClassifier) -> None:
    async def scenario() -> None:
        async with _running(max_batch=2) as (scheduler, metrics):
            with engine.held():
                first = _infer(scheduler, engine, ["red"])
                await until(lambda: engine.runs == 1, "red in the engine")
                left = _infer(scheduler, engine, ["green"])
                stays = _infer(scheduler, engine, ["blue"])
                await until(lambda: _in_flight(metrics) == 3, "green and blue handed on behind red, as one batch")
                left.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await left
            assert _classes(engine, await first + await stays) == ["red", "blue"]
            assert (engine.runs, engine.images) == (2, 2), "green ran for nobody"

    asyncio.run(scenario())
