"""HTTP endpoints: they take care of the HTTP-specific things and delegate the work to the classifier."""

from __future__ import annotations

import asyncio
import time

from starlette.requests import Request
from starlette.responses import JSONResponse

from service.errors import DeadlineExceeded, InvalidParameter, error_response
from service.imaging import preprocess
from service.metrics import Metrics
from service.model import Classifier, Scored
from service.payload import read_image_bytes
from service.scheduler import Admission, Scheduler
from service.settings import Settings

STATUS = "The car classification service is running!"
MAX_TOP_K = 20
UNTRAINED_SHORT = "untrained reference model: this class is not a real prediction"
UNTRAINED_WARNING = (
    "This artifact is an untrained reference model (the real EfficientNetV2-B3 architecture with seeded random "
    "weights). Its predictions are meaningless; export your trained model with `python -m export`."
)


def _top_k(request: Request) -> int | None:
    raw = request.query_params.get("top_k")
    if raw is None:
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_TOP_K:
        raise InvalidParameter(f"top_k must be an integer from 1 to {MAX_TOP_K}, got {raw!r}")
    return int(raw)


def _scored(item: Scored) -> dict[str, object]:
    return {"class": item.label, "score": item.score}


async def home(request: Request) -> JSONResponse:
    classifier: Classifier = request.app.state.classifier
    manifest = classifier.manifest
    body: dict[str, object] = {
        "status": STATUS,
        "model": {
            "name": manifest.name,
            "description": manifest.description,
            "trained": manifest.trained,
            "sha256": manifest.model.sha256,
            "quantization": manifest.model.quantization,
            "classes": len(classifier.labels),
            "input": {"height": manifest.preprocessing.height, "width": manifest.preprocessing.width},
            "created_at": manifest.created_at,
        },
    }
    if not manifest.trained:
        body["warning"] = UNTRAINED_WARNING
    return JSONResponse(body)


async def ping(request: Request) -> JSONResponse:
    return JSONResponse({"message": "pong"})


async def ready(request: Request) -> JSONResponse:
    """Ready: the model is loaded and warmed, and the server is not shutting down (`/ping` only says alive)."""
    if not request.app.state.ready:
        return error_response(503, "not_ready", "the model is not loaded yet, or the server is shutting down")
    return JSONResponse({"ready": True})


async def _disconnected(request: Request) -> None:
    # The body has been read: the next ASGI message can only be the client going away.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def infer(request: Request) -> JSONResponse:
    state = request.app.state
    settings: Settings = state.settings
    classifier: Classifier = state.classifier
    scheduler: Scheduler = state.scheduler
    metrics: Metrics = state.metrics
    admission: Admission = state.admission
    k = _top_k(request)
    deadline = time.monotonic() + settings.request_timeout_s
    # Admission counts only requests whose body is here: one still arriving (however slowly) holds no slot;
    # the client guard bounds and times those (service/middleware.py).
    data = await read_image_bytes(request, settings.max_upload_bytes)
    with admission.admit():
        # Decoding runs in its own bounded pool, overlapping the engine's work, never on the event loop.
        started = time.perf_counter()
        pixels = await asyncio.get_running_loop().run_in_executor(
            state.decode_pool, preprocess, data, classifier.manifest.preprocessing, settings.max_image_pixels
        )
        metrics.decode.observe(time.perf_counter() - started)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(f"no answer within {settings.request_timeout_s:g} s (REQUEST_TIMEOUT_S)")
        probabilities = await scheduler.infer(pixels, remaining, gone=lambda: _disconnected(request))
    ranked = classifier.top(probabilities, k or 1)
    body: dict[str, object] = _scored(ranked[0])
    if k is not None:
        body["top_k"] = [_scored(item) for item in ranked]
    if not classifier.manifest.trained:
        body["warning"] = UNTRAINED_SHORT
    return JSONResponse(body)
