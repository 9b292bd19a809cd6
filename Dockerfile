# The service: onnxruntime + Starlette on uvicorn, no TensorFlow. Build: docker build -t car-classifier .
# Run: docker run -p 4000:4000 car-classifier

FROM python:3.11-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY requirements-serve.txt /tmp/requirements-serve.txt
# Requirements before source: the dependency layer is rebuilt only when the pins change.
RUN /opt/venv/bin/pip install --no-compile -r /tmp/requirements-serve.txt \
    && /opt/venv/bin/pip uninstall -y pip setuptools

FROM python:3.11-slim-bookworm
ENV PATH="/opt/venv/bin:$PATH" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MODEL_DIR=/app/artifacts \
    PORT=4000
RUN useradd --create-home --uid 1000 --user-group app
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY service/ /app/service/
COPY artifacts/ /app/artifacts/
USER 1000
EXPOSE 4000
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\", \"4000\")}/ping', timeout=2)"]
CMD ["python", "-m", "service"]
