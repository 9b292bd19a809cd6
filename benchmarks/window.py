"""A steady-state window inside a load phase: requests counted by the service, CPU per request by thread role.

Locust's own requests/s includes its ramp-up and its last, half-empty second. The window skips both: it
starts SETTLE_S after the first answers and ends TAIL_S before the load phase does, and it counts answered
requests from the service's own /metrics, so the figure is the service's sustained rate. Over the same
window it records the CPU time of the service's threads (inference, decode, event loop) and of the load
generator, per answered request.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import cpu

SETTLE_S = 2.0
TAIL_S = 4.0


def answered(url: str) -> int:
    """POST /infer answers with status 200 so far, from the service's own counter."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "http_requests":
            return int(
                sum(
                    s.value
                    for s in family.samples
                    if s.name.endswith("_total") and s.labels == {"route": "/infer", "status": "200"}
                )
            )
    return 0


def settle(url: str) -> None:
    """Blocks until the service has answered the load generator's first requests, then SETTLE_S more."""
    first = answered(url)
    deadline = time.perf_counter() + 60
    while answered(url) == first and time.perf_counter() < deadline:  # the load generator is still starting
        time.sleep(0.2)
    time.sleep(SETTLE_S)


def span_s(duration_s: float) -> float:
    """How long the window of a `duration_s` load phase lasts."""
    return duration_s - SETTLE_S - TAIL_S


def measure(url: str, service_pid: int, load_pid: int, duration_s: float) -> dict[str, Any]:
    """Blocks while a load generator (`load_pid`) drives the service for `duration_s`: until its first
    answers, SETTLE_S more, then the window, which ends TAIL_S before the load phase does."""
    settle(url)
    count0, before = answered(url), cpu.snapshot(service_pid, load_pid)
    time.sleep(span_s(duration_s))
    count1, after = answered(url), cpu.snapshot(service_pid, load_pid)
    requests = count1 - count0
    return {
        "seconds": round(after.at - before.at, 2),
        "answered": requests,
        "answered_per_s": round(requests / (after.at - before.at), 2),
        "cpu_ms_per_request": cpu.per_item_ms(before, after, requests),
        "machine_idle": cpu.machine_idle(before, after),
    }
