"""A real load balancer in front of real replicas: a rolling restart loses nothing; a killed replica is reported.

HAProxy (Debian's package) listens on 127.0.0.1 in front of three `python -m service` processes and checks
each one's /ready. While client threads post images through it, every replica is replaced in turn the way a
Kubernetes rollout does it (deploy/k8s/deployment.yaml): the replica leaves the balancer (`set server ... state
drain`, what the endpoint removal does while preStop runs) and gets SIGTERM at once, with requests still in
flight; the test waits for exit 0, starts a new process on a new port, waits for /ready, and points the
balancer's server slot at the new port through HAProxy's runtime API. No request may fail. Then one replica is
killed with SIGKILL, with no warning, and the test reports (prints, and writes rolling-restart.json under its
tmp_path) how many requests failed and how long HAProxy took to mark it down.

Why leave the balancer first: with SIGTERM alone (the service's /ready turns 503, but the health check needs
time to see it), 1 request in 4 runs was lost on a loaded machine: HAProxy sent it over an idle keep-alive
connection at the moment the stopping server closed that connection. That race is why the Deployment has a
preStop pause; the drain itself is exercised either way, since SIGTERM arrives with requests in flight.

Retries: `retries 3` with `option redispatch` retry a request whose connection to a server could not be made
(`retry-on conn-failure`, HAProxy's default) on another server; such a request never reached a server, so this is
safe for any method. Requests that did reach a server are not retried (no `retry-on empty-response`): POST is
not idempotent in HTTP, and although /infer has no side effects, retrying a request that took its replica down
would let one bad request take down the next replica too. It would also hide a broken drain from this test.
So the requests in flight on a killed replica fail, and this test counts them.
"""

from __future__ import annotations

import csv
import io
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.helpers import Server, free_port, image_bytes, start_service, wait_until_ok, write_tiny_artifact
from tests.system import require_executable

pytestmark = pytest.mark.slow

REPLICAS = 3
CLIENTS = 8
# A test that hangs must still end: the load stops at this deadline whatever happens.
LOAD_LIMIT_S = 240
CHECK_INTER_MS = 200

CONFIG = """
global
    stats socket {socket} mode 600 level admin
    log stdout format raw local0 info
    maxconn 512

defaults
    mode http
    log global
    option httplog
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    # The check's own deadline: by default it is `inter`, and on a loaded 2-core machine /ready can take longer
    # than 200 ms, which marked every replica down at once.
    timeout check 2s
    retries 3
    option redispatch 1
    retry-on conn-failure

frontend web
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk GET /ready
    http-check expect status 200
    default-server check inter {inter}ms fall 2 rise 2
{servers}
"""


class HAProxy:
    def __init__(self, executable: str, tmp_path: Path, replicas: list[Server]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.socket = tmp_path / "haproxy.sock"
        self.log = tmp_path / "haproxy.log"
        servers = "\n".join(
            f"    server s{i} 127.0.0.1:{r.url.rsplit(':', 1)[1]}" for i, r in enumerate(replicas, start=1)
        )
        config = tmp_path / "haproxy.cfg"
        config.write_text(
            CONFIG.format(socket=self.socket, port=self.port, inter=CHECK_INTER_MS, servers=servers).lstrip()
        )
        subprocess.run([executable, "-c", "-f", str(config)], check=True, capture_output=True)
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen([executable, "-f", str(config), "-db"], stdout=sink, stderr=sink)
        self.names = [f"s{i}" for i in range(1, len(replicas) + 1)]

    def wait_until_all_up(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.socket.exists() or self.states() != dict.fromkeys(self.names, "UP"):
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, f"HAProxy never saw every replica ready:\n{self.log.read_text()}"
            time.sleep(0.05)

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(self.socket))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def stats(self) -> dict[str, dict[str, str]]:
        rows = csv.DictReader(io.StringIO(self.command("show stat").lstrip("# ")))
        return {row["svname"]: row for row in rows if row["pxname"] == "replicas"}

    def states(self) -> dict[str, str]:
        return {name: row["status"] for name, row in self.stats().items() if name.startswith("s")}

    def wait_for(self, server: str, status: str, timeout: float = 30) -> float:
        """Seconds until HAProxy reports the server in this state (polled every 10 ms)."""
        started = time.monotonic()
        while (now := time.monotonic()) - started < timeout:
            if self.states()[server] == status:
                return now - started
            time.sleep(0.01)
        raise AssertionError(f"{server} not {status} within {timeout} s: {self.states()}\n{self.log.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class Load:
    """Closed-loop clients posting one image each through the balancer, every answer recorded."""

    url: str
    image: bytes
    stop: threading.Event = field(default_factory=threading.Event)
    results: list[tuple[float, float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def client(self) -> None:
        deadline = time.monotonic() + LOAD_LIMIT_S
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self.stop.is_set() and time.monotonic() < deadline:
                started = time.monotonic()
                try:
                    response = http.post("/infer", files={"image": ("car.png", self.image, "image/png")})
                    outcome = "ok" if response.status_code == 200 else f"{response.status_code} {response.text[:200]}"
                except httpx.HTTPError as exc:
                    outcome = f"{type(exc).__name__}: {exc}"
                with self.lock:
                    self.results.append((started, time.monotonic(), outcome))

    def failures(self, since: float = 0.0, until: float = float("inf")) -> list[tuple[float, float, str]]:
        with self.lock:
            return [r for r in self.results if r[2] != "ok" and since <= r[1] <= until]

    def answered(self, since: float = 0.0, until: float = float("inf")) -> int:
        with self.lock:
            return sum(1 for r in self.results if r[2] == "ok" and since <= r[1] <= until)


def _answered_by(server: Server) -> float:
    metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("http_requests_total{") and 'route="/infer"' in line and 'status="200"' in line
    )


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[list[Server]]:
    artifact = tmp_path / "artifact"
    # Real engine time per request (eight 384x384 matrix products): requests are in flight when a replica stops.
    write_tiny_artifact(artifact, busy_matmuls=8)
    started: list[Server] = []
    try:
        for i in range(REPLICAS):
            started.append(start_service(artifact, tmp_path / f"replica-{i}.log", THREADS="1"))
        for server in started:
            wait_until_ok(f"{server.url}/ready", server.output, 30)
        yield started
    finally:
        for server in started:
            if server.process.poll() is None:
                server.process.kill()
                server.process.wait()


@pytest.fixture
def haproxy(tmp_path: Path, replicas: list[Server]) -> Iterator[HAProxy]:
    balancer = HAProxy(require_executable("haproxy"), tmp_path, replicas)
    try:
        balancer.wait_until_all_up()
        yield balancer
    finally:
        balancer.stop()


def test_rolling_restart_behind_haproxy_loses_no_request(
    tmp_path: Path, replicas: list[Server], haproxy: HAProxy
) -> None:
    load = Load(haproxy.url, image_bytes((200, 30, 30)))
    clients = [threading.Thread(target=load.client, daemon=True) for _ in range(CLIENTS)]
    report: dict[str, object] = {"replicas": REPLICAS, "clients": CLIENTS, "check_inter_ms": CHECK_INTER_MS}
    try:
        for thread in clients:
            thread.start()
        while load.answered() < 50:
            assert all(t.is_alive() for t in clients), load.failures()
            time.sleep(0.05)

        replaced, in_flight_at_sigterm, drain_s = [], [], []
        artifact = tmp_path / "artifact"
        for i, old in enumerate(list(replicas), start=1):
            name = f"s{i}"
            haproxy.command(f"set server replicas/{name} state drain")
            in_flight_at_sigterm.append(int(haproxy.stats()[name]["scur"]))
            stopping = time.monotonic()
            old.process.send_signal(signal.SIGTERM)
            assert old.process.wait(timeout=60) == 0, old.output()
            drain_s.append(round(time.monotonic() - stopping, 3))
            new = start_service(artifact, tmp_path / f"replica-{i}-new.log", THREADS="1")
            replicas.append(new)
            wait_until_ok(f"{new.url}/ready", new.output, 30)
            haproxy.command(f"set server replicas/{name} addr 127.0.0.1 port {new.url.rsplit(':', 1)[1]}")
            haproxy.command(f"set server replicas/{name} state ready")
            haproxy.wait_for(name, "UP")
            replaced.append(new)
            answered = load.answered()
            while load.answered() < answered + 30:
                assert all(t.is_alive() for t in clients), load.failures()
                time.sleep(0.05)
        rolled = time.monotonic()
        failures = load.failures()
        report["rolling_restart"] = {
            "answered": load.answered(),
            "failed": len(failures),
            "in_flight_at_sigterm": in_flight_at_sigterm,
            "sigterm_to_exit_s": drain_s,
            "answered_by_each_new_replica": [_answered_by(server) for server in replaced],
        }

        victim = replaced[1]
        killed = time.monotonic()
        in_flight = int(haproxy.stats()["s2"]["scur"])
        victim.process.kill()
        down_after = haproxy.wait_for("s2", "DOWN")
        settled = time.monotonic()
        answered = load.answered()
        while load.answered() < answered + 30:
            assert all(t.is_alive() for t in clients), load.failures()
            time.sleep(0.05)
        stats = haproxy.stats()["s2"]
        lost = load.failures(since=killed)
        report["sigkill"] = {
            "in_flight_when_killed": in_flight,
            "failed": len(lost),
            "failures": sorted({outcome for _, _, outcome in lost}),
            "marked_down_after_s": round(down_after, 3),
            "failed_after_marked_down": len(load.failures(since=settled)),
            "connection_retries": int(stats["wretr"]),
            "redispatched": int(stats["wredis"]),
        }
    finally:
        load.stop.set()
        for thread in clients:
            thread.join(timeout=40)
    (tmp_path / "rolling-restart.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\nrolling restart behind HAProxy:", json.dumps(report, indent=2))

    assert failures == [], f"{len(failures)} requests failed during the rolling restart: {failures[:5]}"
    # The drain was exercised: requests were in flight when SIGTERM came, and the new replicas took traffic.
    assert sum(in_flight_at_sigterm) > 0, "no request was in flight at any SIGTERM: the test proved nothing"
    assert all(n > 0 for n in report["rolling_restart"]["answered_by_each_new_replica"])  # type: ignore[index]
    assert rolled <= killed
