"""A TensorFlow-free Starlette + onnxruntime service for the car-model classifier."""

import os

# onnxruntime 1.32 otherwise writes a device id and an event store under ~/.cache and /tmp: a service on a
# read-only filesystem must write nothing (tests/test_container.py saw it in `podman diff`). Every entry
# point (python -m service, uvicorn service.app:app, the export) imports this package before onnxruntime.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
