"""Locust load test for POST /infer, sending real JPEG bytes as the original's clients do.

    locust -f benchmarks/locustfile.py --host http://127.0.0.1:4000 --headless -u 8 -r 8 -t 60s --csv out/run

A success is a 200 with a "class". A failure's message starts with "status NNN:" (0: no HTTP answer; a 503 with
Retry-After says so next). BENCH_IMAGE_SET names the image set (payloads.SETS). With --csv PREFIX, failures go
to PREFIX_failures.json and each request's own time in ms to PREFIX_times.json (Locust's are whole ms).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

from locust import FastHttpUser, events, task
from locust.env import Environment
from urllib3 import encode_multipart_formdata

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.payloads import image_set  # noqa: E402

# Encoded once, so the load generator spends its CPU on sending, not on building bodies.
IMAGES = image_set(os.environ.get("BENCH_IMAGE_SET", "large"))
BODIES = [encode_multipart_formdata({"image": ("car.jpg", data, "image/jpeg")}) for data in IMAGES]


_ENVIRONMENT: list[Environment] = []
_TIMES_MS: list[float] = []


@events.init.add_listener
def _remember(environment: Environment, **kwargs: object) -> None:
    _ENVIRONMENT.append(environment)


@events.request.add_listener
def _time(response_time: float, **kwargs: object) -> None:
    _TIMES_MS.append(response_time)


@events.quit.add_listener
def _write_failures(**kwargs: object) -> None:
    # Fired after every user has stopped, before Locust closes its CSV files: the final counts.
    if not _ENVIRONMENT or not getattr(_ENVIRONMENT[0].parsed_options, "csv_prefix", None):
        return
    environment = _ENVIRONMENT[0]
    failures: dict[str, int] = {}
    for error in environment.stats.errors.values():
        args = getattr(error.error, "args", None)  # a CatchResponseError carries the message given to failure()
        message = str(args[0]) if args else str(error.error)
        failures[message] = failures.get(message, 0) + error.occurrences
    Path(f"{environment.parsed_options.csv_prefix}_failures.json").write_text(json.dumps(failures))
    times = [round(t, 3) for t in _TIMES_MS]
    Path(f"{environment.parsed_options.csv_prefix}_times.json").write_text(json.dumps(times))


def failed_status(response: Any) -> bool:
    """Mark a non-200 answer failed, as "status NNN: [Retry-After N] body...", the form benchmarks.sweep sorts
    into load shedding and failures."""
    if response.status_code == 200:
        return False
    retry_after = response.headers.get("Retry-After") if response.headers else None
    shed = f"[Retry-After {retry_after}] " if retry_after is not None else ""
    response.failure(f"status {response.status_code}: {shed}{(response.text or '')[:200]}")
    return True


class InferUser(FastHttpUser):  # type: ignore[misc]
    # Closed loop, no think time: each user sends its next request as soon as the last one is answered.

    def on_start(self) -> None:
        # Each user walks the whole image set from its own random offset.
        offset = random.randrange(len(BODIES))
        self._bodies = itertools.islice(itertools.cycle(BODIES), offset, None)

    @task
    def infer(self) -> None:
        body, content_type = next(self._bodies)
        with self.client.post(
            "/infer", data=body, headers={"Content-Type": content_type}, name="/infer", catch_response=True
        ) as response:
            if failed_status(response):
                return
            try:
                answer = json.loads(response.text or "")
            except ValueError:
                response.failure("answer is not JSON")
                return
            if "class" not in answer:
                response.failure(f"no 'class' in {answer!r}")
