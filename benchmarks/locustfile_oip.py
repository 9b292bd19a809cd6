"""Locust load test for an Open Inference Protocol server (Triton, benchmarks/baselines/triton_server.py): the
same JPEGs as benchmarks/locustfile.py, each sent as a BYTES input with the binary tensor data extension.

    locust -f benchmarks/locustfile_oip.py --host http://127.0.0.1:4002 --headless -u 8 -r 8 -t 60s --csv out/run

A separate file, not a second class in locustfile.py: Locust runs every User class of the file it is given, so
the multipart runs would start sending OIP requests too. Success, failure messages ("status NNN: ..."),
BENCH_IMAGE_SET and PREFIX_failures.json are as in locustfile.py, whose listeners this file reuses. The request
is named "/infer" in Locust's statistics, the row benchmarks.harness.locust reads, whatever the path.
"""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

from locust import FastHttpUser, task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Imported for its event listeners too: they write PREFIX_failures.json when Locust quits. Its InferUser stays in
# that module's namespace, so Locust does not run it from here.
from benchmarks import locustfile  # noqa: E402
from benchmarks.baselines.triton_server import INFER_PATH, oip_answer_error, oip_request  # noqa: E402

# Encoded once, so the load generator spends its CPU on sending, not on building bodies.
REQUESTS = [oip_request(data) for data in locustfile.IMAGES]


class OipInferUser(FastHttpUser):  # type: ignore[misc]
    # Closed loop, no think time: each user sends its next request as soon as the last one is answered.

    def on_start(self) -> None:
        offset = random.randrange(len(REQUESTS))
        self._requests = itertools.islice(itertools.cycle(REQUESTS), offset, None)

    @task
    def infer(self) -> None:
        body, headers = next(self._requests)
        with self.client.post(INFER_PATH, data=body, headers=headers, name="/infer", catch_response=True) as response:
            if locustfile.failed_status(response):
                return
            length = response.headers.get("Inference-Header-Content-Length") if response.headers else None
            problem = oip_answer_error(response.content or b"", length)
            if problem is not None:
                response.failure(problem)
