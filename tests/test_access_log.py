"""Request IDs and the access log against a real server: the ID round-trips (or is made when absent or insane), is on
every answer and in every error body, and LOG_FORMAT=json writes one parseable line per request, with the ID,
for 200, 4xx, 499, 503 and 504 answers; no key and no image bytes in any line."""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.manifest import Manifest
from tests.helpers import Server, image_bytes, running_service, wait_for, write_tiny_artifact

KEY = "secret-key-4f1d"
MODEL = "tiny-colour-classifier"
# The image every request here sends: its bytes, raw or as base64, must never reach the log.
IMAGE = image_bytes((200, 10, 10))
AUTH = {"Authorization": f"Bearer {KEY}"}
RAW = {**AUTH, "Content-Type": "image/png"}  # IMAGE as the whole body


@pytest.fixture(scope="module")
def busy_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("busy") / "artifact"
    write_tiny_artifact(out, busy_matmuls=40)  # a run long enough to queue behind, or to hang up during
    return out


@pytest.fixture(scope="module")
def server(busy_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("access") / "server.log"
    env = {"LOG_FORMAT": "json", "API_KEY": KEY, "WORKERS": "1", "THREADS": "1", "MAX_QUEUE": "1"}
    with running_service(busy_artifact, log, **env) as running:
        yield running


def _lines(server: Server) -> list[dict[str, Any]]:
    """Every line the server wrote: each must be one JSON object."""
    return [json.loads(line) for line in server.output().splitlines() if line.strip()]


def _access(server: Server, request_id: str) -> dict[str, Any]:
    wait_for(lambda: any(line.get("request_id") == request_id for line in _access_lines(server)), request_id)
    (line,) = [line for line in _access_lines(server) if line["request_id"] == request_id]
    return line


def _access_lines(server: Server) -> list[dict[str, Any]]:
    return [line for line in _lines(server) if line["logger"] == "service.access"]


def _tag(model_dir: Path) -> str:
    return f"{MODEL}@sha256:{Manifest.read(model_dir).model.sha256[:12]}"


def test_the_request_id_round_trips_and_is_made_when_absent_or_insane(server: Server, busy_artifact: Path) -> None:
    given = httpx.get(f"{server.url}/ping", headers={"X-Request-ID": "lb-7f3a/42"})
    assert given.headers["x-request-id"] == "lb-7f3a/42"
    assert given.headers["x-model"] == _tag(busy_artifact)
    made = [httpx.get(f"{server.url}/ping").headers["x-request-id"] for _ in range(2)]
    too_long = httpx.get(f"{server.url}/ping", headers={"X-Request-ID": "x" * 129})
    for request_id in (*made, too_long.headers["x-request-id"]):
        assert len(request_id) == 32 and int(request_id, 16) >= 0
    assert made[0] != made[1]
    assert httpx.get(f"{server.url}/ping", headers={"X-Request-ID": "x" * 128}).headers["x-request-id"] == "x" * 128
    # Bytes that are not ASCII (a header is latin-1 on the wire): replaced, never echoed.
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: t\r\nX-Request-ID: caf\xe9\r\nConnection: close\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
    echoed = [line for line in head.split(b"\r\n") if line.lower().startswith(b"x-request-id:")]
    assert len(echoed) == 1 and len(echoed[0].split(b": ")[1]) == 32


def test_every_error_body_and_answer_carries_the_id(server: Server) -> None:
    answers = {
        "401": httpx.post(f"{server.url}/infer", files={"image": IMAGE}, headers={"X-Request-ID": "e-401"}),
        "400": httpx.post(
            f"{server.url}/infer", files={"image": b"no image"}, headers={**AUTH, "X-Request-ID": "e-400"}
        ),
        "404": httpx.get(f"{server.url}/nowhere", headers={**AUTH, "X-Request-ID": "e-404"}),
        "403": httpx.post(f"{server.url}/v2/repository/models/{MODEL}/load", headers={**AUTH, "X-Request-ID": "e-403"}),
    }
    for status, answer in answers.items():
        assert str(answer.status_code) == status, answer.text
        assert answer.headers["x-request-id"] == f"e-{status}"
        body = answer.json()
        # The service's shape has the ID beside the code; the Open Inference Protocol's beside its message.
        request_id = body["request_id"] if isinstance(body["error"], str) else body["error"]["request_id"]
        assert request_id == f"e-{status}"
    assert "MODEL_LOAD=enabled" in answers["403"].json()["error"]
    for status, code in (("401", "unauthorized"), ("400", "invalid_image"), ("404", "not_found")):
        line = _access(server, f"e-{status}")
        assert (line["status"], line["error"]) == (int(status), code)
    assert _access(server, "e-403")["error"] == "model_load_disabled"


def test_an_answered_request_has_one_line_with_its_stages(server: Server, busy_artifact: Path) -> None:
    answer = httpx.post(f"{server.url}/infer", files={"image": IMAGE}, headers={**AUTH, "X-Request-ID": "ok-1"})
    assert answer.status_code == 200, answer.text
    line = _access(server, "ok-1")
    assert (line["method"], line["route"], line["status"], line["error"]) == ("POST", "/infer", 200, None)
    assert line["model"] == _tag(busy_artifact) and line["images"] == 1
    assert line["bytes_in"] > len(IMAGE)  # the multipart body around it
    assert line["client"].startswith("127.0.0.1:")
    stages = [line[key] for key in ("read_ms", "queue_ms", "decode_ms", "engine_ms")]
    assert all(value >= 0 for value in stages) and line["decode_ms"] > 0 and line["engine_ms"] > 0
    assert sum(stages) <= line["duration_ms"] + 0.01, line
    assert time.time() - 60 < _epoch(line["time"]) <= time.time() + 1


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def _hang_up(server: Server) -> None:
    """Send one request and close the connection at once: the server notices while it reads the body, or while
    the image is in the engine (a run here takes tens of milliseconds), and answers nobody: 499."""
    head = (
        f"POST /infer HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\nX-Request-ID: gone-1\r\n"
        f"Content-Type: image/png\r\nContent-Length: {len(IMAGE)}\r\n\r\n"
    ).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head + IMAGE)


def test_499_and_503_lines_carry_the_id(server: Server) -> None:
    _hang_up(server)
    assert _access(server, "gone-1")["status"] == 499
    assert _access(server, "gone-1")["error"] == "client_closed_request"

    # One worker, a queue of one: of eight requests at once, most are refused 503 with their own IDs.
    def post(i: int) -> httpx.Response:
        return httpx.post(f"{server.url}/infer", content=IMAGE, headers={**RAW, "X-Request-ID": f"load-{i}"})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, range(8)))
    refused = [answer for answer in answers if answer.status_code == 503]
    assert refused and {answer.status_code for answer in answers} <= {200, 503}, [a.status_code for a in answers]
    for answer in refused:
        request_id = answer.headers["x-request-id"]
        assert answer.json()["error"]["request_id"] == request_id
        assert _access(server, request_id)["status"] == 503 and _access(server, request_id)["error"] == "overloaded"


def test_a_504_line_carries_the_id(busy_artifact: Path, tmp_path: Path) -> None:
    env = {"LOG_FORMAT": "json", "REQUEST_TIMEOUT_S": "0.001", "THREADS": "1"}
    with running_service(busy_artifact, tmp_path / "server.log", **env) as late:
        headers = {"Content-Type": "image/png", "X-Request-ID": "late-1"}
        answer = httpx.post(f"{late.url}/infer", content=IMAGE, headers=headers)
        assert answer.status_code == 504 and answer.headers["x-request-id"] == "late-1"
        assert answer.json()["error"]["request_id"] == "late-1"
        line = _access(late, "late-1")
        assert (line["status"], line["error"]) == (504, "deadline_exceeded")


def test_no_line_holds_a_key_or_image_bytes(server: Server) -> None:
    # Runs last in this module: every line the server wrote above, at start-up included.
    marked = b"\x89PNG-never-logged-" + IMAGE
    httpx.post(f"{server.url}/infer", content=marked, headers={**RAW, "X-Request-ID": "marked"})
    httpx.post(f"{server.url}/infer", json={"image": base64.b64encode(IMAGE).decode()}, headers=AUTH)
    _access(server, "marked")
    text = server.output()
    lines = _lines(server)  # every line parses: start-up, uvicorn's, the access lines
    assert len(_access_lines(server)) >= 20 and all("time" in line and "level" in line for line in lines)
    assert KEY not in text and "Bearer" not in text
    assert "never-logged" not in text and base64.b64encode(IMAGE).decode()[:40] not in text


def test_the_settings_parse_and_refuse_a_bad_value() -> None:
    from service.settings import Settings, SettingsError

    assert (Settings.from_env({}).log_format, Settings.from_env({}).model_load) == ("text", False)
    assert Settings.from_env({"LOG_FORMAT": "JSON", "MODEL_LOAD": "Enabled"}).log_format == "json"
    assert Settings.from_env({"MODEL_LOAD": "enabled"}).model_load
    assert not Settings.from_env({"MODEL_LOAD": "disabled"}).model_load
    for env in ({"LOG_FORMAT": "xml"}, {"MODEL_LOAD": "yes"}):
        with pytest.raises(SettingsError, match=next(iter(env))):
            Settings.from_env(env)
    assert Settings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": " http://c:4318 "}).otlp_endpoint == "http://c:4318"


def test_the_text_format_is_one_readable_line_per_request(busy_artifact: Path, tmp_path: Path) -> None:
    with running_service(busy_artifact, tmp_path / "server.log") as plain:
        httpx.post(f"{plain.url}/infer", files={"image": IMAGE}, headers={"X-Request-ID": "plain-1"})
        wait_for(lambda: "request plain-1" in plain.output(), "the access line")
    (line,) = [line for line in plain.output().splitlines() if "request plain-1" in line]
    assert line.startswith("INFO:     127.0.0.1:") and '"POST /infer" 200 ' in line and "1 image" in line, line
