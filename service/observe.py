"""The outermost middleware: every request gets an ID and every answer names it and the model; every request is
counted and timed, and once answered gets its access line and (with tracing on) its trace.

Pure ASGI and no body buffering. The ID is the client's `X-Request-ID` when it is sane (service/record.py),
otherwise a new one; the error renderers (service/errors.py) put it in every error body.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import logs, record
from service.metrics import Metrics, route_label

if TYPE_CHECKING:
    from service.inference import DataPlane
    from service.tracing import Tracer

log = logging.getLogger("service")
_REQUEST_ID = b"x-request-id"
_TRACEPARENT = b"traceparent"


class Observe:
    def __init__(self, app: ASGIApp, metrics: Metrics, plane: DataPlane, tracer: Tracer | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.plane = plane
        self.tracer = tracer
        # Each (route, status)'s counter and each route's histogram, looked up once.
        self._counters: dict[tuple[str, int], Any] = {}
        self._latencies: dict[str, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = traceparent = None
        for key, value in scope["headers"]:
            if key == _REQUEST_ID:
                given = value.decode("latin-1")
            elif key == _TRACEPARENT:
                traceparent = value.decode("latin-1")
        # Not reset afterwards: each request runs in a task of its own, and the handler of an unexpected error
        # (a 500, answered outside this middleware) still reads it.
        request = record.start(given)
        request.model = self.plane.tag  # the data plane names the model it pins, when it pins one
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", ()), (_REQUEST_ID, request.id.encode())]
                if request.model:
                    headers.append((b"x-model", request.model.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self._answered(scope, request, status, traceparent)

    def _answered(self, scope: Scope, request: record.RequestRecord, status: int, traceparent: str | None) -> None:
        ended = time.perf_counter()
        route = route_label(scope["path"])
        counter = self._counters.get((route, status))
        if counter is None:
            counter = self._counters[route, status] = self.metrics.requests.labels(route, str(status))
        latency = self._latencies.get(route)
        if latency is None:
            latency = self._latencies[route] = self.metrics.latency.labels(route)
        counter.inc()
        latency.observe(ended - request.started)
        if status == 500 and not request.error:
            request.error = "internal_error"  # answered by the last-resort handler, after this line
        trace_id = None
        if self.tracer is not None:
            try:
                trace_id = self.tracer.export(request, scope["method"], route, status, traceparent, ended)
            except Exception:  # a trace is never worth a request: the answer has gone out anyway
                log.exception("could not record the trace of request %s", request.id)
        if logs.ACCESS.isEnabledFor(logging.INFO):
            fields = logs.access_fields(
                request, scope["method"], route, status, logs.client_address(scope.get("client")), ended
            )
            if trace_id is not None:
                fields["trace_id"] = trace_id
            logs.access(fields)
