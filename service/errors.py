"""One error base carrying its HTTP status, and the handlers that render every error in its protocol's shape.

The service's own routes answer `{"error": {"code", "message"}}`; a protocol with a shape of its own (the Open
Inference Protocol's `{"error": "<message>"}`) registers a renderer for its path prefix (service/app.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from service import record


class ServiceError(Exception):
    """An error a client can act on: it becomes `{"error": {"code", "message"}}` with `status_code`."""

    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers


class InvalidImage(ServiceError):
    status_code, code = 400, "invalid_image"


class EmptyImage(ServiceError):
    status_code, code = 400, "empty_image"


class MalformedBody(ServiceError):
    status_code, code = 400, "malformed_body"


class MalformedHTTP(ServiceError):
    """Bytes uvicorn cannot parse as HTTP; answered by service/protocol.py, since they never reach the app."""

    status_code, code = 400, "malformed_http"


class Unauthorized(ServiceError):
    status_code, code = 401, "unauthorized"


class RequestTimeout(ServiceError):
    status_code, code = 408, "request_timeout"


class PayloadTooLarge(ServiceError):
    status_code, code = 413, "payload_too_large"


class ImageTooLarge(ServiceError):
    status_code, code = 413, "image_too_large"


class UnsupportedMediaType(ServiceError):
    status_code, code = 415, "unsupported_media_type"


class MissingImage(ServiceError):
    status_code, code = 422, "missing_image"


class InvalidBase64(ServiceError):
    status_code, code = 422, "invalid_base64"


class InvalidParameter(ServiceError):
    status_code, code = 422, "invalid_parameter"


class Overloaded(ServiceError):
    status_code, code = 503, "overloaded"


class DeadlineExceeded(ServiceError):
    status_code, code = 504, "deadline_exceeded"


class ClientDisconnected(ServiceError):
    status_code, code = 499, "client_closed_request"


class ShuttingDown(ServiceError):
    status_code, code = 503, "shutting_down"


class NotReady(ServiceError):
    status_code, code = 503, "not_ready"


class CorsRefused(ServiceError):
    status_code, code = 400, "cors_refused"


class ModelLoadDisabled(ServiceError):
    """POST /v2/repository/models/{name}/load while MODEL_LOAD is not `enabled`."""

    status_code, code = 403, "model_load_disabled"


class InvalidRequest(ServiceError):
    """A request its protocol's grammar refuses (an Open Inference Protocol request without `inputs`, ...)."""

    status_code, code = 400, "invalid_request"


class ModelNotFound(ServiceError):
    status_code, code = 404, "model_not_found"


class LoadFailed(ServiceError):
    """The artifact in MODEL_DIR cannot be served; the model that was serving still is."""

    status_code, code = 400, "load_failed"


class NotFound(ServiceError):
    status_code, code = 404, "not_found"


class MethodNotAllowed(ServiceError):
    status_code, code = 405, "method_not_allowed"


class InternalError(ServiceError):
    status_code, code = 500, "internal_error"


_HTTP_ERRORS: dict[int, type[ServiceError]] = {404: NotFound, 405: MethodNotAllowed}


class ErrorJSON(JSONResponse):
    """An error body, written in ASCII. Messages quote what the client sent, and JSON can send a lone surrogate
    ("\\ud800"), which UTF-8 cannot encode: Starlette's rendering raised on it, and the answer became a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def noted(code: str) -> str | None:
    """The ID of the request in progress, its error `code` noted for its access log line (None: no request)."""
    request = record.current.get()
    if request is None:
        return None
    request.error = code
    return request.id


def error_response(status_code: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    error = {"code": code, "message": message}
    request_id = noted(code)
    if request_id is not None:
        error["request_id"] = request_id
    return ErrorJSON({"error": error}, status_code=status_code, headers=headers)


def render(exc: ServiceError) -> JSONResponse:
    """The service's own shape."""
    return error_response(exc.status_code, exc.code, exc.message, exc.headers)


Renderer = Callable[[ServiceError], JSONResponse]


def _from_http(exc: HTTPException) -> ServiceError:
    """Starlette's own 404/405 (and any HTTPException), which answer plain text by default."""
    headers = dict(exc.headers) if exc.headers else None
    error = _HTTP_ERRORS.get(exc.status_code, ServiceError)(str(exc.detail), headers=headers)
    if type(error) is ServiceError:
        error.status_code, error.code = exc.status_code, "http_error"
    return error


def _internal(answer: JSONResponse) -> JSONResponse:
    # Starlette answers an unexpected failure outside every middleware of the app's: its headers are put on here.
    request_record = record.current.get()
    if request_record is not None:
        answer.headers["X-Request-ID"] = request_record.id
        if request_record.model:
            answer.headers["X-Model"] = request_record.model
    return answer


Handler = Callable[[Request, Exception], Any]


def exception_handlers(protocols: Mapping[str, Renderer]) -> dict[Any, Handler]:
    """Starlette's handlers: every error, Starlette's 404/405 and unexpected failures included, in the shape of
    the protocol whose path prefix the route has (`protocols`), else in the service's own."""

    def renderer(request: Request) -> Renderer:
        path: str = request.scope["path"]
        for prefix, protocol_renderer in protocols.items():
            if path == prefix or path.startswith(prefix + "/"):
                return protocol_renderer
        return render

    async def service_error_handler(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return renderer(request)(exc)

    async def http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return renderer(request)(_from_http(exc))

    async def unhandled_error_handler(request: Request, exc: Exception) -> JSONResponse:
        failed = InternalError("internal server error; the failure is logged on the server")
        return _internal(renderer(request)(failed))

    return {
        ServiceError: service_error_handler,
        HTTPException: http_exception_handler,
        Exception: unhandled_error_handler,
    }
