"""Property tests of what a client controls: the request body and its content type, and the image bytes.

Any body with any content type gives the image bytes or one of the typed ServiceErrors; any bytes give
the model's input array or one of the typed ServiceErrors; and through the real app, any request gets 200
or a documented 4xx in the one JSON shape, never a 500. tests/fuzz_images.py drives the same entry points
(`fuzz_payload`, `fuzz_preprocess`, with atheris) for longer.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import struct
import sys
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request

from service.errors import ServiceError
from service.imaging import preprocess
from service.manifest import Manifest
from service.payload import read_image_bytes
from tests.helpers import ARTIFACTS, asgi_post, make_app, write_tiny_artifact

SPEC = Manifest.read(ARTIFACTS).preprocessing
MAX_UPLOAD = 4096  # small, so that the 413 paths are reached by small bodies too
MAX_PIXELS = (1, 64 * 48, *[1 << 20] * 4)  # mostly a limit the seeds pass
# Bounded so the whole file runs in well under a minute on 2 shared cores; tests/fuzz_images.py runs longer.
FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
DOCUMENTED = {
    400: {"invalid_image", "empty_image", "malformed_body"},
    413: {"payload_too_large", "image_too_large"},
    415: {"unsupported_media_type"},
    422: {"missing_image", "invalid_base64", "invalid_parameter"},
}


# --- Seeds: small valid images in every accepted format and in awkward modes, which the mutations then break. ---


def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def _seeds() -> list[bytes]:
    rng = np.random.default_rng(14)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: width and height swap
    floats = rng.uniform(-2, 300, (12, 16)).astype(np.float32)
    return [
        _encode(rgb, "JPEG", quality=80),
        _encode(rgb, "JPEG", progressive=True, exif=exif.tobytes()),
        _encode(rgb.convert("CMYK"), "JPEG"),
        _encode(rgb.convert("L"), "JPEG"),
        _encode(rgb.convert("RGBA"), "PNG"),
        _encode(rgb.convert("P"), "PNG", transparency=3),
        _encode(Image.fromarray(rng.integers(0, 65536, (12, 16), dtype=np.uint16)), "PNG"),
        _encode(rgb.convert("LA"), "PNG"),
        _encode(rgb.convert("P"), "GIF"),
        _encode(rgb, "BMP"),
        _encode(rgb, "TIFF", compression="tiff_lzw"),
        _encode(Image.fromarray(floats, mode="F"), "TIFF"),
        _encode(rgb, "WEBP", quality=50),
        _encode(rgb.convert("RGBA"), "WEBP", lossless=True),
    ]


def _float_tiff(*values: float) -> bytes:
    floats = np.full((12, 16), 100.0, dtype=np.float32)
    floats[0, : len(values)] = values
    return _encode(Image.fromarray(floats, mode="F"), "TIFF")


VALID_SEEDS = _seeds()
# A 32-bit float TIFF with NaN and infinite pixels: see test_non_finite_float_pixels_*.
NON_FINITE_TIFF = _float_tiff(np.nan, np.inf, -np.inf)
SEEDS = [*VALID_SEEDS, NON_FINITE_TIFF]


def _png_with_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite a PNG's IHDR to declare another size (with a valid CRC), keeping the pixel data."""
    ihdr = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


def _jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite a JPEG's frame header (SOF0/SOF2) to declare another size."""
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = data.find(marker)
        if at >= 0:
            return data[: at + 5] + struct.pack(">HH", height & 0xFFFF, width & 0xFFFF) + data[at + 9 :]
    return data


@st.composite
def image_like(draw: st.DrawFn) -> bytes:
    """Mostly broken images: a seed, maybe re-declared to another size, then bytes flipped, cut or inserted."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=256))
    data = draw(st.sampled_from(SEEDS))
    if draw(st.integers(0, 3)) == 0:
        side = st.one_of(st.integers(0, 600), st.integers(0, 70_000))
        width, height = draw(side), draw(side)
        if data.startswith(b"\x89PNG"):
            data = _png_with_size(data, width, height)
        elif data.startswith(b"\xff\xd8"):
            data = _jpeg_with_size(data, width, height)
    buffer = bytearray(data)
    for _ in range(draw(st.integers(0, 6))):
        if not buffer:
            break
        at = draw(st.integers(0, len(buffer) - 1))
        action = draw(st.sampled_from(("flip", "insert", "delete", "truncate")))
        if action == "flip":
            buffer[at] = draw(st.integers(0, 255))
        elif action == "insert":
            buffer[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif action == "delete":
            del buffer[at : at + draw(st.integers(1, 64))]
        else:
            del buffer[at:]
    return bytes(buffer)


# --- Request bodies: raw, multipart (valid framing around broken parts, or broken framing) and JSON. ---

MEDIA_TYPES = (
    "multipart/form-data",
    "MULTIPART/FORM-DATA",
    "application/json",
    "application/vnd.api+json",
    "image/jpeg",
    "image/png",
    "image/",
    "application/octet-stream",
    "text/plain",
    "application/x-www-form-urlencoded",
    "",
)


@st.composite
def multipart(draw: st.DrawFn, boundary: str) -> bytes:
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(("image", "file", "picture", "", 'im"age')))
        disposition = draw(
            st.sampled_from(
                (
                    f'form-data; name="{name}"; filename="car.jpg"',
                    f'form-data; name="{name}"',
                    "form-data",
                    "attachment; filename=x",
                )
            )
        )
        headers = f"Content-Disposition: {disposition}\r\n"
        if draw(st.booleans()):
            headers += f"Content-Type: {draw(st.sampled_from(MEDIA_TYPES))}\r\n"
        content = draw(st.one_of(image_like(), st.binary(max_size=64)))
        if draw(st.integers(0, 4)) == 0:
            content = base64.b64encode(content)
        parts.append(f"--{boundary}\r\n{headers}\r\n".encode() + content + b"\r\n")
    body = b"".join(parts) + (f"--{boundary}--\r\n".encode() if draw(st.booleans()) else b"")
    if draw(st.integers(0, 3)) == 0:
        body = body[: draw(st.integers(0, len(body)))]
    return body


@st.composite
def json_body(draw: st.DrawFn) -> bytes:
    image = draw(
        st.one_of(
            image_like().map(lambda b: base64.b64encode(b).decode()),
            image_like().map(lambda b: "data:image/png;base64," + base64.urlsafe_b64encode(b).decode()),
            st.text(max_size=64),
            st.integers(),
            st.none(),
        )
    )
    document = draw(st.sampled_from(({"image": image}, {"picture": image}, [image], image)))
    text = json.dumps(document).encode()
    return text[: draw(st.integers(0, len(text)))] if draw(st.integers(0, 4)) == 0 else text


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes, list[int], str | None]:
    """(content type, body, chunk boundaries, declared Content-Length or None).

    Mostly a body of the kind its content type announces, so that each parser gets bodies worth parsing;
    one in four pairs any content type with any body.
    """
    boundary = draw(st.sampled_from(("b0undary", "x", "----WebKitFormBoundary7MA4YWxkTrZu0gW")))
    kind = draw(st.sampled_from(("multipart", "json", "raw", "any")))
    if kind == "multipart":
        media = draw(st.sampled_from(MEDIA_TYPES[:2]))
        body = draw(multipart(boundary))
        if draw(st.integers(0, 7)):  # else no boundary parameter at all
            shown = boundary if draw(st.integers(0, 7)) else draw(st.sampled_from(("", '"', "other")))
            media += f"; boundary={shown}"
    elif kind == "json":
        media, body = draw(st.sampled_from(MEDIA_TYPES[2:4])), draw(json_body())
    elif kind == "raw":
        media = draw(st.sampled_from(MEDIA_TYPES[4:8]))
        body = draw(st.one_of(image_like(), st.binary(max_size=64), st.just(b"\xff" * (MAX_UPLOAD + 1))))
    else:
        media = draw(st.one_of(st.sampled_from(MEDIA_TYPES), st.text(max_size=24)))
        if draw(st.booleans()):
            media += f"; boundary={boundary}"
        body = draw(st.one_of(st.binary(max_size=MAX_UPLOAD + 64), image_like(), multipart(boundary), json_body()))
    if draw(st.integers(0, 3)) == 0:
        media += f"; charset={draw(st.sampled_from(('utf-8', 'latin-1', 'no-such-codec', '')))}"
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
    declared = draw(st.sampled_from((str(len(body)), None, "0", "99999999", "-1", "abc")))
    return media, body, cuts, declared


UNTERMINATED_FILE_PART = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\nabc'


@contextmanager
def no_leaks() -> Iterator[None]:
    """What the block left behind is collected before it ends; a finalizer's warning (an unclosed file) fails it."""
    caught: list[Any] = []
    previous = sys.unraisablehook
    sys.unraisablehook = caught.append
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            yield
            gc.collect()
    finally:
        sys.unraisablehook = previous
    assert not caught, [f"{u.exc_type.__name__}: {u.exc_value}" for u in caught]


def fuzz_payload(content_type: str, body: bytes, cuts: list[int], declared: str | None) -> bytes | ServiceError:
    """read_image_bytes on a real Starlette Request whose body arrives in the given chunks."""
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    headers = [(b"content-type", content_type.encode("utf-8", "surrogateescape"))]
    if declared is not None:
        headers.append((b"content-length", declared.encode()))
    scope = {"type": "http", "method": "POST", "path": "/infer", "query_string": b"", "headers": headers}

    async def receive() -> dict[str, Any]:
        if chunks:
            return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}
        return {"type": "http.disconnect"}

    try:
        return asyncio.run(read_image_bytes(Request(scope, receive), MAX_UPLOAD))
    except ServiceError as error:
        # Its traceback holds the parser's frames: drop them, so what the request left behind can be collected.
        error.__traceback__ = error.__context__ = None
        return error


def fuzz_preprocess(data: bytes, max_pixels: int) -> np.ndarray | ServiceError:
    try:
        return preprocess(data, SPEC, max_pixels)
    except ServiceError as error:
        return error


def test_any_body_and_content_type_gives_image_bytes_or_a_typed_error() -> None:
    @FUZZ
    @given(requests())
    def payload(request: tuple[str, bytes, list[int], str | None]) -> None:
        outcome = fuzz_payload(*request)
        event(type(outcome).__name__)
        if isinstance(outcome, ServiceError):
            assert 400 <= outcome.status_code < 500 and outcome.message
        else:
            assert isinstance(outcome, bytes) and 0 < len(outcome) <= MAX_UPLOAD

    # One collection at the end (one per example costs more than the examples); a file left open fails the test.
    with no_leaks():
        payload()


@FUZZ
@given(image_like(), st.sampled_from(MAX_PIXELS))
def test_any_bytes_give_the_model_input_or_a_typed_error(data: bytes, max_pixels: int) -> None:
    outcome = fuzz_preprocess(data, max_pixels)
    event(type(outcome).__name__)
    if isinstance(outcome, ServiceError):
        assert outcome.status_code in (400, 413) and outcome.message
    else:
        assert outcome.shape == (SPEC.height, SPEC.width, 3) and outcome.dtype == np.float32
        low, high = SPEC.value_range
        assert np.isfinite(outcome).all() and low <= outcome.min() and outcome.max() <= high


def test_the_seeds_are_images_the_service_accepts() -> None:
    # Otherwise the mutations would only ever start from garbage.
    for seed in VALID_SEEDS:
        assert isinstance(fuzz_preprocess(seed, 1 << 20), np.ndarray)


def test_a_multipart_body_cut_inside_a_file_part_closes_its_temporary_file() -> None:
    with no_leaks():
        outcome = fuzz_payload("multipart/form-data; boundary=b", UNTERMINATED_FILE_PART, [], None)
    assert isinstance(outcome, ServiceError)


def test_non_finite_float_pixels_decode_without_a_numpy_warning() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome = fuzz_preprocess(NON_FINITE_TIFF, 1 << 20)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
    assert isinstance(outcome, ServiceError) or np.isfinite(outcome).all()


@pytest.fixture(scope="module")
def app_loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Starlette, asyncio.AbstractEventLoop]]:
    artifact = tmp_path_factory.mktemp("fuzz") / "artifact"
    write_tiny_artifact(artifact)
    app = make_app(MODEL_DIR=str(artifact), MAX_UPLOAD_BYTES=str(MAX_UPLOAD), MAX_IMAGE_PIXELS=str(1 << 20))
    loop = asyncio.new_event_loop()
    lifespan = app.router.lifespan_context(app)
    try:
        loop.run_until_complete(lifespan.__aenter__())
        try:
            yield app, loop
        finally:
            loop.run_until_complete(lifespan.__aexit__(None, None, None))
    finally:
        loop.close()


def test_any_request_gets_200_or_a_documented_4xx(app_loop: tuple[Starlette, asyncio.AbstractEventLoop]) -> None:
    app, loop = app_loop

    @settings(FUZZ, max_examples=150)
    @given(requests())
    def infer(request: tuple[str, bytes, list[int], str | None]) -> None:
        content_type, body, _, _ = request
        status, answer = loop.run_until_complete(asgi_post(app, body, content_type))
        document = json.loads(answer)
        event(str(status))
        if status == 200:
            # One image answers a prediction; several (parts, or JSON "images") answer {"results": [...]}, each a
            # prediction or that image's own error.
            for item in document.get("results", [document]):
                if "error" in item:
                    assert item["error"]["code"] in set().union(*DOCUMENTED.values()), item
                else:
                    assert item["class"] in {"red", "green", "blue", "dark"}, item
        else:
            assert document["error"]["code"] in DOCUMENTED.get(status, set()), (status, document)

    with no_leaks():
        infer()
