"""Adaptive parallelism: a request alone gets every core, requests side by side one core each.

In-process: the real app and lifespan, real onnxruntime sessions, and engine runs that wait for the test to
open a gate (tests.helpers.GatedClassifier), so "one run in the engine, more waiting" is a state the test
creates, never a race against the clock. The decisions are read from the service's own counters.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers import (
    GatedClassifier,
    image_bytes,
    make_app,
    running_service,
    sample,
    server_metric,
    serving,
    until,
    wait_for,
)

RED = image_bytes((255, 0, 0))
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 10, 10), (200, 40, 40), (30, 200, 30)]


@pytest.fixture
def gated(tiny_artifact: Path) -> GatedClassifier:
    return GatedClassifier.from_dir(tiny_artifact)


def _runs(app: object, session: str) -> float:
    return sample(app, "inference_runs_total", session=session)  # type: ignore[arg-type]


def test_a_request_alone_runs_on_every_core(gated: GatedClassifier) -> None:
    # WIDE_RUNS=always: whatever else this machine is doing (tests/test_neighbours.py covers the default, auto).
    app = make_app(gated, THREADS="2", WORKERS="2", WIDE_RUNS="always")

    async def scenario() -> None:
        async with serving(app) as client:
            # The wide session is built only once a first answer has gone out: that one ran narrow.
            assert (await client.post("/infer", files={"image": RED})).json()["class"] == "red"
            assert (_runs(app, "wide"), _runs(app, "narrow")) == (0, 1)
            await until(lambda: sample(app, "inference_session_threads", session="wide") == 2, "the wide session")
            assert sample(app, "inference_session_threads", session="narrow") == 1
            for _ in range(3):  # one after another: each is alone
                response = await client.post("/infer", files={"image": RED})
                assert response.json()["class"] == "red"
            assert (_runs(app, "wide"), _runs(app, "narrow")) == (3, 1)

    asyncio.run(scenario())
    # What the counter calls wide is a session that really has every core, and narrow one that has one.
    assert gated.wide is not None and gated.wide_threads == 2
    assert gated.session.get_session_options().intra_op_num_threads == 1
    # The wide session's threads spin between a run's operators and sleep between runs; the narrow never spin.
    wide, narrow = gated.wide.get_session_options(), gated.session.get_session_options()
    assert wide.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert wide.get_session_config_entry("session.force_spinning_stop") == "1"
    assert narrow.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_requests_side_by_side_run_on_one_core_each(gated: GatedClassifier) -> None:
    app = make_app(gated, THREADS="2", WORKERS="2", WIDE_RUNS="always")

    async def scenario() -> None:
        async with serving(app) as client:
            assert (await client.post("/infer", files={"image": RED})).status_code == 200  # then the wide is built
            await until(lambda: sample(app, "inference_session_threads", session="wide") == 2, "the wide session")
            before = _runs(app, "narrow")
            with gated.held():
                first = asyncio.ensure_future(client.post("/infer", files={"image": RED}))
                await until(lambda: gated.runs == 2, "the first request in the engine")
                assert _runs(app, "wide") == 1  # it was alone when it started
                bodies = [image_bytes(colour) for colour in COLOURS[1:]]
                rest = [asyncio.ensure_future(client.post("/infer", files={"image": body})) for body in bodies]
                await until(lambda: gated.runs == 3, "the second worker busy")
                # One queued behind each run on the threads, two waiting.
                await until(lambda: sample(app, "inference_in_flight") == 4, "a request queued on each thread")
                await until(lambda: sample(app, "inference_queue_depth") == 2, "two requests queued")
                assert _runs(app, "narrow") == before + 1  # started while another run was in the engine
            answers = [await first, *[await task for task in rest]]
            assert [a.status_code for a in answers] == [200] * 6
            # The four that waited start while others wait or run: narrow, but possibly the last.
            assert _runs(app, "wide") + _runs(app, "narrow") - before == 6
            assert _runs(app, "narrow") - before >= 4

    asyncio.run(scenario())


def test_one_thread_in_all_means_no_wide_session(gated: GatedClassifier) -> None:
    app = make_app(gated, THREADS="2", WORKERS="1")  # one worker with both cores: nothing to widen

    async def scenario() -> None:
        async with serving(app) as client:
            assert (await client.post("/infer", files={"image": RED})).status_code == 200
            await until(lambda: app.state.metrics.registry.get_sample_value(
                "inference_session_threads", {"session": "wide"}) is not None, "the wide gauge")  # fmt: skip
            assert sample(app, "inference_session_threads", session="wide") == 0
            assert sample(app, "inference_session_threads", session="narrow") == 2
            assert (_runs(app, "wide"), _runs(app, "narrow")) == (0, 1)

    asyncio.run(scenario())
    assert gated.wide is None


def test_wide_and_narrow_sessions_answer_alike(gated: GatedClassifier) -> None:
    gated.add_wide_session(2)
    batch = np.random.default_rng(0).uniform(0, 255, (3, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(gated.predict(batch, wide=True), gated.predict(batch, wide=False), rtol=1e-5)


def test_the_service_widens_a_lone_request(tiny_artifact: Path, tmp_path: Path) -> None:
    # The same decisions through `python -m service`, as deployed.
    with running_service(tiny_artifact, tmp_path / "server.log", THREADS="2", WIDE_RUNS="always") as server:
        assert httpx.post(f"{server.url}/infer", files={"image": RED}).json()["class"] == "red"
        wait_for(lambda: server_metric(server, "inference_session_threads", session="wide") == 2, "the wide session")
        assert httpx.post(f"{server.url}/infer", files={"image": RED}).json()["class"] == "red"
        assert server_metric(server, "inference_runs_total", session="wide") == 1


def test_beside_a_busy_process_a_lone_request_runs_narrow(tiny_artifact: Path, tmp_path: Path) -> None:
    # The default, WIDE_RUNS=auto, through `python -m service`: another process spinning on one of the two cores.
    with running_service(tiny_artifact, tmp_path / "server.log", THREADS="2") as server:
        assert httpx.post(f"{server.url}/infer", files={"image": RED}).json()["class"] == "red"
        wait_for(lambda: server_metric(server, "inference_session_threads", session="wide") == 2, "the wide session")
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(1)  # the neighbour has been busy for longer than one reading's interval
            for _ in range(3):  # one after another: each alone, and each narrow
                assert httpx.post(f"{server.url}/infer", files={"image": RED}).json()["class"] == "red"
                time.sleep(0.3)
            assert server_metric(server, "inference_runs_total", session="wide") == 0
            assert server_metric(server, "machine_other_cores") > 0.5
        finally:
            hog.kill()
            hog.wait()


def test_wide_runs_never_builds_no_wide_session(tiny_artifact: Path, tmp_path: Path) -> None:
    with running_service(tiny_artifact, tmp_path / "server.log", THREADS="2", WIDE_RUNS="never") as server:
        for _ in range(3):
            assert httpx.post(f"{server.url}/infer", files={"image": RED}).json()["class"] == "red"
        assert server_metric(server, "inference_session_threads", session="wide") == 0
        assert server_metric(server, "inference_runs_total", session="wide") == 0
