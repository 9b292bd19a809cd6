"""Clients that are slow, stall, or send far too much, against a real server: everyone else keeps being served.

Each test here failed before service/middleware.py existed (checked by removing the ClientGuard from the app,
and by moving admission back in front of the body read): see the comments for which mechanism each one guards.
"""

from __future__ import annotations

import contextlib
import http.client
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from service.settings import Settings, SettingsError
from tests.helpers import Server, image_bytes, running_service

RED = image_bytes((255, 0, 0))
MIB = 1024 * 1024


def _address(server: Server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def _statuses(server: Server, route: str) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics").text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "http_requests":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels["route"] == route:
                    counts[sample.labels["status"]] = sample.value
    return counts


def _open_trickler(server: Server, length: int = 200_000) -> socket.socket:
    """A POST /infer whose headers promise `length` bytes, then a first byte: the rest comes slowly, or never."""
    sock = socket.create_connection(_address(server), timeout=30)
    head = f"POST /infer HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: {length}\r\n\r\n"
    sock.sendall(head.encode() + b"\x89")
    return sock


@pytest.fixture(scope="module")
def guarded_server(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("logs") / "guarded.log"
    env = {"REQUEST_READ_TIMEOUT_S": "5", "MAX_UPLOAD_BYTES": str(MIB), "MAX_CONNECTIONS": "128"}
    with running_service(tiny_artifact, log, **env) as server:
        yield server


def test_eighty_trickling_uploads_neither_lock_others_out_nor_stay_forever(guarded_server: Server) -> None:
    # 80 slow uploads are more than the admission limit (MAX_QUEUE 64 + 2 workers): before, they held its
    # slots while their bodies trickled in, and every other client got 503 for as long as they stayed.
    before = _statuses(guarded_server, "/infer").get("408", 0)
    tricklers = [_open_trickler(guarded_server) for _ in range(80)]
    try:
        for sock in tricklers:  # keep them alive and visibly slow: one more byte each
            sock.sendall(b"\x00")
        with ThreadPoolExecutor(4) as pool:
            answers = list(
                pool.map(lambda _: httpx.post(f"{guarded_server.url}/infer", files={"image": RED}), range(8))
            )
        assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers if a.status_code != 200]
        # They were all still open while the others were served: nothing had been answered to them yet.
        for sock in tricklers:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
            sock.setblocking(True)
        # Past the deadline (5 s of grace at 16 KiB/s: a few bytes buy nothing), each is answered 408 and closed.
        for sock in tricklers:
            sock.settimeout(30)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b"connection: close" in answer.lower()
            assert b'"request_timeout"' in answer
    finally:
        for sock in tricklers:
            sock.close()
    assert _statuses(guarded_server, "/infer").get("408", 0) - before == 80
    assert httpx.post(f"{guarded_server.url}/infer", files={"image": RED}).status_code == 200


def test_a_stalled_multipart_and_json_upload_time_out_too(guarded_server: Server) -> None:
    for content_type in ("multipart/form-data; boundary=xyz", "application/json"):
        sock = socket.create_connection(_address(guarded_server), timeout=30)
        with sock:
            head = f"POST /infer HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\nContent-Length: 5000\r\n\r\n"
            sock.sendall(head.encode() + b"--xyz\r\n" if "multipart" in content_type else head.encode() + b'{"ima')
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408"), (content_type, answer[:200])


def test_a_fast_start_buys_no_long_stall(guarded_server: Server) -> None:
    # 4 MiB sent at once would buy 4 MiB / 16 KiB/s = 256 s at the minimum rate; silence still ends after the
    # 5 s of grace. (Before: the socket's 30 s timeout fired first.)
    with socket.create_connection(_address(guarded_server), timeout=30) as sock:
        head = f"POST /infer HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: {8 * MIB}\r\n\r\n"
        sock.sendall(head.encode() + b"\x00" * (4 * MIB))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith((b"HTTP/1.1 408", b"HTTP/1.1 413")), answer[:200]
    assert b"connection: close" in answer.lower()


def test_beyond_max_connections_answers_503_and_recovers(tiny_artifact: Path, tmp_path: Path) -> None:
    env = {"MAX_CONNECTIONS": "4", "REQUEST_READ_TIMEOUT_S": "60"}
    with running_service(tiny_artifact, tmp_path / "server.log", **env) as server:
        tricklers = [_open_trickler(server) for _ in range(4)]
        try:
            deadline = time.monotonic() + 10
            while (response := httpx.get(f"{server.url}/ping")).status_code == 200:
                assert time.monotonic() < deadline, "the four open uploads never counted"
                time.sleep(0.05)
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "overloaded"
            assert "MAX_CONNECTIONS" in response.json()["error"]["message"]
        finally:
            for sock in tricklers:
                sock.close()
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.url}/ping").status_code != 200:
            assert time.monotonic() < deadline, "closed uploads kept their places"
            time.sleep(0.05)


def _urllib(url: str, size: int) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=b"\x00" * size, headers={"Content-Type": "image/png"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _http_client(url: str, size: int) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request("POST", "/infer", body=b"\x00" * size, headers={"Content-Type": "image/png"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _requests(url: str, size: int) -> tuple[int, bytes]:
    response = requests.post(url, data=b"\x00" * size, headers={"Content-Type": "image/png"}, timeout=60)
    return response.status_code, response.content


def _httpx(url: str, size: int) -> tuple[int, bytes]:
    response = httpx.post(url, content=b"\x00" * size, headers={"Content-Type": "image/png"}, timeout=60)
    return response.status_code, response.content


def _curl(url: str, size: int, tmp: Path) -> tuple[int, bytes]:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    body = tmp / f"upload-{size}.bin"
    with body.open("wb") as sink:
        sink.truncate(size)
    out = tmp / "curl-answer.json"
    result = subprocess.run(
        [curl, "-s", "-o", str(out), "-w", "%{http_code}", "-H", "Content-Type: image/png",
         "--data-binary", f"@{body}", url],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return int(result.stdout or 0), out.read_bytes()


CLIENTS = {"urllib": _urllib, "http.client": _http_client, "requests": _requests, "httpx": _httpx}


@pytest.mark.parametrize("size_mib", [12, 50])
@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_every_client_reads_the_413(guarded_server: Server, client: str, size_mib: int) -> None:
    # urllib and http.client send `Connection: close` and write the whole body before reading: when the
    # server answered and closed with the body unread, the kernel reset the connection (10 of 10 before).
    status, body = CLIENTS[client](f"{guarded_server.url}/infer", size_mib * MIB)
    assert status == 413, body[:200]
    assert b'"payload_too_large"' in body


def test_urllib_reads_the_413_of_a_200_mib_upload(guarded_server: Server) -> None:
    status, body = _urllib(f"{guarded_server.url}/infer", 200 * MIB)
    assert status == 413 and b'"payload_too_large"' in body


@pytest.mark.parametrize("size_mib", [12, 50])
def test_curl_reads_the_413(guarded_server: Server, tmp_path: Path, size_mib: int) -> None:
    # curl sends `Expect: 100-continue`: the 413 goes out before any body byte is asked for.
    status, body = _curl(f"{guarded_server.url}/infer", size_mib * MIB, tmp_path)
    assert status == 413 and b'"payload_too_large"' in body


def test_discarding_stores_nothing(guarded_server: Server) -> None:
    rss = Path(f"/proc/{guarded_server.process.pid}/status")
    if not rss.exists():
        pytest.skip("RSS is read from Linux /proc")

    def resident_mib() -> float:
        line = next(line for line in rss.read_text().splitlines() if line.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    before = resident_mib()
    for _ in range(3):
        assert _urllib(f"{guarded_server.url}/infer", 200 * MIB)[0] == 413
    assert resident_mib() - before < 64, "the discarded bodies were kept"


def test_beyond_max_discard_bytes_the_413_is_immediate_and_closes(tiny_artifact: Path, tmp_path: Path) -> None:
    env = {"MAX_UPLOAD_BYTES": str(MIB), "MAX_DISCARD_BYTES": str(8 * MIB), "REQUEST_READ_TIMEOUT_S": "60"}
    with running_service(tiny_artifact, tmp_path / "server.log", **env) as server:
        with socket.create_connection(_address(server), timeout=10) as sock:
            head = f"POST /infer HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: {9 * MIB}\r\n\r\n"
            sock.sendall(head.encode())  # and no body: the answer must not wait for it
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"connection: close" in answer.lower()
        # A body that streams past the bound (chunked: no length to judge by) is cut off there, answered and closed.
        with socket.create_connection(_address(server), timeout=10) as sock:
            head = b"POST /infer HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
            sock.sendall(head)
            chunk = b"10000\r\n" + b"\x00" * 0x10000 + b"\r\n"
            answer = b""
            with pytest.raises(OSError):  # the server closes while we still send: that is the point
                for _ in range(1000):  # 64 MiB offered
                    sock.sendall(chunk)
                    sock.setblocking(False)
                    with contextlib.suppress(BlockingIOError):
                        answer += sock.recv(65536)
                    sock.setblocking(True)
                raise AssertionError("the server read 64 MiB past an 8 MiB bound")
        assert answer.startswith(b"HTTP/1.1 413") or answer == b"", answer[:200]


def test_client_settings_are_read_and_checked(tmp_path: Path) -> None:
    s = Settings.from_env({})
    assert (s.request_read_timeout_s, s.min_upload_bytes_per_s, s.max_connections) == (10.0, 16 * 1024, 128)
    assert (s.max_discard_bytes, s.timeout_keep_alive_s) == (256 * MIB, 75)
    env = {
        "REQUEST_READ_TIMEOUT_S": "2.5",
        "MIN_UPLOAD_BYTES_PER_S": "1000",
        "MAX_CONNECTIONS": "7",
        "MAX_DISCARD_BYTES": "0",
        "TIMEOUT_KEEP_ALIVE_S": "120",
    }
    s = Settings.from_env(env)
    assert (s.request_read_timeout_s, s.min_upload_bytes_per_s, s.max_connections) == (2.5, 1000, 7)
    assert (s.max_discard_bytes, s.timeout_keep_alive_s) == (0, 120)
    for key, value in [("MAX_CONNECTIONS", "0"), ("REQUEST_READ_TIMEOUT_S", "0"), ("MIN_UPLOAD_BYTES_PER_S", "x")]:
        with pytest.raises(SettingsError, match=key):
            Settings.from_env({key: value})
