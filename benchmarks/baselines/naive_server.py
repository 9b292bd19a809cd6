"""The server a user would write in an afternoon instead of ours, kept as a yardstick (not part of the product).

Starlette + onnxruntime with default session options, on the same artifact and with the same preprocessing
code as the service (service.imaging.preprocess with the manifest's preprocessing). The handler reads the
multipart upload, then decodes, resizes and runs the session in Starlette's thread pool, one request per
thread, unbatched; it answers the top-1 class as JSON like the service does. No admission control, no queue
bound, no deadline: what a first version has.

    python -m uvicorn benchmarks.baselines.naive_server:app --host 127.0.0.1 --port 4001
    MODEL_DIR=artifacts python -m uvicorn benchmarks.baselines.naive_server:app --port 4001
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.imaging import preprocess
from service.manifest import Manifest

MODEL_DIR = Path(os.environ.get("MODEL_DIR", Path(__file__).resolve().parents[2] / "artifacts"))
MAX_PIXELS = 40_000_000  # the service's default MAX_IMAGE_PIXELS: the same images pass

# Loaded at import, as a first version does: uvicorn imports the module before it binds the port.
manifest = Manifest.read(MODEL_DIR)
labels = (MODEL_DIR / manifest.labels.file).read_text().splitlines()
session = ort.InferenceSession(str(MODEL_DIR / manifest.model.file), providers=["CPUExecutionProvider"])


def classify(data: bytes) -> dict[str, Any]:
    pixels = preprocess(data, manifest.preprocessing, MAX_PIXELS)
    batch = pixels[None]
    if manifest.input.layout == "NCHW":
        batch = np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
    (out,) = session.run([manifest.output.name], {manifest.input.name: batch})
    scores = np.asarray(out, dtype=np.float32)[0]
    if manifest.output.kind == "logits":
        scores = np.exp(scores - scores.max())
        scores /= scores.sum()
    best = int(np.argmax(scores))
    return {"class": labels[best], "score": float(scores[best])}


async def infer(request: Request) -> JSONResponse:
    # Starlette's multipart parser is async-only, so the form is read here; the blocking work goes to the
    # thread pool, exactly what FastAPI does for a `def infer(image: UploadFile)` endpoint.
    form = await request.form()
    upload = form["image"]
    if not isinstance(upload, UploadFile):
        return JSONResponse({"error": "send the image as a file field named 'image'"}, status_code=422)
    data = await upload.read()
    return JSONResponse(await run_in_threadpool(classify, data))


async def ping(request: Request) -> JSONResponse:
    return JSONResponse({"message": "pong"})


app = Starlette(routes=[Route("/infer", infer, methods=["POST"]), Route("/ping", ping)])
