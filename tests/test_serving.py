"""The scheduler behind /infer, in-process: the real app and lifespan, a real onnxruntime session, a real event
loop, and engine runs that wait for the test to open a gate (tests.helpers.GatedClassifier).

The gate makes every state these tests need ("one request in the engine, two queued, the lifespan closing")
something the test creates and then observes through the service's own gauges, never a race against the clock.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette

import service.inference
from service.model import Classifier
from service.server import Server
from tests.helpers import (
    GatedClassifier,
    asgi_client,
    asgi_post,
    edit_manifest,
    image_bytes,
    make_app,
    sample,
    serving,
    until,
    write_tiny_artifact,
    write_unrunnable_model,
)

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "dark": (10, 10, 10)}
PNG = {name: image_bytes(colour) for name, colour in COLOURS.items()}
ORDER = ["red", "green", "blue", "dark", "red", "green"]


def _post(client: httpx.AsyncClient, name: str) -> asyncio.Task[httpx.Response]:
    return asyncio.ensure_future(client.post("/infer", files={"image": PNG[name]}))


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    return str(error["message"])


@pytest.fixture
def gated(tiny_artifact: Path) -> GatedClassifier:
    return GatedClassifier.from_dir(tiny_artifact)


def test_gauges_count_the_engine_and_the_queue(gated: GatedClassifier) -> None:
    app = make_app(gated, MAX_QUEUE="8")

    async def scenario() -> None:
        async with serving(app) as client:
            with gated.held():
                first, second = await _one_running_one_behind(app, client, gated, ORDER[0], ORDER[1])
                rest = [second, *(_post(client, name) for name in ORDER[2:4])]
                await until(lambda: sample(app, "inference_queue_depth") == 2, "two requests queued")
                assert sample(app, "inference_in_flight") == 2
                assert sample(app, "inference_batch_size_count") == 0
            answers = [await first, *[await task for task in rest]]
            assert [a.json()["class"] for a in answers] == ORDER[:4]
            assert sample(app, "inference_queue_depth") == 0
            assert sample(app, "inference_in_flight") == 0
            assert sample(app, "inference_batch_size_count") == 4
            assert sample(app, "inference_batch_size_sum") == 4
            assert sample(app, "inference_seconds_count") == 4
            assert sample(app, "image_decode_seconds_count") == 4

    asyncio.run(scenario())


async def _one_running_one_behind(
    app: Starlette, client: httpx.AsyncClient, gated: GatedClassifier, first: str, second: str
) -> tuple[asyncio.Task[httpx.Response], asyncio.Task[httpx.Response]]:
    """With the engine held and one inference thread: `first` in the engine, `second` queued behind it on the
    thread."""
    running = _post(client, first)
    await until(lambda: gated.runs == 1, "one request in the engine")
    behind = _post(client, second)
    await until(lambda: sample(app, "inference_in_flight") == 2, "one request queued on the thread")
    return running, behind


async def _one_running_one_behind_two_queued(
    app: Starlette, client: httpx.AsyncClient, gated: GatedClassifier, names: list[str]
) -> list[asyncio.Task[httpx.Response]]:
    """With the engine held and one inference thread: the first request in the engine, the second queued behind
    it on the thread, the last two in the queue."""
    held = list(await _one_running_one_behind(app, client, gated, names[0], names[1]))
    held += [_post(client, name) for name in names[2:]]
    await until(lambda: sample(app, "inference_queue_depth") == 2, "two requests queued")
    return held


def test_admission_refuses_when_it_is_the_binding_limit(gated: GatedClassifier) -> None:
    # MAX_BATCH=1: admission holds MAX_QUEUE + 2 x WORKERS x MAX_BATCH = 4 requests. One in the engine, one
    # queued behind it on the thread and two queued fill it, so the fifth is refused by admission, before the
    # queue could refuse it.
    app = make_app(gated, MAX_QUEUE="2", MAX_BATCH="1", REQUEST_TIMEOUT_S="10")

    async def scenario() -> None:
        async with serving(app) as client:
            with gated.held():
                held = await _one_running_one_behind_two_queued(app, client, gated, ["red", "green", "blue", "red"])
                refused = await client.post("/infer", files={"image": PNG["dark"]})
                message = _error(refused, 503, "overloaded")
                assert refused.headers["retry-after"] == "1"
                assert "being served" in message and "limit is 4" in message, message
                assert "queue is full" not in message
            assert [(await task).json()["class"] for task in held] == ["red", "green", "blue", "red"]
            # The refusal released nothing it did not take: the next request is served.
            assert (await client.post("/infer", files={"image": PNG["dark"]})).json()["class"] == "dark"
        assert gated.images == 5

    asyncio.run(scenario())


def test_a_full_queue_refuses_when_it_binds_before_admission(gated: GatedClassifier) -> None:
    # MAX_BATCH=4 lets admission hold 2 + 2 x 4 = 10 requests, but the queue binds first: one in the engine, one
    # queued behind it on the thread and two queued fill it while admission still has room.
    app = make_app(gated, MAX_QUEUE="2", MAX_BATCH="4", BATCH_WAIT_MS="0", REQUEST_TIMEOUT_S="10")

    async def scenario() -> None:
        async with serving(app) as client:
            with gated.held():
                held = await _one_running_one_behind_two_queued(app, client, gated, ["red", "green", "blue", "dark"])
                refused = await client.post("/infer", files={"image": PNG["red"]})
                message = _error(refused, 503, "overloaded")
                assert refused.headers["retry-after"] == "1"
                assert "queue is full (2 waiting)" in message, message
                assert sample(app, "inference_queue_depth") == 2
            assert [(await task).json()["class"] for task in held] == ["red", "green", "blue", "dark"]
        # Once the engine is free, the two that waited run together if both were decoded by then, else one by one
        # (tests/test_scheduling_inprocess.py holds that state on purpose).
        assert gated.runs in (3, 4) and gated.images == 4

    asyncio.run(scenario())


def test_admission_is_released_by_requests_that_fail(gated: GatedClassifier) -> None:
    app = make_app(gated, MAX_QUEUE="1", MAX_BATCH="1")  # admission holds 2

    async def scenario() -> None:
        async with serving(app) as client:
            for _ in range(4):
                bad = await client.post("/infer", content=b"junk", headers={"content-type": "image/png"})
                _error(bad, 400, "invalid_image")
            for name in ("red", "green", "blue"):
                assert (await client.post("/infer", files={"image": PNG[name]})).json()["class"] == name

    asyncio.run(scenario())


def test_shutdown_answers_every_queued_request_and_refuses_new_ones(gated: GatedClassifier) -> None:
    """The lifespan ends while requests wait in the scheduler's queue: Scheduler.close() must answer them all.

    uvicorn waits for its connections before it ends the lifespan, so over a real socket the queue is usually
    empty by then; here the lifespan is ended with four requests still inside (one queued on the thread, three
    in the queue), as a slow drain would leave them.
    """
    app = make_app(gated, MAX_QUEUE="8", REQUEST_TIMEOUT_S="10")

    async def scenario() -> None:
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        async with asgi_client(app) as client:
            with gated.held():
                held = list(await _one_running_one_behind(app, client, gated, ORDER[0], ORDER[1]))
                held += [_post(client, name) for name in ORDER[2:5]]
                await until(lambda: sample(app, "inference_queue_depth") == 3, "three requests queued")
                closing = asyncio.ensure_future(lifespan.__aexit__(None, None, None))
                await until(lambda: not app.state.data_plane.ready, "the shutdown to start")
                assert (await client.get("/ready")).status_code == 503
                late = await client.post("/infer", files={"image": PNG["red"]})
                assert _error(late, 503, "shutting_down") == "the server is shutting down"
                assert late.headers["retry-after"] == "1"
                assert not closing.done(), "the lifespan ended with requests still queued"
            answers = [await task for task in held]
            await closing
        for answer, name in zip(answers, ORDER[:5], strict=True):
            assert answer.status_code == 200, answer.text
            assert answer.json()["class"] == name
        assert gated.images == 5

    asyncio.run(scenario())


def test_a_request_whose_client_left_never_reaches_the_engine(gated: GatedClassifier) -> None:
    app = make_app(gated, MAX_QUEUE="8")

    async def scenario() -> None:
        async with serving(app) as client:
            with gated.held():
                first = _post(client, "red")
                await until(lambda: gated.runs == 1, "one request in the engine")
                leave = asyncio.Event()
                gone = asyncio.ensure_future(asgi_post(app, PNG["blue"], "image/png", leave=leave))
                await until(lambda: sample(app, "inference_in_flight") == 2, "the second queued on the thread")
                leave.set()
                status, body = await gone
                assert status == 499
                error = json.loads(body)["error"]
                assert len(error.pop("request_id")) == 32  # made for it: the client sent none
                assert error == {
                    "code": "client_closed_request",
                    "message": "the client closed the connection before the answer",
                }
                assert sample(app, "http_requests_total", route="/infer", status="499") == 1
            assert (await first).json()["class"] == "red"
            # The thread left the abandoned job out: had it run it, the engine would have seen two images.
            await until(lambda: sample(app, "inference_in_flight") == 0, "the thread to pass the abandoned job")
        assert (gated.runs, gated.images) == (1, 1)
        assert sample(app, "inference_batch_size_count") == 1

    asyncio.run(scenario())


def test_a_job_that_expired_in_the_queue_is_answered_504_and_skips_the_engine(gated: GatedClassifier) -> None:
    app = make_app(gated, MAX_QUEUE="8", REQUEST_TIMEOUT_S="0.5")

    async def scenario() -> None:
        async with serving(app) as client:
            with gated.held():
                first, second = await _one_running_one_behind(app, client, gated, "red", "green")
                third = _post(client, "blue")
                # Decoded, so waiting for a worker: not still in the decoder when the loop is held below.
                await until(lambda: sample(app, "image_decode_seconds_count") == 3, "the third request decoded")
                assert sample(app, "inference_queue_depth") == 1
                queued_at = time.monotonic()
                gated.finished.clear()
            # The gate is open. Hold the event loop itself while the thread runs the first two and the third
            # request's deadline passes. When the loop resumes, the third is failed 504 where it waits (by its
            # deadline, or by the worker that takes it) and never reaches the engine.
            assert gated.finished.wait(60)
            time.sleep(max(0.0, queued_at + 0.5 - time.monotonic()) + 0.3)
            expired = await third
            assert _error(expired, 504, "deadline_exceeded") in (
                "no answer within 0.5 s (REQUEST_TIMEOUT_S)",
                "the request expired in the queue",
            )
            assert {(await first).status_code, (await second).status_code} <= {200, 504}
        assert (gated.runs, gated.images) == (2, 2)

    asyncio.run(scenario())


def test_deadline_in_the_engine_and_in_the_queue_gives_504_and_the_queued_job_is_skipped(
    gated: GatedClassifier,
) -> None:
    app = make_app(gated, MAX_QUEUE="8", REQUEST_TIMEOUT_S="1.5")

    async def scenario() -> None:
        async with serving(app) as client:
            with gated.held():
                first, second = await _one_running_one_behind(app, client, gated, "red", "blue")
                for task in (first, second):
                    message = _error(await task, 504, "deadline_exceeded")
                    assert message == "no answer within 1.5 s (REQUEST_TIMEOUT_S)", message
        # The thread left the second job out of its run: dropped, not computed for nobody.
        assert (gated.runs, gated.images) == (1, 1)

    asyncio.run(scenario())


def test_an_image_whose_deadline_passes_while_it_is_decoded_never_reaches_the_engine(
    gated: GatedClassifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The decoding itself is held by the test (the real preprocessing behind a gate): a lone image is decoded on
    # its worker's thread just before its run, and the deadline passes while it decodes.
    app = make_app(gated, REQUEST_TIMEOUT_S="0.5")
    release = threading.Event()
    decode = service.inference.preprocess

    def held_decode(*args: Any) -> Any:
        assert release.wait(20), "the test never released the decoding"
        return decode(*args)

    monkeypatch.setattr(service.inference, "preprocess", held_decode)

    async def scenario() -> None:
        async with serving(app) as client:
            try:
                request = _post(client, "red")
                message = _error(await request, 504, "deadline_exceeded")
                assert message == "no answer within 0.5 s (REQUEST_TIMEOUT_S)"
                assert sample(app, "image_decode_seconds_count") == 0
            finally:
                release.set()
            await until(lambda: sample(app, "image_decode_seconds_count") == 1, "the image to be decoded")
            await until(lambda: sample(app, "inference_in_flight") == 0, "the worker to move on")
            assert (await _post(client, "blue")).json()["class"] == "blue"
        assert gated.images == 1, "the image decoded after its deadline was run anyway"

    asyncio.run(scenario())


@pytest.mark.parametrize(("batch_wait_ms", "max_batch"), [("60000", "3"), ("0", "1")])
def test_a_worker_batches_queued_images_and_answers_each_its_own(
    gated: GatedClassifier, batch_wait_ms: str, max_batch: str
) -> None:
    app = make_app(gated, MAX_QUEUE="8", MAX_BATCH=max_batch, BATCH_WAIT_MS=batch_wait_ms)

    async def scenario() -> list[httpx.Response]:
        async with serving(app) as client:
            return list(await asyncio.gather(*[_post(client, name) for name in ORDER[:3]]))

    answers = asyncio.run(scenario())
    assert [a.json()["class"] for a in answers] == ORDER[:3]
    expected_runs = 1 if max_batch == "3" else 3
    assert (gated.runs, gated.images) == (expected_runs, 3)
    assert sample(app, "inference_batch_size_sum") == 3
    assert sample(app, "inference_batch_size_count") == expected_runs


def test_a_batch_that_does_not_fill_runs_when_the_wait_ends(gated: GatedClassifier) -> None:
    app = make_app(gated, MAX_BATCH="4", BATCH_WAIT_MS="30")

    async def scenario() -> None:
        async with serving(app) as client:
            assert (await client.post("/infer", files={"image": PNG["green"]})).json()["class"] == "green"

    asyncio.run(scenario())
    assert (gated.runs, gated.images) == (1, 1)


def test_an_engine_failure_is_a_json_500_and_the_service_goes_on(
    tiny_artifact: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    artifact = tmp_path / "artifact"
    shutil.copytree(tiny_artifact, artifact)
    write_unrunnable_model(artifact)
    classifier = Classifier.load(artifact, 1)  # loads and passes every check; onnxruntime fails on each run
    classifier.warmed = True
    app = make_app(classifier)

    async def scenario() -> None:
        async with serving(app) as client:
            for _ in range(2):
                response = await client.post("/infer", files={"image": PNG["red"]})
                _error(response, 500, "internal_error")
                assert "Traceback" not in response.text and "Reshape" not in response.text
            assert (await client.get("/ping")).json() == {"message": "pong"}
            assert sample(app, "http_requests_total", route="/infer", status="500") == 2

    asyncio.run(scenario())
    assert any(r.getMessage() == "inference failed for a batch of 1" for r in caplog.records)


def test_ready_is_503_until_the_model_is_loaded_and_from_the_first_sigterm(tiny_artifact: Path) -> None:
    app = make_app(MODEL_DIR=str(tiny_artifact))  # the lifespan loads the artifact itself

    async def scenario() -> None:
        async with asgi_client(app) as client:
            _error(await client.get("/ready"), 503, "not_ready")
        async with serving(app) as client:
            assert (await client.get("/ready")).json() == {"ready": True}
            assert (await client.post("/infer", files={"image": PNG["blue"]})).json()["class"] == "blue"
            server = Server(uvicorn.Config(app), app)
            server.handle_exit(signal.SIGTERM, None)
            assert server.should_exit and not server.force_exit
            _error(await client.get("/ready"), 503, "not_ready")
            assert (await client.get("/ping")).status_code == 200  # alive, just not ready
            # A second Ctrl-C forces the exit; a second SIGTERM still drains.
            server.handle_exit(signal.SIGTERM, None)
            assert not server.force_exit
            server.handle_exit(signal.SIGINT, None)
            assert server.force_exit

    asyncio.run(scenario())


def test_a_lone_sigint_drains_like_sigterm(tiny_artifact: Path) -> None:
    app = make_app(MODEL_DIR=str(tiny_artifact))
    server = Server(uvicorn.Config(app), app)
    app.state.data_plane.ready = True
    server.handle_exit(signal.SIGINT, None)
    assert server.should_exit and not server.force_exit and app.state.data_plane.ready is False


def test_an_nchw_model_is_fed_channels_first(tmp_path: Path) -> None:
    write_tiny_artifact(tmp_path / "nchw", nchw=True, logits=True)
    edit_manifest(tmp_path / "nchw", lambda m: m.update(trained=False))
    app = make_app(MODEL_DIR=str(tmp_path / "nchw"))

    async def scenario() -> None:
        async with serving(app) as client:
            for name in COLOURS:
                body = (await client.post("/infer?top_k=4", files={"image": PNG[name]})).json()
                assert body["class"] == name
                assert sum(item["score"] for item in body["top_k"]) == pytest.approx(1.0, abs=1e-5)
                assert body["warning"].startswith("untrained reference model")

    asyncio.run(scenario())


TINY_MODEL = "tiny-colour-classifier"


def test_v2_readiness_is_503_before_the_lifespan_and_from_sigterm(tiny_artifact: Path) -> None:
    app = make_app(MODEL_DIR=str(tiny_artifact))

    async def scenario() -> None:
        async with asgi_client(app) as client:
            r = await client.get("/v2/health/ready")
            assert r.status_code == 503 and isinstance(r.json()["error"], str)
        async with serving(app) as client:
            assert (await client.get("/v2/health/ready")).status_code == 200
            assert (await client.get(f"/v2/models/{TINY_MODEL}/ready")).status_code == 200
            Server(uvicorn.Config(app), app).handle_exit(signal.SIGTERM, None)
            assert (await client.get("/v2/health/ready")).status_code == 503
            assert (await client.get(f"/v2/models/{TINY_MODEL}/ready")).status_code == 503
            assert (await client.get("/v2/health/live")).status_code == 200

    asyncio.run(scenario())
