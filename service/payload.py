"""Find the image bytes in a POST /infer request, whichever way the client sent them.

Accepted, so every client of the original keeps working:
- multipart/form-data, field `image` (the original's `UploadFile`) or `file`;
- a JSON body `{"image": "<base64>"}` (the original specification's words);
- a raw body with an `image/*` or `application/octet-stream` content type.
Several images in one request: several `image` (or `file`) parts, or JSON `{"images": ["<base64>", ...]}`.
A bad one among them is that image's own error, not the request's.

The body is counted as it streams in and refused with 413 as soon as it passes the limit, so an
oversized upload is never buffered whole. Several images share the one body limit (MAX_UPLOAD_BYTES).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from service.errors import (
    ClientDisconnected,
    EmptyImage,
    InvalidBase64,
    MalformedBody,
    MissingImage,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
)

IMAGE_FIELDS = ("image", "file")
# Room for multipart boundaries, part headers or a JSON document around an image of the maximum size.
FRAMING_BYTES = 64 * 1024


def json_body_limit(max_upload_bytes: int) -> int:
    """The largest body that carries images of `max_upload_bytes` as base64 in JSON (four characters for every
    three bytes)."""
    return (max_upload_bytes * 4 + 2) // 3 + FRAMING_BYTES


class Capacity(Protocol):
    """How many images one request may carry (service.inference.DataPlane)."""

    @property
    def max_images(self) -> int: ...

    def check_count(self, count: int) -> None: ...


def _too_large(limit: int, limit_name: str = "MAX_UPLOAD_BYTES") -> PayloadTooLarge:
    return PayloadTooLarge(f"the upload is larger than {limit:,} bytes ({limit_name})")


@dataclass(frozen=True)
class Upload:
    """The images of one request, in order: the bytes, or why that image cannot be read."""

    images: list[bytes | ServiceError]
    # Sent in a form of several images (`{"images": [...]}`, several parts): answered `{"results": [...]}`.
    several: bool


async def _limited_stream(
    request: Request, body_limit: int, upload_limit: int, limit_name: str = "MAX_UPLOAD_BYTES"
) -> AsyncGenerator[bytes, None]:
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > body_limit:
                raise _too_large(upload_limit, limit_name)
            yield chunk
    except ClientDisconnect:
        # Nobody to answer; a 499 in the metrics, not a traceback in the log and a 500 (Starlette's own error).
        raise ClientDisconnected(f"the client closed the connection after {received:,} bytes of its body") from None


async def read_body(
    request: Request, body_limit: int, upload_limit: int, limit_name: str = "MAX_UPLOAD_BYTES"
) -> bytes:
    """The whole body, refused with 413 (naming `upload_limit`, the setting `limit_name`) as soon as it passes
    `body_limit`."""
    _check_declared_length(request, body_limit, upload_limit, limit_name)
    return await _read_body(request, body_limit, upload_limit, limit_name)


async def _read_body(
    request: Request, body_limit: int, upload_limit: int, limit_name: str = "MAX_UPLOAD_BYTES"
) -> bytes:
    chunks = [chunk async for chunk in _limited_stream(request, body_limit, upload_limit, limit_name)]
    return b"".join(chunks)


def _check_declared_length(
    request: Request, body_limit: int, upload_limit: int, limit_name: str = "MAX_UPLOAD_BYTES"
) -> None:
    declared = decimal(request.headers.get("content-length", ""))
    if declared is not None and declared > body_limit:
        raise _too_large(upload_limit, limit_name)


def decimal(text: str) -> int | None:
    """A non-negative number as HTTP headers and query strings write it (ASCII digits only), else None.
    str.isdigit() alone also takes "²" (int() then raises: a 500) and "٣" (int() reads 3). More than 18 digits:
    None too, a number past every limit here (and int() refuses more than 4300 digits)."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


def parse_json(raw: bytes) -> Any:
    """A client's JSON document; ValueError, whatever is wrong with it. Besides malformed JSON and bytes that
    are not UTF-8, json.loads raises ValueError on an integer of more than 4300 digits and RecursionError on
    arrays nested about a thousand deep: both were 500s."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deep") from None


def check_identity_encoding(request: Request) -> None:
    """415 for a compressed body (RFC 7694): read as it is, a gzipped image would fail as an undecodable one."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedMediaType(f"compressed request bodies (Content-Encoding: {encoding}) are not supported")


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


def _decoded(text: str) -> bytes | ServiceError:
    try:
        return decode_base64(text)
    except ServiceError as exc:
        return exc


async def _from_multipart(request: Request, body_limit: int, upload_limit: int, capacity: Capacity) -> Upload:
    max_images = capacity.max_images
    parser = MultiPartParser(
        request.headers,
        _limited_stream(request, body_limit, upload_limit),
        max_files=max(max_images, len(IMAGE_FIELDS)),
        max_fields=max_images + 16,
        max_part_size=body_limit,
    )
    # Parts stay in memory (the body limit bounds them, and they are read into memory right after): Starlette
    # spools a part over 1 MiB to a temporary file, which fails on a read-only filesystem with no /tmp.
    parser.spool_max_size = body_limit
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if exc.message.startswith(("Too many files", "Too many fields")):
            raise PayloadTooLarge(
                f"more parts than MAX_IMAGES_PER_REQUEST ({max_images}) allows: {exc.message}"
            ) from None
        raise MalformedBody(f"malformed multipart body: {exc.message}") from None
    except UnicodeError as exc:
        # Part names, filenames and text fields are decoded with the body's `charset`. Starlette falls back to
        # latin-1 for bytes that do not decode and for names that are no codec, but a codec such as "undefined",
        # "idna" or "punycode" raises plain UnicodeError, which it let through: a 500.
        raise MalformedBody(f"malformed multipart body: its parts cannot be decoded as its charset ({exc})") from None
    try:
        for name in IMAGE_FIELDS:
            values = form.getlist(name)
            if not values:
                continue
            capacity.check_count(len(values))
            images: list[bytes | ServiceError] = [
                await value.read() if isinstance(value, UploadFile) else _decoded(value) for value in values
            ]
            return Upload(images, several=len(images) > 1)
        fields = ", ".join(sorted(set(form.keys()))) or "none"
        raise MissingImage(f"the multipart body has no `image` (or `file`) part; parts received: {fields}")
    finally:
        await form.close()
        # A body cut inside a file part leaves that part out of the form, its file still open: Starlette closes
        # the files it opened only when parsing raises, and a truncated body does not.
        for file in parser._files_to_close_on_error:
            file.close()


async def _from_json(request: Request, body_limit: int, upload_limit: int, capacity: Capacity) -> Upload:
    body = await _read_body(request, body_limit, upload_limit)
    try:
        document = parse_json(body)
    except ValueError:
        raise MissingImage('the JSON body is not valid JSON; send {"image": "<base64>"}') from None
    if isinstance(document, dict) and "image" not in document and "images" in document:
        listed = document["images"]
        if not isinstance(listed, list) or not listed:
            raise MissingImage('"images" must be a non-empty list of base64 strings')
        capacity.check_count(len(listed))
        images: list[bytes | ServiceError] = [
            _decoded(item) if isinstance(item, str) else InvalidBase64(f"images[{i}] is not a base64 string")
            for i, item in enumerate(listed)
        ]
        return Upload(images, several=True)
    if not isinstance(document, dict) or not isinstance(document.get("image"), str):
        raise MissingImage('the JSON body has no base64 string under key "image"')
    return Upload([_decoded(document["image"])], several=False)


async def _raw(request: Request, body_limit: int, upload_limit: int, capacity: Capacity) -> Upload:
    return Upload([await _read_body(request, body_limit, upload_limit)], several=False)


def _checked(data: bytes | ServiceError, max_upload_bytes: int) -> bytes | ServiceError:
    if isinstance(data, ServiceError):
        return data
    if len(data) > max_upload_bytes:
        return _too_large(max_upload_bytes)
    if not data:
        return EmptyImage("the image is empty (0 bytes)")
    return data


async def read_upload(request: Request, max_upload_bytes: int, capacity: Capacity) -> Upload:
    """The request's images. A request of one image raises that image's error, as it always did."""
    check_identity_encoding(request)
    content_type = request.headers.get("content-type", "")
    media_type = content_type.partition(";")[0].strip().lower()

    if media_type == "multipart/form-data":
        body_limit, reader = max_upload_bytes + FRAMING_BYTES, _from_multipart
    elif media_type == "application/json" or media_type.endswith("+json"):
        body_limit, reader = json_body_limit(max_upload_bytes), _from_json
    elif media_type.startswith("image/") or media_type == "application/octet-stream":
        body_limit, reader = max_upload_bytes, _raw
    else:
        shown = media_type or "none"
        raise UnsupportedMediaType(
            f"content type {shown!r} cannot carry an image; send multipart/form-data with an `image` field, "
            'JSON {"image": "<base64>"}, or the raw bytes as image/* or application/octet-stream'
        )

    _check_declared_length(request, body_limit, max_upload_bytes)
    upload = await reader(request, body_limit, max_upload_bytes, capacity)
    images = [_checked(data, max_upload_bytes) for data in upload.images]
    if not upload.several and isinstance(images[0], ServiceError):
        raise images[0]
    return Upload(images, upload.several)


class _OneImage:
    max_images = 1

    def check_count(self, count: int) -> None:
        if count > 1:
            raise PayloadTooLarge(f"{count} images in one request; send one")


async def read_image_bytes(request: Request, max_upload_bytes: int) -> bytes:
    """The one image of a single-image request (several images: 413)."""
    upload = await read_upload(request, max_upload_bytes, _OneImage())
    (data,) = upload.images
    if isinstance(data, ServiceError):
        raise data
    return data
