"""Where `python -m service.classify` sends each image: the service's own data plane and scheduler in this
process (built as service/app.py's lifespan builds them), or a running service over HTTP (--url)."""

from __future__ import annotations

import asyncio
import http.client
import json
import queue
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from service.classify_output import Row
from service.errors import ServiceError
from service.inference import DataPlane
from service.metrics import Metrics
from service.model import Classifier
from service.scheduler import Scheduler
from service.settings import Settings

CONNECTION_FAILED = "connection_failed"  # --url: the service could not be reached, even after retries
RETRIES = 30  # 503s (with their Retry-After) and dropped connections, per image


class LocalEngine:
    """The data plane over a scheduler with WORKERS workers and DECODE_THREADS decoders, as the service runs."""

    def __init__(self, settings: Settings, model: Classifier, top_k: int | None) -> None:
        self._settings = settings
        self._model = model
        self._top_k = top_k or 1
        self._plane = DataPlane(settings, Metrics())
        self._scheduler: Scheduler | None = None
        self.warning = ""
        # Images in flight: each worker's next batches decoded ahead, and as many more read and queued behind.
        self.window = min(settings.max_queue, 4 * settings.workers * settings.max_batch + settings.decode_threads)

    async def start(self) -> None:
        s = self._settings
        self._scheduler = Scheduler(
            workers=s.workers,
            max_batch=s.max_batch,
            batch_wait_s=s.batch_wait_ms / 1000,
            max_queue=s.max_queue,
            decoders=s.decode_threads,
        )
        self._scheduler.start()
        self._plane.start(self._model, self._scheduler)

    async def classify(self, path: str, data: bytes) -> Row:
        try:
            answer = await self._plane.classify([data], self._plane.deadline(), None)
        except ServiceError as exc:
            return Row(path, code=exc.code, message=exc.message)
        (result,) = answer.results
        if isinstance(result, ServiceError):
            return Row(path, code=result.code, message=result.message)
        return Row(path, [(item.label, item.score) for item in answer.model.top(result, self._top_k)])

    async def close(self) -> None:
        if self._scheduler is not None:
            await self._scheduler.close()


class RemoteEngine:
    """POST /infer of each image's raw bytes over a few keep-alive connections, one thread each."""

    def __init__(self, url: str, connections: int, top_k: int | None, timeout_s: float = 60) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--url {url!r} is not an http:// or https:// URL")
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._connections: queue.SimpleQueue[http.client.HTTPConnection] = queue.SimpleQueue()
        for _ in range(connections):
            self._connections.put(kind(parts.hostname, parts.port, timeout=timeout_s))
        self._url = url
        self._root = parts.path.rstrip("/")
        self._path = self._root + "/infer" + (f"?top_k={top_k}" if top_k else "")
        self._pool = ThreadPoolExecutor(connections, thread_name_prefix="client")
        self.window = 2 * connections
        self.warning = ""

    def check(self) -> None:
        """ConnectionError unless the service answers /ready (with one retry after its Retry-After)."""
        connection = self._connections.get()
        try:
            for attempt in range(2):
                try:
                    connection.request("GET", self._root + "/ready")
                    response = connection.getresponse()
                    response.read()
                except (OSError, http.client.HTTPException) as exc:
                    raise ConnectionError(f"cannot reach the service at {self._url}: {exc}") from None
                if response.status == 200:
                    return
                if attempt == 0:
                    time.sleep(_seconds(response.getheader("Retry-After", "1")))
            raise ConnectionError(f"the service at {self._url} is not ready ({response.status} on /ready)")
        finally:
            self._connections.put(connection)

    async def start(self) -> None:
        pass

    async def classify(self, path: str, data: bytes) -> Row:
        body = await asyncio.get_running_loop().run_in_executor(self._pool, self._post, data)
        if isinstance(body, str):
            return Row(path, code=CONNECTION_FAILED, message=body)
        if "error" in body:
            error = body["error"]
            return Row(path, code=str(error["code"]), message=str(error["message"]))
        self.warning = str(body.get("warning", ""))
        ranked = body.get("top_k") or [body]
        return Row(path, [(str(item["class"]), float(item["score"])) for item in ranked])

    def _post(self, data: bytes) -> dict[str, Any] | str:
        """The answer's JSON body (an error's too), or why there is none: the service stayed unreachable or
        overloaded, or answered something else than JSON."""
        connection = self._connections.get()
        why = ""
        try:
            for _ in range(RETRIES):
                try:
                    connection.request("POST", self._path, data, {"Content-Type": "application/octet-stream"})
                    response = connection.getresponse()
                    body = response.read()
                except (OSError, http.client.HTTPException) as exc:
                    connection.close()  # reconnects on the next request
                    why = f"cannot reach the service: {exc}"
                    time.sleep(0.5)
                    continue
                if response.status == 503 and response.getheader("Retry-After"):
                    why = f"the service answered 503 {RETRIES} times: {body[:200]!r}"
                    time.sleep(_seconds(response.getheader("Retry-After", "1")))
                    continue
                try:
                    answer = json.loads(body)
                except ValueError:
                    answer = None
                if isinstance(answer, dict):
                    return answer
                return f"the service answered {response.status} with no JSON object: {body[:200]!r}"
            return why
        finally:
            self._connections.put(connection)

    async def close(self) -> None:
        self._pool.shutdown(wait=True)
        while not self._connections.empty():
            self._connections.get().close()


def _seconds(retry_after: str) -> float:
    try:
        return min(max(float(retry_after), 0.0), 30.0)
    except ValueError:
        return 1.0
