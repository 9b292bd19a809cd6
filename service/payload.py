"""Find the image bytes in a POST /infer request, whichever way the client sent them.

Accepted, so every client of the original keeps working:
- multipart/form-data, field `image` (the original's `UploadFile`) or `file`;
- a JSON body `{"image": "<base64>"}` (the original specification's words);
- a raw body with an `image/*` or `application/octet-stream` content type.

The body is counted as it streams in and refused with 413 as soon as it passes the limit, so an
oversized upload is never buffered whole.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncGenerator

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from service.errors import (
    EmptyImage,
    InvalidBase64,
    MalformedBody,
    MissingImage,
    PayloadTooLarge,
    UnsupportedMediaType,
)

IMAGE_FIELDS = ("image", "file")
# Room for multipart boundaries and part headers around an image of the maximum size.
_FRAMING_BYTES = 64 * 1024


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the upload is larger than {limit:,} bytes (MAX_UPLOAD_BYTES)")


async def _limited_stream(request: Request, body_limit: int, upload_limit: int) -> AsyncGenerator[bytes, None]:
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > body_limit:
            raise _too_large(upload_limit)
        yield chunk


async def _read_body(request: Request, body_limit: int, upload_limit: int) -> bytes:
    chunks = [chunk async for chunk in _limited_stream(request, body_limit, upload_limit)]
    return b"".join(chunks)


def _check_declared_length(request: Request, body_limit: int, upload_limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > body_limit:
        raise _too_large(upload_limit)


def decode_base64(text: str) -> bytes:
    """Standard or URL-safe base64, with or without a `data:image/...;base64,` prefix or line breaks."""
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    compact = "".join(text.split())
    if not compact:
        raise EmptyImage("the base64 image is empty")
    altchars = b"-_" if ("-" in compact or "_" in compact) else None
    try:
        return base64.b64decode(compact, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidBase64("`image` is not valid base64") from None


async def _from_multipart(request: Request, body_limit: int, upload_limit: int) -> bytes:
    parser = MultiPartParser(
        request.headers,
        _limited_stream(request, body_limit, upload_limit),
        max_files=len(IMAGE_FIELDS),
        max_fields=16,
        max_part_size=body_limit,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise MalformedBody(f"malformed multipart body: {exc.message}") from None
    try:
        for name in IMAGE_FIELDS:
            value = form.get(name)
            if isinstance(value, UploadFile):
                return await value.read()
            if isinstance(value, str):
                return decode_base64(value)
        fields = ", ".join(sorted(set(form.keys()))) or "none"
        raise MissingImage(f"the multipart body has no `image` (or `file`) part; parts received: {fields}")
    finally:
        await form.close()


async def _from_json(request: Request, body_limit: int, upload_limit: int) -> bytes:
    body = await _read_body(request, body_limit, upload_limit)
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MissingImage('the JSON body is not valid JSON; send {"image": "<base64>"}') from None
    if not isinstance(document, dict) or not isinstance(document.get("image"), str):
        raise MissingImage('the JSON body has no base64 string under key "image"')
    return decode_base64(document["image"])


async def read_image_bytes(request: Request, max_upload_bytes: int) -> bytes:
    content_type = request.headers.get("content-type", "")
    media_type = content_type.partition(";")[0].strip().lower()

    if media_type == "multipart/form-data":
        body_limit, reader = max_upload_bytes + _FRAMING_BYTES, _from_multipart
    elif media_type == "application/json" or media_type.endswith("+json"):
        # base64 makes four characters of every three bytes.
        body_limit, reader = (max_upload_bytes * 4 + 2) // 3 + _FRAMING_BYTES, _from_json
    elif media_type.startswith("image/") or media_type == "application/octet-stream":
        body_limit, reader = max_upload_bytes, _read_body
    else:
        shown = media_type or "none"
        raise UnsupportedMediaType(
            f"content type {shown!r} cannot carry an image; send multipart/form-data with an `image` field, "
            'JSON {"image": "<base64>"}, or the raw bytes as image/* or application/octet-stream'
        )

    _check_declared_length(request, body_limit, max_upload_bytes)
    data = await reader(request, body_limit, max_upload_bytes)
    if len(data) > max_upload_bytes:
        raise _too_large(max_upload_bytes)
    if not data:
        raise EmptyImage("the image is empty (0 bytes)")
    return data
