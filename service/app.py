"""The application factory: settings in, a Starlette app out; the model and scheduler live in the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.routing import Route

from service import docs_page, endpoints, oip, openapi
from service.errors import exception_handlers
from service.inference import DataPlane
from service.metrics import Metrics
from service.middleware import ApiKey, ClientGuard, Cors
from service.model import Classifier
from service.neighbours import Neighbours
from service.observe import Observe
from service.repository import Repository
from service.scheduler import Scheduler
from service.settings import Settings

if TYPE_CHECKING:
    from service.tracing import Tracer

log = logging.getLogger("service")

# Open without an API key: probes, and what a person or a client needs to find out how to call the service.
# The OIP server metadata (/v2) says no more than GET / does; its model routes and the repository need the key.
PUBLIC_PATHS = frozenset(
    {"/", "/ping", "/ready", "/docs", "/openapi.json", "/v2", "/v2/health/live", "/v2/health/ready"}
)


def create_app(settings: Settings | None = None, classifier: Classifier | None = None) -> Starlette:
    """Build the app. `classifier` lets a caller that already loaded and verified the artifact hand it over."""
    settings = settings or Settings.from_env()
    metrics = Metrics()
    plane = DataPlane(settings, metrics)
    tracer = _tracer(settings)
    app = Starlette(
        routes=_routes(metrics),
        exception_handlers=exception_handlers({oip.PREFIX: oip.error_response}),
        middleware=_middleware(settings, metrics, plane, tracer),
        lifespan=_lifespan(settings, metrics, plane, classifier, tracer),
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.data_plane = plane
    return app


def _tracer(settings: Settings) -> Tracer | None:
    """Traces when OTEL_EXPORTER_OTLP_ENDPOINT is set; only then is OpenTelemetry imported."""
    if not settings.otlp_endpoint:
        return None
    try:
        from service.tracing import Tracer
    except ImportError as exc:
        log.error(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set, but OpenTelemetry is not installed (%s): serving without traces; "
            "`pip install -r requirements-tracing.txt` adds them",
            exc,
        )
        return None
    return Tracer(settings.otlp_endpoint)


def _lifespan(
    settings: Settings, metrics: Metrics, plane: DataPlane, classifier: Classifier | None, tracer: Tracer | None
) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loaded = classifier
        if loaded is None:
            loaded = await run_in_threadpool(Classifier.load, settings.model_dir, settings.intra_op_threads)
        if not loaded.warmed:
            await run_in_threadpool(loaded.warm_up)
        scheduler = Scheduler(
            workers=settings.workers,
            max_batch=settings.max_batch,
            batch_wait_s=settings.batch_wait_ms / 1000,
            max_queue=settings.max_queue,
            decoders=settings.decode_threads,
            hooks=metrics.scheduler_hooks(),
            neighbours=Neighbours(on_sample=metrics.other_cores.set) if settings.wide_runs == "auto" else None,
        )
        scheduler.start()
        metrics.describe_model(loaded.manifest)
        repository = Repository(settings, plane, metrics)
        app.state.repository = repository
        plane.start(loaded, scheduler)
        # The wide session is built after the service is ready, off the path to the first answer; until it
        # is there, every run is narrow.
        metrics.session_threads.labels("narrow").set(settings.intra_op_threads)
        repository.widen(loaded)
        repository.listen_for_sighup()
        _log_serving(settings, loaded)
        try:
            yield
        finally:
            plane.ready = False
            await scheduler.close()
            await repository.close()
            if tracer is not None:
                await run_in_threadpool(tracer.close)

    return lifespan


def _log_serving(settings: Settings, model: Classifier) -> None:
    manifest = model.manifest
    log.info(
        "serving %s (%s, sha256 %s..., %s): %d workers x %d threads, a run alone on %d, max batch %d, queue %d",
        manifest.name,
        manifest.model.quantization,
        manifest.model.sha256[:12],
        "trained" if manifest.trained else "UNTRAINED reference model",
        settings.workers,
        settings.intra_op_threads,
        settings.wide_threads or settings.intra_op_threads,
        settings.max_batch,
        settings.max_queue,
    )


def _routes(metrics: Metrics) -> list[Route]:
    return [
        Route("/", endpoints.home, methods=["GET"]),
        Route("/ping", endpoints.ping, methods=["GET"]),
        Route("/ready", endpoints.ready, methods=["GET"]),
        Route("/infer", endpoints.infer, methods=["POST"]),
        Route("/metrics", metrics.endpoint, methods=["GET"]),
        Route("/openapi.json", openapi.openapi_json, methods=["GET"]),
        Route("/docs", docs_page.docs, methods=["GET"]),
        # The Open Inference Protocol (service/oip.py) over the same data plane.
        Route("/v2", oip.server_metadata, methods=["GET"]),
        Route("/v2/health/live", oip.live, methods=["GET"]),
        Route("/v2/health/ready", oip.server_ready, methods=["GET"]),
        Route("/v2/models/{name}", oip.model_metadata, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}", oip.model_metadata, methods=["GET"]),
        Route("/v2/models/{name}/ready", oip.model_ready, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}/ready", oip.model_ready, methods=["GET"]),
        Route("/v2/models/{name}/infer", oip.infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", oip.infer, methods=["POST"]),
        Route("/v2/repository/models/{name}/load", oip.load, methods=["POST"]),
    ]


def _middleware(settings: Settings, metrics: Metrics, plane: DataPlane, tracer: Tracer | None) -> list[Middleware]:
    """Outermost first: every answer has its request ID and is counted and logged, the client guard sees every
    request, CORS answers preflights before the key is asked for."""
    stack = [
        Middleware(Observe, metrics=metrics, plane=plane, tracer=tracer),
        Middleware(
            ClientGuard,
            read_timeout_s=settings.request_read_timeout_s,
            min_upload_bytes_per_s=settings.min_upload_bytes_per_s,
            max_requests=settings.max_connections,
            max_discard_bytes=settings.max_discard_bytes,
        ),
    ]
    if settings.cors_origins:
        stack.append(
            Middleware(
                Cors,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
                max_age=600,
            )
        )
    if settings.api_keys:
        stack.append(Middleware(ApiKey, keys=settings.api_keys, public=PUBLIC_PATHS))
    return stack


def __getattr__(name: str) -> Starlette:
    # `uvicorn service.app:app` works, yet importing this module (tests, `--factory`) reads no settings.
    if name == "app":
        return create_app()
    raise AttributeError(name)
