"""Prometheus metrics, on a registry of the app's own (two apps in one process never share counters)."""

from __future__ import annotations

import re

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

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


_PROBABILITY_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
_MEGAPIXEL_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 12.0, 16.0, 24.0, 40.0)
_BYTE_BUCKETS = (1e3, 1e4, 3e4, 1e5, 3e5, 1e6, 2e6, 5e6, 1e7, 2e7)
# The formats a client may send (service/imaging.py FORMATS); MPO is a JPEG with more pictures after it.
INPUT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_FORMAT_ALIASES = {"MPO": "JPEG"}

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
        self.in_flight = Gauge(
            "inference_in_flight", "Images in the engine, or in the run queued behind one on a thread", registry=r
        )
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
        self.other_cores = Gauge(
            "machine_other_cores",
            "Cores of this process's CPUs that other work used, read before a run alone (over 0.5: it runs narrow)",
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

        self._describe_inputs_and_answers()

    def _describe_inputs_and_answers(self) -> None:
        """What the model sees and says: the first signs that the images or the answers drift."""
        r = self.registry
        self.top1 = Histogram(
            "prediction_top1_probability",
            "The top-1 probability of every answered image",
            buckets=_PROBABILITY_BUCKETS,
            registry=r,
        )
        self.predictions = Counter(
            "predictions", "Answered images by predicted class (its index)", ["class_index"], registry=r
        )
        self.input_megapixels = Histogram(
            "input_megapixels", "Decoded images' size in megapixels", buckets=_MEGAPIXEL_BUCKETS, registry=r
        )
        self.input_bytes = Histogram(
            "input_bytes", "Decoded images' encoded size in bytes", buckets=_BYTE_BUCKETS, registry=r
        )
        self.input_format = Counter("input_format", "Decoded images by format", ["format"], registry=r)
        # Children looked up once, off the request's path (as the runs counter's).
        self._formats = {name: self.input_format.labels(name) for name in (*INPUT_FORMATS, "other")}
        for alias, name in _FORMAT_ALIASES.items():
            self._formats[alias] = self._formats[name]
        self._classes: dict[int, Counter] = {}  # filled as classes are first answered

    def observe_input(self, image_format: str | None, pixels: int, size: int) -> None:
        """One decoded image: its format (Pillow's name), its pixels and its encoded bytes."""
        self._formats.get(image_format or "other", self._formats["other"]).inc()
        self.input_megapixels.observe(pixels / 1e6)
        self.input_bytes.observe(size)

    def observe_probabilities(self, probabilities: np.ndarray) -> None:
        """One engine run's answers, on its inference thread: each image's top-1 probability and class."""
        if probabilities.ndim != 2 or not probabilities.shape[0]:
            return
        classes = self._classes
        for index, top in zip(probabilities.argmax(axis=1).tolist(), probabilities.max(axis=1).tolist(), strict=True):
            if top != top:  # NaN: a broken model's answer says nothing of confidence
                continue
            self.top1.observe(top)
            child = classes.get(index)
            if child is None:
                child = classes[index] = self.predictions.labels(str(index))
            child.inc()

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
            on_batch=on_batch,
            on_queue_depth=self.queue_depth.set,
            on_in_flight=self.in_flight.set,
            on_run=on_run,
            on_probabilities=self.observe_probabilities,
        )

    def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
