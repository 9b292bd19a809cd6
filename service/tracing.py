"""OpenTelemetry traces, optional: imported only when OTEL_EXPORTER_OTLP_ENDPOINT is set (requirements-tracing.txt).

One span per request (the caller's W3C `traceparent` its parent), with child spans for the body read, the
queue wait, the decoding and the engine run. They are made from the request's record once it is answered, with
the times the record holds, and exported over OTLP/HTTP in the SDK's background thread: the request's own path
does no tracing work. The SDK reads its other OTEL_* variables (headers, timeouts, batch delay) itself.
"""

from __future__ import annotations

import time
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from service.record import RequestRecord

SERVICE_NAME = "car-classifier"


def traces_url(endpoint: str) -> str:
    """OTEL_EXPORTER_OTLP_ENDPOINT is the collector's base URL; traces go to its /v1/traces (the OTLP spec)."""
    return endpoint.rstrip("/") + "/v1/traces"


class Tracer:
    def __init__(self, endpoint: str) -> None:
        self._provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(endpoint))))
        self._tracer = self._provider.get_tracer("service")
        self._propagator = TraceContextTextMapPropagator()

    def export(
        self, request: RequestRecord, method: str, route: str, status: int, traceparent: str | None, ended: float
    ) -> str:
        """Record `request`'s spans (times from time.perf_counter()); its trace ID in hex."""
        offset = time.time_ns() - int(time.perf_counter() * 1e9)

        def ns(moment: float) -> int:
            return offset + int(moment * 1e9)

        parent = self._propagator.extract({"traceparent": traceparent}) if traceparent else None
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "http.route": route,
            "http.response.status_code": status,
            "request.id": request.id,
        }
        if request.model:
            attributes["model"] = request.model
        span = self._tracer.start_span(
            f"{method} {route}", parent, SpanKind.SERVER, attributes, start_time=ns(request.started)
        )
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR, request.error or None))
        inside = trace.set_span_in_context(span)
        for name, start, end in _stages(request):
            self._tracer.start_span(name, inside, start_time=ns(start)).end(end_time=ns(end))
        span.end(end_time=ns(ended))
        return f"{span.get_span_context().trace_id:032x}"

    def close(self) -> None:
        """Export what is still buffered, then stop the exporter's thread (blocking)."""
        self._provider.shutdown()


def _stages(request: RequestRecord) -> list[tuple[str, float, float]]:
    """The request's stages that happened, as (name, start, end). The queue wait runs from its images' queueing
    to the engine, and holds their decoding (just ahead of the engine, or in the engine's thread)."""
    stages = []
    if request.read_end:
        stages.append(("body read", request.read_start, request.read_end))
    if request.queued:
        stages.append(("queue wait", request.queued, request.engine_start or request.answered or request.queued))
    if request.decode_end:
        stages.append(("decode", request.decode_start, request.decode_end))
    if request.engine_end:
        stages.append(("engine run", request.engine_start, request.engine_end))
    return stages
