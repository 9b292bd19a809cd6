"""HTTP endpoints: they take care of the HTTP-specific things and delegate the work to the classifier."""

from __future__ import annotations

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from service.errors import InvalidParameter
from service.imaging import preprocess
from service.model import Classifier, Scored
from service.payload import read_image_bytes
from service.settings import Settings

STATUS = "The car classification service is running!"
MAX_TOP_K = 20
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


def _classify(classifier: Classifier, data: bytes, max_pixels: int) -> np.ndarray:
    pixels = preprocess(data, classifier.manifest.preprocessing, max_pixels)
    return classifier.predict(pixels[None])[0]


async def infer(request: Request) -> JSONResponse:
    settings: Settings = request.app.state.settings
    classifier: Classifier = request.app.state.classifier
    k = _top_k(request)
    data = await read_image_bytes(request, settings.max_upload_bytes)
    # Decoding and inference release the GIL in Pillow and onnxruntime; keep both off the event loop.
    probabilities = await run_in_threadpool(_classify, classifier, data, settings.max_image_pixels)
    ranked = classifier.top(probabilities, k or 1)
    body: dict[str, object] = _scored(ranked[0])
    if k is not None:
        body["top_k"] = [_scored(item) for item in ranked]
    return JSONResponse(body)
