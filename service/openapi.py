"""The OpenAPI 3.1 document, built from the running app so it cannot drift from the code.

The paths and methods come from the app's route table (a route without a description here is listed as
"not described yet", and tests/test_openapi.py fails); the error codes come from the `ServiceError`
subclasses in service/errors.py; limits from the settings; which routes need a key from the ApiKey middleware.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Mount, Route

from service import endpoints, oip
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
# ProtocolError's statuses in service/oip.py (it takes the status as an argument, so it cannot be walked).
_OIP_STATUSES = {400, 404, 415, 503}
_OIP_HEADER: JSON = {
    "name": oip.HEADER_LENGTH,
    "in": "header",
    "required": False,
    "description": "the JSON header's length when binary tensor data follows it",
    "schema": {"type": "string", "pattern": "^[0-9]+$"},
}
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
        "Results": {
            "type": "object",
            "required": ["results"],
            "additionalProperties": False,
            "properties": {
                "results": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"anyOf": [_ref("Prediction"), _ref("Error")]},
                    "description": "one per image, in the order sent",
                },
                "warning": {"type": "string", "description": "present only while the untrained model is served"},
            },
        },
        "OipError": {
            "type": "object",
            "required": ["error"],
            "additionalProperties": False,
            "properties": {"error": {"type": "string"}},
        },
        "OipTensor": {
            "type": "object",
            "required": ["name", "datatype", "shape"],
            "properties": {
                "name": {"type": "string"},
                "datatype": {"type": "string", "examples": ["BYTES", "FP32"]},
                # -1 in model metadata: a dimension of any size.
                "shape": {"type": "array", "items": {"type": "integer", "minimum": -1}},
                "parameters": {"type": ["object", "null"]},
                "data": {"description": "the elements, row-major (nested lists allowed); absent for binary data"},
            },
        },
        "OipInferenceRequest": {
            "type": "object",
            "required": ["inputs"],
            "properties": {
                # null is taken as absent, for these optional members
                "id": {"type": ["string", "null"]},
                "parameters": {"type": ["object", "null"]},
                "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": _ref("OipTensor")},
                "outputs": {
                    "type": ["array", "null"],
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {"name": {"const": oip.OUTPUT}, "parameters": {"type": ["object", "null"]}},
                    },
                },
            },
        },
        "OipInferenceResponse": {
            "type": "object",
            "required": ["model_name", "outputs"],
            "properties": {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "id": {"type": "string"},
                "parameters": {
                    "type": "object",
                    "description": "`warning` while the untrained reference model is served",
                },
                "outputs": {"type": "array", "items": _ref("OipTensor")},
            },
        },
        "OipModelMetadata": {
            "type": "object",
            "required": ["name", "versions", "platform", "inputs", "outputs"],
            "properties": {
                "name": {"type": "string"},
                "versions": {"type": "array", "items": {"type": "string"}},
                "platform": {"type": "string"},
                "inputs": {"type": "array", "items": _ref("OipTensor")},
                "outputs": {"type": "array", "items": _ref("OipTensor")},
            },
        },
        "OipLoaded": {
            "type": "object",
            "required": ["name", "version", "sha256", "replaced"],
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "sha256": {"type": "string"},
                "replaced": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "sha256": {"type": "string"}},
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
    most = settings.max_images_per_request
    limit = f"at most {settings.max_upload_bytes:,} bytes (MAX_UPLOAD_BYTES) in all"
    return {
        "summary": "Classify an image, or several",
        "description": (
            "The image may come as a multipart part, as base64 in JSON, or as the raw body. Its format is "
            "detected from the bytes (JPEG, PNG, WebP, GIF, BMP, TIFF), whatever the content type claims. "
            f"The upload is {limit}; each image at most {settings.max_image_pixels:,} pixels "
            f"(MAX_IMAGE_PIXELS), and at most {settings.max_decode_bytes:,} bytes to decode (MAX_DECODE_BYTES: "
            "a JPEG is decoded reduced, other formats whole).\n\nSeveral images in one request (several `image` "
            "parts, or JSON "
            f'`{{"images": [...]}}`, at most {most}: MAX_IMAGES_PER_REQUEST, 413 beyond it) answer '
            '`{"results": [...]}` in order, each a prediction or, for a bad image, its own `error` object.'
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
                        "description": (
                            "one image in part `image` (or, when `image` is absent, part `file`); "
                            f"several images as up to {most} parts named `image`"
                        ),
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
                        "description": "`image` (one image), or `images` (several) when `image` is absent",
                        "minProperties": 1,
                        "properties": {
                            "image": {
                                "type": "string",
                                "description": "base64 (standard or URL-safe), optionally a data: URL",
                                "contentEncoding": "base64",
                            },
                            "images": {
                                "type": "array",
                                "minItems": 1,
                                "maxItems": most,
                                # No item type: an item that is not base64 is answered as that image's error.
                                "items": {"description": "base64, like `image`"},
                            },
                        },
                    }
                },
                "image/*": {"schema": binary},
                "application/octet-stream": {"schema": binary},
            },
        },
        "responses": {
            "200": _json(
                {"anyOf": [_ref("Prediction"), _ref("Results")]},
                "the most likely class; `results` when several images were sent",
            )
        },
    }


def _oip_errors(statuses: set[int]) -> dict[str, JSON]:
    # The protocol answers `{"error": "<message>"}`; the middleware in front (401, the connection limit's 503)
    # answers in the service's own shape before the protocol is reached.
    schema = {"anyOf": [_ref("OipError"), _ref("Error")]}
    return {
        str(status): {"description": "the protocol's error", "content": {"application/json": {"schema": schema}}}
        for status in sorted(statuses)
    }


def _path_name(model_name: str | None) -> JSON:
    parameter: JSON = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    parameter["description"] = "the model's name, as `GET /` gives it"
    if model_name is not None:
        parameter["example"] = model_name
    return parameter


def _oip_infer(path: list[JSON]) -> JSON:
    header = oip.HEADER_LENGTH
    statuses = {cls.status_code for cls in error_classes() if cls.status_code != 401} | _OIP_STATUSES
    return {
        "summary": "Open Inference Protocol: infer",
        "description": (
            f"One input: `{oip.IMAGE_INPUT}` (BYTES [N] or [N, 1], one encoded image per element, base64 in JSON "
            f"`data`) or `{oip.PIXELS_INPUT}` (FP32 [N, height, width, 3], preprocessed). The output "
            f"`{oip.OUTPUT}` is FP32 [N, classes], or with `parameters: {{classification: k}}` BYTES [N, k] of "
            f"`score:index:label`. With the binary tensor data extension the body is the JSON header followed by "
            f"the binary data, and `{header}` gives the header's length (requests and responses)."
        ),
        "parameters": [*path, _OIP_HEADER],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": _ref("OipInferenceRequest")},
                "application/octet-stream": {
                    "schema": {
                        "type": "string",
                        "format": "binary",
                        "description": f"the JSON header then the binary data; `{header}` is required",
                    },
                },
            },
        },
        "responses": {
            "200": {
                "description": "the outputs asked for",
                "headers": {header: {"description": "present when outputs are binary", "schema": {"type": "string"}}},
                "content": {
                    "application/json": {"schema": _ref("OipInferenceResponse")},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            **_oip_errors(statuses),
        },
    }


def _oip(model_name: str | None) -> dict[tuple[str, str], Callable[[], JSON]]:
    """The Open Inference Protocol routes (service/oip.py), with and without `/versions/{version}`."""
    path = [_path_name(model_name)]
    metadata = {
        "summary": "Open Inference Protocol: model metadata",
        "parameters": path,
        "responses": {"200": _json(_ref("OipModelMetadata"), "the model"), **_oip_errors({404})},
    }
    ready = {
        "summary": "Open Inference Protocol: model readiness",
        "parameters": path,
        "responses": {
            "200": _json(
                {
                    "type": "object",
                    "required": ["name", "ready"],
                    "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}},
                },
                "ready",
            ),
            **_oip_errors({404, 503}),
        },
    }
    versioned = [
        *path,
        {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}, "example": oip.VERSION},
    ]
    described: dict[tuple[str, str], Callable[[], JSON]] = {
        ("/v2", "get"): lambda: {
            "summary": "Open Inference Protocol: server metadata",
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "required": ["name", "version", "extensions"],
                        "properties": {
                            "name": {"type": "string"},
                            "version": {"type": "string"},
                            "extensions": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                    "the server",
                )
            },
        },
        ("/v2/health/live", "get"): lambda: {
            "summary": "Open Inference Protocol: liveness",
            "responses": {"200": _json(_flag("live"), "alive")},
        },
        ("/v2/health/ready", "get"): lambda: {
            "summary": "Open Inference Protocol: readiness",
            "responses": {"200": _json(_flag("ready"), "ready"), **_oip_errors({503})},
        },
        ("/v2/models/{name}", "get"): lambda: metadata,
        ("/v2/models/{name}/versions/{version}", "get"): lambda: {**metadata, "parameters": versioned},
        ("/v2/models/{name}/ready", "get"): lambda: ready,
        ("/v2/models/{name}/versions/{version}/ready", "get"): lambda: {**ready, "parameters": versioned},
        ("/v2/models/{name}/infer", "post"): lambda: _oip_infer(path),
        ("/v2/models/{name}/versions/{version}/infer", "post"): lambda: {
            **_oip_infer(path),
            "parameters": [*versioned, _OIP_HEADER],
        },
        ("/v2/repository/models/{name}/load", "post"): lambda: {
            "summary": "Open Inference Protocol, model repository extension: load MODEL_DIR again",
            "description": "The artifact in MODEL_DIR replaces the model served, if it is valid and its name matches.",
            "parameters": path,
            "requestBody": {
                "required": False,
                "content": {
                    "application/json": {
                        "schema": {"type": "object", "properties": {"parameters": {"type": ["object", "null"]}}},
                    }
                },
            },
            "responses": {"200": _json(_ref("OipLoaded"), "now serving"), **_oip_errors({400, 404, 408, 413})},
        },
    }
    return described


def _flag(name: str) -> JSON:
    return {"type": "object", "required": [name], "properties": {name: {"const": True}}}


def _describe(settings: Settings, model_name: str | None = None) -> dict[tuple[str, str], Callable[[], JSON]]:
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
        **_oip(model_name),
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
        "parameters": [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"{(\w+)}", path)
        ],
        "responses": {"default": {"description": f"{method.upper()} {path} has no description in service/openapi.py"}},
    }


def public_paths(app: Starlette) -> frozenset[str] | None:
    """The paths open without a key, as the app's ApiKey middleware has them; None when no key is configured."""
    for middleware in app.user_middleware:
        factory: object = middleware.cls
        if factory is ApiKey and middleware.kwargs.get("keys"):
            return frozenset(str(path) for path in middleware.kwargs["public"])  # type: ignore[attr-defined]
    return None


def _served_name(app: Starlette) -> str | None:
    plane = getattr(app.state, "data_plane", None)
    return None if plane is None else str(plane.model.manifest.name)


def build_document(app: Starlette, settings: Settings) -> JSON:
    """The OpenAPI document of `app` as configured by `settings`."""
    describe = _describe(settings, _served_name(app))
    public = public_paths(app)
    all_errors = error_classes()
    auth_errors = [cls for cls in all_errors if cls.status_code == 401]
    infer_errors = [cls for cls in all_errors if cls.status_code != 401]
    paths: dict[str, JSON] = {}
    for path, method in app_operations(app):
        found = describe.get((path, method))
        # A fresh copy: the descriptions share sub-objects, and security adds to `responses` below.
        operation = copy.deepcopy(found()) if found else _undescribed(path, method)
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
                "Classifies a photo of a car into one of the Stanford Cars classes. Every error of the service's "
                'own routes answers `{"error": {"code": "...", "message": "..."}}`: act on `code`. The Open '
                'Inference Protocol routes (`/v2/...`) answer that protocol\'s `{"error": "<message>"}`.'
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
    # Built once per model served (a build takes milliseconds): a model load changes the name given as example.
    state = request.app.state
    name = _served_name(request.app)
    cached: tuple[str | None, JSON] | None = getattr(state, "openapi_document", None)
    if cached is None or cached[0] != name:
        cached = state.openapi_document = (name, build_document(request.app, state.settings))
    return JSONResponse(cached[1])
