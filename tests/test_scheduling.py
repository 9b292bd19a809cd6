"""The scheduler under real concurrent load, against a real server and a model that takes real engine time."""

from __future__ import annotations

import re
import signal
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import (
    Server,
    image_bytes,
    metric,
    running_service,
    server_metric,
    start_service,
    wait_for,
    write_tiny_artifact,
)

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 10, 10), (200, 50, 50), (40, 180, 60), (90, 90, 250)]
IMAGES = [image_bytes(c, size=(64 + 8 * i, 48), fmt="PNG") for i, c in enumerate(COLOURS)]


@pytest.fixture(scope="module")
def slow_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("slow") / "artifact"
    # ~0.2 s per image (200 products of 384x384): the worker stays busy while the test's clients, which may
    # start 50 ms apart on a loaded 2-core machine, line up behind it. 40 (~40 ms) let them through one by one.
    write_tiny_artifact(out, busy_matmuls=200)
    return out


@pytest.fixture(scope="module")
def busy_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("busy") / "artifact"
    write_tiny_artifact(out, busy_matmuls=6)  # ~20-40 ms of engine time per image
    return out


def _metrics(server: Server) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    text = httpx.get(f"{server.url}/metrics").text
    families: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = [(s.name, s.labels, s.value) for s in family.samples]
    return families


def _gauge(server: Server, name: str) -> float:
    return float(_metrics(server)[name][0][2])


def _post(server: Server, body: bytes, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{server.url}/infer?top_k=4", files={"image": body}, timeout=timeout)


def _blast(server: Server, clients: int, requests: int) -> list[httpx.Response]:
    """`requests` posts of the test images from `clients` concurrent clients."""
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda i: _post(server, IMAGES[i % len(IMAGES)]), range(requests)))


@pytest.fixture(scope="module")
def batching_server(busy_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("logs") / "batching.log"
    with running_service(busy_artifact, log, WORKERS="2", MAX_BATCH="4", BATCH_WAIT_MS="20") as server:
        yield server


def test_concurrent_clients_get_their_own_answers(batching_server: Server) -> None:
    sequential = [_post(batching_server, body).json() for body in IMAGES]
    requests = [IMAGES[i % len(IMAGES)] for i in range(42)]
    with ThreadPoolExecutor(14) as pool:
        answers = list(pool.map(lambda body: _post(batching_server, body), requests))
    for i, response in enumerate(answers):
        assert response.status_code == 200, response.text
        expected = sequential[i % len(IMAGES)]
        got = response.json()
        assert got["class"] == expected["class"]
        assert [t["class"] for t in got["top_k"]] == [t["class"] for t in expected["top_k"]]
        assert got["score"] == pytest.approx(expected["score"], rel=1e-4)


def test_batches_form_under_concurrency_and_metrics_parse(batching_server: Server) -> None:
    with ThreadPoolExecutor(12) as pool:
        list(pool.map(lambda body: _post(batching_server, body), IMAGES * 4))
    families = _metrics(batching_server)
    batch = {name: value for name, labels, value in families["inference_batch_size"] if not labels.get("le")}
    buckets = {labels["le"]: value for name, labels, value in families["inference_batch_size"] if "le" in labels}
    assert batch["inference_batch_size_count"] > 0
    assert buckets["1.0"] < batch["inference_batch_size_count"], "no batch larger than 1 was formed"
    assert batch["inference_batch_size_sum"] > batch["inference_batch_size_count"]
    requests = {(lab["route"], lab["status"]): v for n, lab, v in families["http_requests"] if n.endswith("_total")}
    assert requests[("/infer", "200")] >= 28
    (model,) = [labels for name, labels, value in families["model_info"] if value == 1]
    assert model["name"] == "tiny-colour-classifier" and model["quantization"] == "fp32" and model["trained"] == "true"
    for family in ("http_request_duration_seconds", "image_decode_seconds", "inference_seconds"):
        assert any(name.endswith("_count") and value > 0 for name, _, value in families[family]), family
    assert "inference_queue_depth" in families and "inference_in_flight" in families


def test_ready_and_ping(batching_server: Server) -> None:
    assert httpx.get(f"{batching_server.url}/ready").json() == {"ready": True}
    assert httpx.get(f"{batching_server.url}/ping").json() == {"message": "pong"}


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="OS thread names are read from Linux /proc")
def test_pool_threads_carry_their_names_to_the_os(batching_server: Server) -> None:
    # `top -H` and the benchmarks' CPU accounting tell the engine's threads from the decoders by these names.
    _blast(batching_server, clients=4, requests=8)
    tasks = Path(f"/proc/{batching_server.process.pid}/task")
    names = sorted((task / "comm").read_text().strip() for task in tasks.iterdir())
    assert {"inference_0", "inference_1"} <= set(names), names
    assert "decode_0" in names, names


def _overload_messages(responses: list[httpx.Response]) -> list[str]:
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 3, statuses
    messages = []
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "overloaded"
            messages.append(r.json()["error"]["message"])
    return messages


def test_admission_sheds_the_overload_with_503_and_recovers(slow_artifact: Path, tmp_path: Path) -> None:
    # MAX_BATCH=1: admission holds MAX_QUEUE + 2 x WORKERS x MAX_BATCH = 4 images. Once a run is in the engine and
    # one queued behind it, admission binds before the queue can; only while the thread's second run is still
    # being decoded (the burst's start) do two images in the decoders fill the queue first (they count against
    # MAX_QUEUE: test_scheduling_inprocess.py). With admission never refusing, every refusal would be the queue's.
    env = {"WORKERS": "1", "THREADS": "1", "MAX_QUEUE": "2", "MAX_BATCH": "1"}
    admission = "images are already being served (the limit is 4: MAX_QUEUE"
    with running_service(slow_artifact, tmp_path / "server.log", **env) as server:
        messages = _overload_messages(_blast(server, clients=16, requests=24))
        assert len(messages) >= 8, messages
        assert all(admission in m or "the inference queue is full (2 waiting)" in m for m in messages), messages
        assert any(admission in m for m in messages), messages
        # Recovered: the queue drained, a new request is served.
        assert _post(server, IMAGES[0]).json()["class"] == "red"
        assert "Traceback" not in server.output()


def test_a_full_queue_sheds_with_503_when_it_binds_first(slow_artifact: Path, tmp_path: Path) -> None:
    # MAX_BATCH=4 gives admission room for 2 + 2 x 4 = 10, but a batch in the engine, one behind it and two
    # waiting fill the queue
    # first. Unbounded, the queue would never refuse.
    env = {"WORKERS": "1", "THREADS": "1", "MAX_QUEUE": "2", "MAX_BATCH": "4", "BATCH_WAIT_MS": "0"}
    with running_service(slow_artifact, tmp_path / "server.log", **env) as server:
        messages = _overload_messages(_blast(server, clients=16, requests=24))
        assert any("queue is full (2 waiting)" in m for m in messages), messages
        assert _post(server, IMAGES[1]).json()["class"] == "green"
        assert "Traceback" not in server.output()


def test_deadline_gives_504_not_500_and_expired_jobs_skip_the_engine(busy_artifact: Path, tmp_path: Path) -> None:
    env = {"WORKERS": "1", "THREADS": "1", "REQUEST_TIMEOUT_S": "0.03", "MAX_QUEUE": "64"}
    with running_service(busy_artifact, tmp_path / "server.log", **env) as server:
        responses = _blast(server, clients=12, requests=24)
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 504}, statuses
        assert 504 in statuses
        for r in responses:
            if r.status_code == 504:
                error = r.json()["error"]
                assert error["code"] == "deadline_exceeded"
                assert error["message"] == "the request expired in the queue" or re.fullmatch(
                    r"no answer within [0-9.e-]+ s \(REQUEST_TIMEOUT_S\)", error["message"]
                ), error
        # The ones whose deadline passed while they waited (encoded, or decoded just ahead of the engine) were
        # answered 504 and never reached the engine.
        wait_for(lambda: server_metric(server, "inference_in_flight") == 0, "the engine to go idle")
        assert server_metric(server, "inference_batch_size_sum") < 24
        assert server_metric(server, "inference_batch_size_sum") <= server_metric(server, "image_decode_seconds_count")
        assert httpx.get(f"{server.url}/ping").status_code == 200


def test_a_request_whose_client_left_never_reaches_the_engine(slow_artifact: Path, tmp_path: Path) -> None:
    env = {"WORKERS": "1", "THREADS": "1", "MAX_BATCH": "1"}
    with running_service(slow_artifact, tmp_path / "server.log", **env) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with ThreadPoolExecutor(6) as pool:
            # Keep the single worker busy (~0.2 s a run), so the abandoned request has to wait in the queue.
            busy = [pool.submit(_post, server, IMAGES[i]) for i in range(4)]
            # The decode counter moves once a request is in the scheduler, just ahead of the engine.
            wait_for(lambda: server_metric(server, "image_decode_seconds_count") == 4, "the busy requests to queue")
            body = IMAGES[6]
            head = (
                f"POST /infer HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(head + body)
                # Leave only once the request is queued behind the busy ones (not while it is still being read).
                wait_for(lambda: server_metric(server, "image_decode_seconds_count") == 5, "the request to queue")
            wait_for(
                lambda: server_metric(server, "http_requests_total", route="/infer", status="499") == 1,
                "the server to notice the client left",
            )
            assert [f.result().json()["class"] for f in busy] == ["red", "green", "blue", "dark"]
        # Had the worker taken the abandoned job to the engine, it would be there now (in flight), or counted.
        wait_for(lambda: server_metric(server, "inference_queue_depth") == 0, "the queue to empty")
        assert server_metric(server, "inference_in_flight") == 0
        assert server_metric(server, "inference_batch_size_count") == 4, "the abandoned request was run anyway"


def test_sigterm_during_load_answers_every_accepted_request(slow_artifact: Path, tmp_path: Path) -> None:
    env = {"WORKERS": "1", "THREADS": "1", "MAX_QUEUE": "64"}
    server = start_service(slow_artifact, tmp_path / "server.log", **env)
    try:
        names = [["red", "green", "blue", "dark", "red", "green", "blue"][i % len(IMAGES)] for i in range(12)]
        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(_post, server, IMAGES[i % len(IMAGES)]) for i in range(12)]
            waiting: list[float] = []

            def all_inside() -> bool:
                # Every request in the scheduler or answered: one still connecting (on a busy machine a client
                # thread may not have sent yet) would find the listener closed, which is no drain's to answer.
                text = httpx.get(f"{server.url}/metrics", timeout=30).text
                waiting.append(metric(text, "inference_queue_depth"))
                inside = waiting[-1] + metric(text, "inference_in_flight")
                return inside + metric(text, "http_requests_total", route="/infer", status="200") == 12

            wait_for(all_inside, "all 12 requests inside the server")
            assert waiting[-1] >= 3, "the drain is to find requests queued, not only one in the engine"
            server.process.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * 12, [r.text for r in responses if r.status_code != 200]
        assert [r.json()["class"] for r in responses] == names
        assert all(len(r.json()["top_k"]) == 4 for r in responses)
        assert server.process.wait(timeout=30) == 0, server.output()
        assert "Traceback" not in server.output()
    finally:  # a failure above must not leave the server to a later test's garbage collection
        server.process.kill()
        server.process.wait()
