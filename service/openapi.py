"""The OpenAPI 3.1 document, built from the running app so it cannot drift from the code.

The paths and methods come from the app's route table (a route without a description here fails the build
of the document, and the drift test); the error codes come from the `ServiceError` subclasses in
service/errors.py; limits and the API key from the settings.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Mount, Route

from service import endpoints
from service.errors import ServiceError
from service.middleware import ApiKey
from service.settings import Settings

log = logging.getLogger("service")
JSON = dict[str, Any]
# Starlette's `{name:converter}` path parameters are OpenAPI's `{name}`.
_CONVERTER = re.compile(r"{(\w+)(?::\w+)?}")
OPENAPI_VERSION = "3.1.0"
API_VERSION = "1.0.0"
# Answered by endpoints.ready directly, not by a ServiceError subclass.
NOT_READY = "not_ready"
_ERROR_HEADERS: dict[int, JSON] = {
    401: {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    503: {"Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "string"}}},
}


def error_classes() -> list[type[ServiceError]]:
    """Every concrete error a client can receive, by status then code."""

    def walk(cls: type[ServiceError]) -> Iterator[type[ServiceError]]:
        for sub in cls.__subclasses__():
            yield sub
            yield from walk(sub)

    unique = {(cls.status_code, cls.code): cls for cls in walk(ServiceError)}
    return [unique[key] for key in sorted(unique)]


def _ref(name: str) -> JSON:
    return {"$ref": f"#/components/schemas/{name}"}


def _error_response(status: int, codes: list[tuple[str, str]]) -> JSON:
    lines = "; ".join(f"`{code}`" + (f": {why}" if why else "") for code, why in codes)
    schema = {
        "allOf": [
            _ref("Error"),
            {"properties": {"error": {"properties": {"code": {"enum": [code for code, _ in codes]}}}}},
        ]
    }
    response: JSON = {"description": lines, "content": {"application/json": {"schema": schema}}}
    if status in _ERROR_HEADERS:
        response["headers"] = _ERROR_HEADERS[status]
    return response


def _errors(classes: list[type[ServiceError]]) -> dict[str, JSON]:
    by_status: dict[int, list[tuple[str, str]]] = {}
    for cls in classes:
        why = " ".join((cls.__doc__ or "").split())
        by_status.setdefault(cls.status_code, []).append((cls.code, why))
    return {str(status): _error_response(status, codes) for status, codes in sorted(by_status.items())}


def _json(schema: JSON, description: str) -> JSON:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _schemas() -> JSON:
    scored: JSON = {
        "type": "object",
        "required": ["class", "score"],
        "properties": {
            "class": {"type": "string", "description": "the class label"},
            "score": {"type": "number", "minimum": 0, "maximum": 1, "description": "the model's probability"},
        },
    }
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "additionalProperties": False,
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "additionalProperties": False,
                    "properties": {
                        "code": {"type": "string", "description": "stable, machine-readable"},
                        "message": {"type": "string", "description": "for people; wording may change"},
                    },
                }
            },
        },
        "Scored": scored,
        "Prediction": {
            "type": "object",
            "required": ["class", "score"],
            "additionalProperties": False,
            "properties": {
                **scored["properties"],
                "top_k": {
                    "type": "array",
                    "items": _ref("Scored"),
                    "minItems": 1,
                    "maxItems": endpoints.MAX_TOP_K,
                    "description": "present only when `top_k` was asked for: the best classes, highest score first",
                },
                "warning": {
                    "type": "string",
                    "description": "present only while the untrained reference model is served",
                    "examples": [endpoints.UNTRAINED_SHORT],
                },
            },
        },
        "Home": {
            "type": "object",
            "required": ["status", "model"],
            "additionalProperties": False,
            "properties": {
                "status": {"type": "string", "examples": [endpoints.STATUS]},
                "model": {
                    "type": "object",
                    "required": ["name", "trained", "sha256", "quantization", "classes", "input"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string"},
                        "description": {"type": "string"},
                        "trained": {"type": "boolean", "description": "false for the untrained reference model"},
                        "sha256": {"type": "string"},
                        "quantization": {"type": "string"},
                        "classes": {"type": "integer", "minimum": 1},
                        "input": {
                            "type": "object",
                            "required": ["height", "width"],
                            "properties": {"height": {"type": "integer"}, "width": {"type": "integer"}},
                        },
                        "created_at": {"type": "string"},
                    },
                },
                "warning": {"type": "string", "description": "present only for an untrained model"},
            },
        },
    }


def _infer(settings: Settings) -> JSON:
    binary = {"type": "string", "format": "binary"}
    limit = f"at most {settings.max_upload_bytes:,} bytes (MAX_UPLOAD_BYTES)"
    return {
        "summary": "Classify one image",
        "description": (
            "The image may come as a multipart part, as base64 in JSON, or as the raw body. Its format is "
            "detected from the bytes (JPEG, PNG, WebP, GIF, BMP, TIFF), whatever the content type claims. "
            f"The image is {limit}, and at most {settings.max_image_pixels:,} pixels (MAX_IMAGE_PIXELS)."
        ),
        "parameters": [
            {
                "name": "top_k",
                "in": "query",
                "required": False,
                "description": "also answer the best `top_k` classes, highest score first",
                "schema": {"type": "integer", "minimum": 1, "maximum": endpoints.MAX_TOP_K},
            }
        ],
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        # `image` or `file`: said in prose, since schemathesis's negative cases mistake an
                        # anyOf of two `required` for a requirement of both.
                        "description": "one image, in part `image` or (when `image` is absent) part `file`",
                        "minProperties": 1,
                        "properties": {
                            "image": {**binary, "description": "the image file (a base64 text field works too)"},
                            # No type: the part is ignored when `image` is present, so any value is valid there.
                            "file": {"description": "an alias of `image` (a file), read only when `image` is absent"},
                        },
                    }
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {
                            "image": {
                                "type": "string",
                                "description": "base64 (standard or URL-safe), optionally a data: URL",
                                "contentEncoding": "base64",
                            }
                        },
                    }
                },
                "image/*": {"schema": binary},
                "application/octet-stream": {"schema": binary},
            },
        },
        "responses": {"200": _json(_ref("Prediction"), "the most likely class")},
    }


def _describe(settings: Settings) -> dict[tuple[str, str], Callable[[], JSON]]:
    """What this module knows how to document, by (path, method)."""
    untrained = "While the untrained reference model is served, a `warning` key says so."
    return {
        ("/", "get"): lambda: {
            "summary": "Service status and the model served",
            "description": untrained,
            "responses": {"200": _json(_ref("Home"), "the service and the model")},
        },
        ("/ping", "get"): lambda: {
            "summary": "Liveness: the process answers",
            "responses": {
                "200": _json(
                    {"type": "object", "required": ["message"], "properties": {"message": {"const": "pong"}}},
                    "alive",
                )
            },
        },
        ("/ready", "get"): lambda: {
            "summary": "Readiness: the model is loaded and warmed, and no shutdown has started",
            "responses": {
                "200": _json(
                    {"type": "object", "required": ["ready"], "properties": {"ready": {"const": True}}}, "ready"
                ),
                "503": _error_response(503, [(NOT_READY, "still loading, or shutting down")]),
            },
        },
        ("/metrics", "get"): lambda: {
            "summary": "Prometheus metrics",
            "responses": {
                "200": {
                    "description": "Prometheus text exposition format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        },
        ("/infer", "post"): lambda: _infer(settings),
        ("/docs", "get"): lambda: {
            "summary": "A page to try the model in a browser",
            "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}},
        },
        ("/openapi.json", "get"): lambda: {
            "summary": "This document",
            "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
        },
    }


def documented_operations() -> set[tuple[str, str]]:
    """Every (path, method) this module can describe: the drift test compares it with the app's routes."""
    return set(_describe(Settings()))


def app_operations(app: Starlette) -> list[tuple[str, str]]:
    """The app's own (path, method) pairs, mounts followed, HEAD left out (Starlette adds it to every GET)."""

    def walk(routes: list[BaseRoute], prefix: str) -> Iterator[tuple[str, str]]:
        for route in routes:
            if isinstance(route, Route):
                path = _CONVERTER.sub(r"{\1}", prefix + route.path)
                for method in sorted(route.methods or ()):
                    if method != "HEAD":
                        yield path, method.lower()
            elif isinstance(route, Mount):
                yield from walk(list(route.routes), prefix + route.path)

    return list(walk(list(app.routes), ""))


def _undescribed(path: str, method: str) -> JSON:
    log.warning("%s %s has no description in service/openapi.py", method.upper(), path)
    return {
        "summary": "not described yet",
        "responses": {"default": {"description": f"{method.upper()} {path} has no description in service/openapi.py"}},
    }


def public_paths(app: Starlette) -> frozenset[str] | None:
    """The paths open without a key, as the app's ApiKey middleware has them; None when no key is configured."""
    for middleware in app.user_middleware:
        factory: object = middleware.cls
        if factory is ApiKey and middleware.kwargs.get("keys"):
            return frozenset(str(path) for path in middleware.kwargs["public"])  # type: ignore[attr-defined]
    return None


def build_document(app: Starlette, settings: Settings) -> JSON:
    """The OpenAPI document of `app` as configured by `settings`."""
    describe = _describe(settings)
    public = public_paths(app)
    all_errors = error_classes()
    auth_errors = [cls for cls in all_errors if cls.status_code == 401]
    infer_errors = [cls for cls in all_errors if cls.status_code != 401]
    paths: dict[str, JSON] = {}
    for path, method in app_operations(app):
        found = describe.get((path, method))
        operation = found() if found else _undescribed(path, method)
        if path == "/infer":
            operation["responses"].update(_errors(infer_errors))
        if public is not None and path not in public:
            operation["security"] = [{"bearer": []}]
            operation["responses"].update(_errors(auth_errors))
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Car classifier",
            "version": API_VERSION,
            "description": (
                "Classifies a photo of a car into one of the Stanford Cars classes. Every error answers "
                '`{"error": {"code": "...", "message": "..."}}`; clients should act on `code`.'
            ),
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`Authorization: Bearer <API_KEY>`, needed only when API_KEY is set",
                }
            },
        },
    }


async def openapi_json(request: Request) -> JSONResponse:
    state = request.app.state
    document = getattr(state, "openapi_document", None)
    if document is None:
        document = state.openapi_document = build_document(request.app, state.settings)
    return JSONResponse(document)
