"""Log lines: for a person (LOG_FORMAT=text, the default) or one JSON object a line (LOG_FORMAT=json), and the
access line every request gets once it is answered.

An access line names the request (its ID), what it asked and got, how long each part took and the model that
answered; never a header's or a body's content, so neither an image nor a key can reach the log. A line written
while a request is in progress (in its task) carries its ID too.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from service import record
from service.record import RequestRecord
from service.settings import Settings

ACCESS = logging.getLogger("service.access")
TEXT_FORMAT = "%(levelname)s:     %(message)s"


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def access_fields(
    request: RequestRecord, method: str, route: str, status: int, client: str, ended: float
) -> dict[str, Any]:
    """What an access line says of one request."""
    return {
        "request_id": request.id,
        "method": method,
        "route": route,
        "status": status,
        "error": request.error or None,
        "duration_ms": _ms(ended - request.started),
        "read_ms": _ms(request.read_s),
        "queue_ms": _ms(request.queue_s),
        "decode_ms": _ms(request.decode_s),
        "engine_ms": _ms(request.engine_s),
        "images": request.images,
        "bytes_in": request.bytes_in,
        "model": request.model or None,
        "client": client,
    }


class _Readable:
    """An access line for a person, written only if a text handler formats it."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        f = self.fields
        status = f"{f['status']} {f['error']}" if f["error"] else str(f["status"])
        line = f'{f["client"]} "{f["method"]} {f["route"]}" {status} {f["duration_ms"]:.1f} ms'
        if f["images"]:
            line += (
                f" (read {f['read_ms']:.1f}, queue {f['queue_ms']:.1f}, decode {f['decode_ms']:.1f}, "
                f"engine {f['engine_ms']:.1f}), {f['images']} image{'s' if f['images'] > 1 else ''}"
            )
        if f["bytes_in"]:
            line += f", {f['bytes_in']:,} bytes in"
        trace = f" trace {f['trace_id']}" if f.get("trace_id") else ""
        return f"{line}, {f['model'] or 'no model'}, request {f['request_id']}{trace}"


def access(fields: dict[str, Any]) -> None:
    ACCESS.info("%s", _Readable(fields), extra={"access": fields})


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, line: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        message = super().formatMessage(line)
        request_id = _request_id(line)
        if request_id is not None and not hasattr(line, "access"):
            message += f" [request {request_id}]"
        return message


def _request_id(line: logging.LogRecord) -> str | None:
    """The request a line is about: the one in progress in the task that wrote it, or (from a thread serving
    several) the ones it names in its `extra`."""
    named: str | None = getattr(line, "request_id", None)
    return named if named is not None else record.current_id()


class JsonFormatter(logging.Formatter):
    def format(self, line: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(line.created, UTC).isoformat(timespec="milliseconds"),
            "level": line.levelname.lower(),
            "logger": line.name,
        }
        fields: dict[str, Any] | None = getattr(line, "access", None)
        if fields is not None:
            document.update(fields)
        else:
            document["message"] = line.getMessage()
            request_id = _request_id(line)
            if request_id is not None:
                document["request_id"] = request_id
            if line.exc_info:
                document["exception"] = self.formatException(line.exc_info)
        return json.dumps(document, separators=(",", ":"), default=str)


def configure(settings: Settings) -> None:
    """Every handler of the root logger (where uvicorn's lines go too) writes LOG_FORMAT."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    formatter = JsonFormatter() if settings.log_format == "json" else TextFormatter()
    for handler in root.handlers:
        handler.setFormatter(formatter)


def client_address(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "-"
