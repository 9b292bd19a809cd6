"""The service's own HTTP endpoints: they take care of the HTTP-specific things and delegate the work to the
data plane (service/inference.py)."""

from __future__ import annotations

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse

from service.errors import InvalidParameter, ServiceError
from service.inference import UNTRAINED_SHORT, DataPlane
from service.model import Classifier, Scored
from service.payload import decimal, read_upload

STATUS = "The car classification service is running!"
MAX_TOP_K = 20
UNTRAINED_WARNING = (
    "This artifact is an untrained reference model (the real EfficientNetV2-B3 architecture with seeded random "
    "weights). Its predictions are meaningless; export your trained model with `python -m export`."
)


def _top_k(request: Request) -> int | None:
    if not request.scope["query_string"]:  # most requests: no need to parse one
        return None
    raw = request.query_params.get("top_k")
    if raw is None:
        return None
    k = decimal(raw)
    if k is None or not 1 <= k <= MAX_TOP_K:
        raise InvalidParameter(f"top_k must be an integer from 1 to {MAX_TOP_K}, got {raw!r}")
    return k


def _scored(item: Scored) -> dict[str, object]:
    return {"class": item.label, "score": item.score}


async def home(request: Request) -> JSONResponse:
    classifier = request.app.state.data_plane.model
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
    request.app.state.data_plane.check_ready()
    return JSONResponse({"ready": True})


async def disconnected(request: Request) -> None:
    """Returns when the client has gone. The body has been read: the next ASGI message can only be that."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _prediction(classifier: Classifier, probabilities: np.ndarray, k: int | None) -> dict[str, object]:
    ranked = classifier.top(probabilities, k or 1)
    body: dict[str, object] = _scored(ranked[0])
    if k is not None:
        body["top_k"] = [_scored(item) for item in ranked]
    return body


async def infer(request: Request) -> JSONResponse:
    plane: DataPlane = request.app.state.data_plane
    k = _top_k(request)
    deadline = plane.deadline()
    # Admission counts only requests whose body is here: one still arriving (however slowly) holds no slot;
    # the client guard bounds and times those (service/middleware.py).
    upload = await read_upload(request, plane.settings.max_upload_bytes, plane)
    answer = await plane.classify(upload.images, deadline, lambda: disconnected(request))
    results: list[dict[str, object]] = []
    for result in answer.results:
        if isinstance(result, ServiceError):
            if not upload.several:
                raise result
            results.append({"error": {"code": result.code, "message": result.message}})
        else:
            results.append(_prediction(answer.model, result, k))
    body: dict[str, object] = {"results": results} if upload.several else results[0]
    if not answer.model.manifest.trained:
        body["warning"] = UNTRAINED_SHORT
    return JSONResponse(body)
