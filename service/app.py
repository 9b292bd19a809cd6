"""The application factory: settings in, a Starlette app out; the model and scheduler live in the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.routing import Route

from service import endpoints
from service.errors import EXCEPTION_HANDLERS
from service.metrics import Metrics, MetricsMiddleware
from service.model import Classifier
from service.scheduler import Admission, Scheduler
from service.settings import Settings
from service.threads import named_pool

log = logging.getLogger("service")


def create_app(settings: Settings | None = None, classifier: Classifier | None = None) -> Starlette:
    """Build the app. `classifier` lets a caller that already loaded and verified the artifact hand it over."""
    settings = settings or Settings.from_env()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loaded = classifier
        if loaded is None:
            loaded = await run_in_threadpool(Classifier.load, settings.model_dir, settings.intra_op_threads)
        if not loaded.warmed:
            await run_in_threadpool(loaded.warm_up)
        scheduler = Scheduler(
            loaded.predict,
            workers=settings.workers,
            max_batch=settings.max_batch,
            batch_wait_s=settings.batch_wait_ms / 1000,
            max_queue=settings.max_queue,
            hooks=metrics.scheduler_hooks(),
        )
        scheduler.start()
        decode_pool = named_pool(settings.decode_threads, "decode")
        metrics.describe_model(loaded.manifest)
        app.state.classifier = loaded
        app.state.scheduler = scheduler
        app.state.decode_pool = decode_pool
        app.state.ready = True
        manifest = loaded.manifest
        log.info(
            "serving %s (%s, sha256 %s..., %s): %d workers x %d threads, max batch %d, queue %d",
            manifest.name,
            manifest.model.quantization,
            manifest.model.sha256[:12],
            "trained" if manifest.trained else "UNTRAINED reference model",
            settings.workers,
            settings.intra_op_threads,
            settings.max_batch,
            settings.max_queue,
        )
        try:
            yield
        finally:
            app.state.ready = False
            await scheduler.close()
            decode_pool.shutdown(wait=True)

    routes = [
        Route("/", endpoints.home, methods=["GET"]),
        Route("/ping", endpoints.ping, methods=["GET"]),
        Route("/ready", endpoints.ready, methods=["GET"]),
        Route("/infer", endpoints.infer, methods=["POST"]),
        Route("/metrics", metrics.endpoint, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[Middleware(MetricsMiddleware, metrics=metrics)],
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.ready = False
    # Room for everything the engine holds plus the queue: past that a request is refused before its body.
    app.state.admission = Admission(settings.max_queue + settings.workers * settings.max_batch)
    return app


def __getattr__(name: str) -> Starlette:
    # `uvicorn service.app:app` works, yet importing this module (tests, `--factory`) reads no settings.
    if name == "app":
        return create_app()
    raise AttributeError(name)
