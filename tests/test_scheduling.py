"""The scheduler under real concurrent load, against a real server and a model that takes real engine time."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import Server, image_bytes, running_service, start_service, write_tiny_artifact

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


def test_overload_sheds_with_503_and_recovers(busy_artifact: Path, tmp_path: Path) -> None:
    env = {"WORKERS": "1", "THREADS": "1", "MAX_QUEUE": "2", "MAX_BATCH": "1"}
    with running_service(busy_artifact, tmp_path / "server.log", **env) as server:
        responses = _blast(server, clients=24, requests=48)
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(200) >= 3 and statuses.count(503) >= 10, statuses
        for r in responses:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "overloaded"
        # Recovered: the queue drained, a new request is served.
        assert _post(server, IMAGES[0]).status_code == 200
        assert "Traceback" not in server.output()


def test_deadline_gives_504_not_500(busy_artifact: Path, tmp_path: Path) -> None:
    env = {"WORKERS": "1", "THREADS": "1", "REQUEST_TIMEOUT_S": "0.03", "MAX_QUEUE": "64"}
    with running_service(busy_artifact, tmp_path / "server.log", **env) as server:
        responses = _blast(server, clients=12, requests=24)
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 504}, statuses
        assert 504 in statuses
        assert all(r.json()["error"]["code"] == "deadline_exceeded" for r in responses if r.status_code == 504)
        assert httpx.get(f"{server.url}/ping").status_code == 200


def test_a_request_whose_client_left_never_reaches_the_engine(slow_artifact: Path, tmp_path: Path) -> None:
    env = {"WORKERS": "1", "THREADS": "1", "MAX_BATCH": "1"}
    with running_service(slow_artifact, tmp_path / "server.log", **env) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with ThreadPoolExecutor(6) as pool:
            # Keep the single worker busy, so the abandoned request has to wait in the queue.
            busy = [pool.submit(_post, server, IMAGES[i]) for i in range(4)]
            deadline = time.monotonic() + 10
            while _gauge(server, "inference_queue_depth") < 2:
                assert time.monotonic() < deadline, "the busy requests never queued up"
                time.sleep(0.002)
            body = IMAGES[6]
            head = (
                f"POST /infer HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(head + body)
                time.sleep(0.01)
            assert all(f.result().status_code == 200 for f in busy)
        time.sleep(0.3)
        families = _metrics(server)
        runs = {n: v for n, lab, v in families["inference_batch_size"] if n.endswith("_count")}
        assert runs["inference_batch_size_count"] == 4, "the abandoned request was run anyway"
        statuses = {lab["status"] for n, lab, v in families["http_requests"] if lab["route"] == "/infer"}
        assert "499" in statuses


def test_sigterm_during_load_answers_every_accepted_request(slow_artifact: Path, tmp_path: Path) -> None:
    env = {"WORKERS": "1", "THREADS": "1", "MAX_QUEUE": "64"}
    server = start_service(slow_artifact, tmp_path / "server.log", **env)
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(_post, server, IMAGES[i % len(IMAGES)]) for i in range(12)]
        deadline = time.monotonic() + 10
        while _gauge(server, "inference_queue_depth") < 6:  # until the requests are queued inside the server
            assert time.monotonic() < deadline, "the requests never queued up"
            time.sleep(0.005)
        server.process.send_signal(signal.SIGTERM)
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * 12, [r.text for r in responses if r.status_code != 200]
    assert server.process.wait(timeout=30) == 0, server.output()
