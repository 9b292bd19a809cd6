"""Prometheus metrics, on a registry of the app's own (two apps in one process never share counters)."""

from __future__ import annotations

import re
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.manifest import Manifest
from service.scheduler import SchedulerHooks

# Routes are reported by name; anything else is "other", so random paths cannot blow up cardinality.
KNOWN_ROUTES = frozenset(
    {
        "/",
        "/ping",
        "/ready",
        "/infer",
        "/metrics",
        "/docs",
        "/openapi.json",
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
    }
)
# Open Inference Protocol routes with a model name in the path are reported by their template.
_TEMPLATES = (
    (re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?$"), "/v2/models/{name}"),
    (re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/ready$"), "/v2/models/{name}/ready"),
    (re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$"), "/v2/models/{name}/infer"),
    (re.compile(r"^/v2/repository/models/[^/]+/load$"), "/v2/repository/models/{name}/load"),
)


def route_label(path: str) -> str:
    if path in KNOWN_ROUTES:
        return path
    for pattern, template in _TEMPLATES:
        if pattern.match(path):
            return template
    return "other"


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("http_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram(
            "http_request_duration_seconds", "Request latency", ["route"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("inference_queue_depth", "Images waiting for an inference worker", registry=r)
        self.in_flight = Gauge("inference_in_flight", "Images inside the engine right now", registry=r)
        self.batch_size = Histogram(
            "inference_batch_size", "Images per engine run", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r
        )
        self.decode = Histogram(
            "image_decode_seconds", "Decode + resize time per image", buckets=_STAGE_BUCKETS, registry=r
        )
        self.inference = Histogram("inference_seconds", "Engine time per batch", buckets=_STAGE_BUCKETS, registry=r)
        self.runs = Counter(
            "inference_runs",
            "Engine runs by session: wide (every core, a run alone) or narrow",
            ["session"],
            registry=r,
        )
        self.session_threads = Gauge(
            "inference_session_threads",
            "Intra-op threads of each engine session (0: not built)",
            ["session"],
            registry=r,
        )
        self.model = Gauge(
            "model_info", "The served model (value is 1)", ["name", "sha256", "quantization", "trained"], registry=r
        )
        self.connections_open = Gauge("http_connections_open", "Open client connections", registry=r)
        self.connections_closed = Counter(
            "http_connections_closed",
            "Connections the service closed before a request or between two, by reason: header_deadline (the "
            "request line and headers too slow), idle (keep-alive timeout), budget (displaced: the descriptor "
            "budget was full), refused (503: the budget was full of requests in progress)",
            ["reason"],
            registry=r,
        )
        self.model_loads = Counter(
            "model_loads",
            "Models loaded without a restart (POST /v2/repository/models/{name}/load, SIGHUP), by outcome",
            ["outcome"],
            registry=r,
        )

    def describe_model(self, manifest: Manifest) -> None:
        self.model.clear()  # one series: the model serving now
        self.model.labels(
            manifest.name, manifest.model.sha256, manifest.model.quantization, str(manifest.trained).lower()
        ).set(1)

    def scheduler_hooks(self) -> SchedulerHooks:
        def on_batch(size: int, seconds: float) -> None:
            self.batch_size.observe(size)
            self.inference.observe(seconds)

        # Looked up once: each run counts itself between its decoding and the engine, on the request's path.
        wide_runs, narrow_runs = self.runs.labels("wide"), self.runs.labels("narrow")

        def on_run(wide: bool) -> None:
            (wide_runs if wide else narrow_runs).inc()

        return SchedulerHooks(
            on_batch=on_batch, on_queue_depth=self.queue_depth.set, on_in_flight=self.in_flight.set, on_run=on_run
        )

    def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class MetricsMiddleware:
    """Counts every response by route and status, and times it (pure ASGI: no body buffering)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_label(scope["path"])
        status = 500
        started = time.perf_counter()

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
