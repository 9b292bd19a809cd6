"""GET /openapi.json: the OpenAPI 3.1 contract, a reviewed static document (service/openapi.json) read once.

Filled in per server: limits from its settings (`${MAX_UPLOAD_BYTES}` and the like), the model served as the
`{name}` example, and with API keys the `bearer` scheme and 401 on each route the ApiKey middleware protects.
tests/test_openapi.py keeps the file equal to the app's routes, the ServiceError classes and real answers.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from string import Template
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Mount, Route

from service.errors import ServiceError
from service.middleware import ApiKey
from service.settings import Settings

log = logging.getLogger("service")
JSON = dict[str, Any]
DOCUMENT = Path(__file__).resolve().parent / "openapi.json"
# Starlette's `{name:converter}` path parameters are OpenAPI's `{name}`.
_CONVERTER = re.compile(r"{(\w+)(?::\w+)?}")


@functools.cache
def template() -> JSON:
    """The document as committed, placeholders unfilled."""
    return dict(json.loads(DOCUMENT.read_text(encoding="utf-8")))


def documented_operations() -> set[tuple[str, str]]:
    """Every (path, method) the document describes: the drift test compares it with the app's routes."""
    return {(path, method) for path, item in template()["paths"].items() for method in item}


def app_operations(app: Starlette) -> list[tuple[str, str]]:
    """The app's own (path, method) pairs, mounts followed, HEAD left out (Starlette adds it to every GET)."""

    def walk(routes: list[BaseRoute], prefix: str) -> Iterator[tuple[str, str]]:
        for route in routes:
            if isinstance(route, Route):
                path = _CONVERTER.sub(r"{\1}", prefix + route.path)
                yield from ((path, method.lower()) for method in sorted(route.methods or ()) if method != "HEAD")
            elif isinstance(route, Mount):
                yield from walk(list(route.routes), prefix + route.path)

    return list(walk(list(app.routes), ""))


def public_paths(app: Starlette) -> frozenset[str] | None:
    """The paths open without a key, as the app's ApiKey middleware has them; None when no key is configured."""
    for middleware in app.user_middleware:
        factory: object = middleware.cls
        if factory is ApiKey and middleware.kwargs.get("keys"):
            return frozenset(str(path) for path in middleware.kwargs["public"])  # type: ignore[attr-defined]
    return None


def _fill(node: Any, values: dict[str, int]) -> Any:
    """`${NAME}` placeholders: a string that is one placeholder becomes the number, others the number in prose."""
    if isinstance(node, dict):
        return {key: _fill(value, values) for key, value in node.items()}
    if isinstance(node, list):
        return [_fill(value, values) for value in node]
    if isinstance(node, str) and "${" in node:
        whole = re.fullmatch(r"\$\{(\w+)\}", node)
        return values[whole[1]] if whole else Template(node).substitute({k: f"{v:,}" for k, v in values.items()})
    return node


def _undescribed(path: str, method: str) -> JSON:
    log.warning("%s %s has no description in service/openapi.json", method.upper(), path)
    parameters = [{"name": n, "in": "path", "required": True, "schema": {}} for n in re.findall(r"{(\w+)}", path)]
    return {"summary": "not described yet", "parameters": parameters, "responses": {"default": {"description": "?"}}}


def build_document(app: Starlette, settings: Settings, model_name: str | None = None) -> JSON:
    """The document of `app` as configured by `settings`, `model_name` the model it serves (if known)."""
    # MAX_IMAGES: the queue is the smaller bound when it is (DataPlane.max_images).
    images = min(settings.max_images_per_request, settings.max_queue)
    limits = {"MAX_UPLOAD_BYTES": settings.max_upload_bytes, "MAX_IMAGE_PIXELS": settings.max_image_pixels}
    document: JSON = _fill(template(), {**limits, "MAX_DECODE_BYTES": settings.max_decode_bytes, "MAX_IMAGES": images})
    if model_name is not None:
        document["components"]["parameters"]["ModelName"]["example"] = model_name
    described, public = document["paths"], public_paths(app)
    paths: dict[str, JSON] = {}
    for path, method in app_operations(app):
        operation = described[path][method] if method in described.get(path, {}) else _undescribed(path, method)
        if public is not None and path not in public:
            operation["security"] = [{"bearer": []}]
            operation["responses"]["401"] = {"$ref": "#/components/responses/Unauthorized"}
        paths.setdefault(path, {})[method] = operation
    document["paths"] = paths
    return document


def _served_name(app: Starlette) -> str | None:
    try:
        return str(app.state.data_plane.model.manifest.name)
    except (AttributeError, ServiceError):  # no model served yet
        return None


async def openapi_json(request: Request) -> JSONResponse:
    # Built once per model served (a build takes a millisecond): a model load changes the name given as example.
    state, name = request.app.state, _served_name(request.app)
    cached: tuple[str | None, JSON] | None = getattr(state, "openapi_document", None)
    if cached is None or cached[0] != name:
        cached = state.openapi_document = (name, build_document(request.app, state.settings, name))
    return JSONResponse(cached[1])
