"""The application factory: settings in, a Starlette app out; the model is loaded in the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.routing import Route

from service import endpoints
from service.errors import EXCEPTION_HANDLERS
from service.model import Classifier
from service.settings import Settings

log = logging.getLogger("service")


def create_app(settings: Settings | None = None, classifier: Classifier | None = None) -> Starlette:
    """Build the app. `classifier` lets a caller that already loaded and verified the artifact hand it over."""
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loaded = classifier or await run_in_threadpool(Classifier.load, settings.model_dir, settings.threads)
        # The first run allocates and plans; pay for it before the first client does.
        await run_in_threadpool(loaded.warm_up)
        app.state.classifier = loaded
        manifest = loaded.manifest
        log.info(
            "serving %s (%s, sha256 %s..., %s)",
            manifest.name,
            manifest.model.quantization,
            manifest.model.sha256[:12],
            "trained" if manifest.trained else "UNTRAINED reference model",
        )
        yield

    routes = [
        Route("/", endpoints.home, methods=["GET"]),
        Route("/ping", endpoints.ping, methods=["GET"]),
        Route("/infer", endpoints.infer, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)  # type: ignore[arg-type]
    app.state.settings = settings
    return app


def __getattr__(name: str) -> Starlette:
    # `uvicorn service.app:app` works, yet importing this module (tests, `--factory`) reads no settings.
    if name == "app":
        return create_app()
    raise AttributeError(name)
