"""Connections that never finish a request, against a real server (service/protocol.py, service/connections.py).

Without the header deadline, a connection that sends nothing, or stops inside its request line or headers, stayed
open for ever; without the descriptor budget, enough of them made `accept` fail for every client, `/ping`
included (checked by serving with uvicorn's own protocol class instead: the first and last tests fail).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import resource
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Server, running_service, server_metric, wait_for

DEADLINE_S = 3.0
KEEP_ALIVE_S = 1
HALF_REQUEST = b"GET /ping HTTP/1.1\r\nHost: test\r\n"


def _address(server: Server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


@pytest.fixture(scope="module")
def server(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("connections") / "service.log"
    with running_service(
        tiny_artifact, log, REQUEST_READ_TIMEOUT_S=str(DEADLINE_S), TIMEOUT_KEEP_ALIVE_S=str(KEEP_ALIVE_S)
    ) as running:
        yield running


# A server with a small budget (budget_for(100): 36 connections) and keep-alives that outlast the test.
SMALL_FILES, SMALL_BUDGET = 100, 36


@pytest.fixture(scope="module")
def small(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("small-budget") / "service.log"
    env = {"REQUEST_READ_TIMEOUT_S": str(DEADLINE_S), "TIMEOUT_KEEP_ALIVE_S": "30"}
    with running_service(tiny_artifact, log, max_files=SMALL_FILES, **env) as running:
        yield running


def _until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when that was (seconds from now)."""
    started = time.monotonic()
    sock.settimeout(limit_s)
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            received += chunk
    return received, time.monotonic() - started


def test_silent_and_half_sent_requests_are_closed_at_the_header_deadline(server: Server) -> None:
    before = server_metric(server, "http_connections_closed_total", reason="header_deadline")
    silent = [socket.create_connection(_address(server)) for _ in range(3)]
    half = [socket.create_connection(_address(server)) for _ in range(3)]
    for i, sock in enumerate(half):
        sock.sendall([b"GE", b"GET /ping HTTP/1.1\r\n", HALF_REQUEST][i])
    for sock in silent:
        received, after_s = _until_closed(sock, DEADLINE_S + 1)
        assert received == b"" and after_s <= DEADLINE_S + 1  # nothing to answer: closed without a word
        sock.close()
    for sock in half:
        received, _ = _until_closed(sock, 1)
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), received
        assert b"connection: close" in head.lower()
        error = json.loads(body)["error"]
        assert error["code"] == "request_timeout" and "REQUEST_READ_TIMEOUT_S" in error["message"]
        sock.close()
    wait_for(
        lambda: server_metric(server, "http_connections_closed_total", reason="header_deadline") >= before + 6,
        "six connections counted as closed at the header deadline",
        timeout=5,
    )


def _request(sock: socket.socket) -> bytes:
    sock.sendall(b"GET /ping HTTP/1.1\r\nHost: test\r\n\r\n")
    received = b""
    while not received.endswith(b'"pong"}'):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {received!r}"
        received += chunk
    return received


def test_a_kept_alive_connection_is_closed_by_the_keep_alive_timeout(server: Server) -> None:
    before = server_metric(server, "http_connections_closed_total", reason="idle")
    with socket.create_connection(_address(server)) as sock:
        assert _request(sock).startswith(b"HTTP/1.1 200 ")
        time.sleep(KEEP_ALIVE_S / 2)
        assert _request(sock).startswith(b"HTTP/1.1 200 ")  # quiet for less than the keep-alive timeout
        received, after_s = _until_closed(sock, DEADLINE_S + 1)
    assert received == b"" and after_s < DEADLINE_S, "closed by the keep-alive timeout, not the header deadline"
    assert server_metric(server, "http_connections_closed_total", reason="idle") >= before + 1


def test_a_slow_but_steady_client_is_served(server: Server) -> None:
    request = b"GET /ping HTTP/1.1\r\nHost: test\r\nUser-Agent: a-slow-phone\r\nAccept: */*\r\n\r\n"
    pieces = [request[i : i + 8] for i in range(0, len(request), 8)]
    with socket.create_connection(_address(server)) as sock:
        for piece in pieces:  # the whole request within about two thirds of the deadline
            sock.sendall(piece)
            time.sleep(DEADLINE_S * 0.66 / len(pieces))
        received = b""
        while not received.endswith(b'"pong"}'):
            received += sock.recv(65536)
    assert received.startswith(b"HTTP/1.1 200 ")


def _ping(server: Server) -> str:
    """One /ping on a new connection: "200", "503" (only with Retry-After), or what went wrong."""
    host, port = _address(server)
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request("GET", "/ping")
        response = connection.getresponse()
        response.read()
        if response.status == 503 and response.getheader("Retry-After") is None:
            return "503 without Retry-After"
        return str(response.status)
    except OSError as exc:
        return type(exc).__name__
    finally:
        connection.close()


def _flood(server: Server, count: int, opened: list[socket.socket]) -> None:
    for _ in range(count):
        try:
            sock = socket.create_connection(_address(server), timeout=5)
            sock.sendall(HALF_REQUEST)
        except OSError:
            continue
        opened.append(sock)


def test_thousands_of_half_sent_requests_lock_nobody_out(tiny_artifact: Path, tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.fail(f"this test opens 2,000 connections; the test process may open only {hard} files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    attack: list[socket.socket] = []
    try:
        with running_service(
            tiny_artifact, tmp_path / "service.log", max_files=1024, REQUEST_READ_TIMEOUT_S="5"
        ) as server:
            flood = threading.Thread(target=_flood, args=(server, 2000, attack))
            flood.start()
            during = []
            while flood.is_alive():
                during.append(_ping(server))
                time.sleep(0.02)
            flood.join()
            during += [_ping(server) for _ in range(10)]
            assert len(attack) >= 1900, "the attack itself could not open its connections"
            assert set(during) <= {"200", "503"} and "200" in during, during
            displaced = server_metric(server, "http_connections_closed_total", reason="budget")
            assert displaced >= 1000, "the budget displaced the oldest half-sent requests"
            # Once the attack stops, its connections are gone within the header deadline.
            wait_for(lambda: server_metric(server, "http_connections_open") <= 2, "the attack's connections closed", 7)
            assert _ping(server) == "200"
            assert "descriptor limit 1024 (hard 1024)" in server.output()
    finally:
        for sock in attack:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_second_half_sent_request_on_a_kept_alive_connection_gets_408(small: Server) -> None:
    with socket.create_connection(_address(small)) as sock:
        assert _request(sock).startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: t\r\n")
        sock.settimeout(DEADLINE_S + 1)
        got = sock.recv(65536)
    assert got.startswith(b"HTTP/1.1 408 "), got
    wait_for(lambda: server_metric(small, "http_connections_open") <= 1, "connections closed", 10)


def test_a_body_in_its_own_packet_arms_no_header_deadline_for_an_idle_connection(small: Server) -> None:
    with socket.create_connection(_address(small)) as sock:
        assert _request(sock).startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"POST /infer HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: 10\r\n\r\n")
        time.sleep(0.2)
        sock.sendall(b"0123456789")
        sock.settimeout(5)
        got = b""
        while b"\r\n\r\n" not in got or not got.rstrip().endswith(b"}"):
            got += sock.recv(65536)
        assert got.startswith(b"HTTP/1.1 4"), got
        sock.settimeout(DEADLINE_S + 1)
        with pytest.raises(TimeoutError):
            extra = sock.recv(65536)
            raise AssertionError(f"unsolicited: {extra!r}")
        assert _request(sock).startswith(b"HTTP/1.1 200 ")
    wait_for(lambda: server_metric(small, "http_connections_open") <= 1, "connections closed", 10)


def test_a_full_budget_of_idle_keep_alives_displaces_the_oldest(small: Server) -> None:
    socks = [socket.create_connection(_address(small)) for _ in range(SMALL_BUDGET)]
    try:
        for sock in socks:
            assert _request(sock).startswith(b"HTTP/1.1 200 ")
        for _ in range(3):  # past the budget: each new one displaces the oldest idle
            with socket.create_connection(_address(small)) as extra:
                assert _request(extra).startswith(b"HTTP/1.1 200 ")
        socks[0].settimeout(2)
        assert socks[0].recv(10) == b""  # the oldest was displaced
        assert _request(socks[-1]).startswith(b"HTTP/1.1 200 ")  # the newest idle one was not
    finally:
        for sock in socks:
            sock.close()
    wait_for(lambda: server_metric(small, "http_connections_open") <= 1, "connections closed", 10)


def test_a_request_being_uploaded_is_never_displaced(small: Server) -> None:
    upload = socket.create_connection(_address(small))
    flood: list[socket.socket] = []
    try:
        upload.sendall(b"POST /infer HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: 10\r\n\r\n01234")
        time.sleep(0.3)
        for _ in range(SMALL_BUDGET + 5):
            sock = socket.create_connection(_address(small))
            sock.sendall(b"GET /ping HTTP/1.1\r\n")
            flood.append(sock)
        time.sleep(0.3)
        upload.sendall(b"56789")
        upload.settimeout(5)
        got = upload.recv(65536)
        assert got.startswith(b"HTTP/1.1 4"), got
    finally:
        upload.close()
        for sock in flood:
            sock.close()
    wait_for(lambda: server_metric(small, "http_connections_open") <= 1, "connections closed", 10)
