# The service: onnxruntime + Starlette on uvicorn, no TensorFlow. Build: docker build -t car-classifier .
# Run: docker run -p 4000:4000 car-classifier
# A folder of photos: docker run --rm -v "$PWD/photos:/photos:ro" car-classifier classify /photos > rows.csv

FROM python:3.11-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY requirements-serve.txt /tmp/requirements-serve.txt
# Requirements before source: the dependency layer is rebuilt only when the pins change. Bytecode is
# compiled here, validated by source hash rather than mtime, so it stays valid whatever the copy does to mtimes.
# Removed first, as the service never loads them (site-packages 207 -> 140 MB, benchmarks/results/container.md):
# onnxruntime's C-API library (the Python binding carries its own copy of the runtime) and its tools/,
# transformers/, quantization/ (the export image keeps them), numpy's f2py and distutils, test suites, stubs.
RUN /opt/venv/bin/pip install --no-compile -r /tmp/requirements-serve.txt \
    && /opt/venv/bin/pip uninstall -y pip setuptools \
    && site=/opt/venv/lib/python3.11/site-packages \
    && rm -r "$site"/onnxruntime/capi/libonnxruntime.so.* "$site"/onnxruntime/tools \
        "$site"/onnxruntime/transformers "$site"/onnxruntime/quantization "$site"/numpy/f2py "$site"/numpy/distutils \
    && find "$site" -type d -name tests -prune -exec rm -r {} + \
    && find "$site" -name '*.pyi' -delete \
    && /opt/venv/bin/python -m compileall -q -j 0 --invalidation-mode checked-hash /opt/venv

FROM python:3.11-slim-bookworm
# onnxruntime 1.32's telemetry otherwise writes a device id and an SQLite event store under ~/.cache and a file
# in /tmp on the first session, for a client that sends to mobile.events.data.microsoft.com; the service sends
# nothing anywhere and writes nothing (tests/test_container.py checks `podman diff` after serving under load).
ENV PATH="/opt/venv/bin:$PATH" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ORT_DISABLE_TELEMETRY=1 \
    MODEL_DIR=/app/artifacts \
    PORT=4000
# The slim base ships the standard library without bytecode, and the service may not write any (user 1000,
# PYTHONDONTWRITEBYTECODE): without .pyc files every start compiles everything it imports again, 1.25 s
# to the first answer instead of 0.52 s.
# `classify` on PATH runs `python -m service.classify` (docs/api.md): `docker run ... car-classifier classify /photos`.
RUN useradd --no-create-home --home-dir /nonexistent --uid 1000 --user-group app \
    && printf '#!/bin/sh\nexport PYTHONPATH=/app\nexec python -m service.classify "$@"\n' > /usr/local/bin/classify \
    && chmod 755 /usr/local/bin/classify \
    && python -m compileall -q -j 0 --invalidation-mode checked-hash \
        -x '/(idlelib|lib2to3|ensurepip|tkinter|turtledemo|site-packages)/' /usr/local/lib/python3.11
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY service/ /app/service/
RUN python -m compileall -q --invalidation-mode checked-hash /app/service
COPY artifacts/ /app/artifacts/
USER 1000
EXPOSE 4000
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\", \"4000\")}/ping', timeout=2)"]
CMD ["python", "-m", "service"]
