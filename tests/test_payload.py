"""Where /infer finds the image, in-process: every accepted form, every refusal, and the body limits to the byte.

The real app with a real tiny onnxruntime model, driven over ASGI (no socket): fast enough to run once per
mutant (docs/security.md, "Mutation testing"). tests/test_http.py checks the same contract over real HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette

from service.errors import EmptyImage, InvalidBase64
from service.model import Classifier
from service.payload import decode_base64
from tests.helpers import asgi_post, image_bytes, make_app, post_scope, serving

LIMIT = 3000  # MAX_UPLOAD_BYTES for these tests
FRAMING = 64 * 1024  # room the service allows for multipart and JSON framing around an image
RED, BLUE = image_bytes((255, 0, 0)), image_bytes((0, 0, 255))
TOO_LARGE = f"the upload is larger than {LIMIT:,} bytes (MAX_UPLOAD_BYTES)"


@pytest.fixture(scope="module")
def classifier(tiny_artifact: Path) -> Classifier:
    return Classifier.load(tiny_artifact, 1, warm=True)


@pytest.fixture
def app(classifier: Classifier) -> Starlette:
    return make_app(classifier, MAX_UPLOAD_BYTES=str(LIMIT))


def _send(app: Starlette, **request: object) -> httpx.Response:
    async def scenario() -> httpx.Response:
        async with serving(app) as client:
            return await client.post("/infer", **request)  # type: ignore[arg-type]

    return asyncio.run(scenario())


def _raw(app: Starlette, body: bytes, content_type: str, content_length: int | None = None) -> tuple[int, dict]:
    async def scenario() -> tuple[int, bytes]:
        async with serving(app):
            return await asgi_post(app, body, content_type, content_length=content_length)

    status, answer = asyncio.run(scenario())
    return status, json.loads(answer)


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    return str(error["message"])


def _multipart(*parts: tuple[str, bytes, str | None]) -> tuple[bytes, str]:
    body = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        body += b"--XyZ\r\nContent-Disposition: " + disposition.encode() + b"\r\n\r\n" + value + b"\r\n"
    return body + b"--XyZ--\r\n", "multipart/form-data; boundary=XyZ"


# --- accepted forms ---


def test_multipart_image_file_and_field_aliases(app: Starlette) -> None:
    assert _send(app, files={"image": ("a.png", RED, "image/png")}).json()["class"] == "red"
    assert _send(app, files={"file": ("b.png", BLUE, "application/octet-stream")}).json()["class"] == "blue"
    # `image` is looked for first.
    assert _send(app, files=[("file", ("b.png", BLUE)), ("image", ("a.png", RED))]).json()["class"] == "red"
    body, content_type = _multipart(("image", base64.b64encode(BLUE), None))  # a text field holding base64
    assert _send(app, content=body, headers={"content-type": content_type}).json()["class"] == "blue"
    body, content_type = _multipart(("file", base64.b64encode(RED), None))
    assert _send(app, content=body, headers={"content-type": content_type}).json()["class"] == "red"


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "Application/JSON", "application/problem+json"],
)
def test_json_base64_under_json_content_types(app: Starlette, content_type: str) -> None:
    body = json.dumps({"image": base64.b64encode(RED).decode()}).encode()
    assert _send(app, content=body, headers={"content-type": content_type}).json()["class"] == "red"


@pytest.mark.parametrize("content_type", ["image/png", "image/jpeg", "image/x-anything", "application/octet-stream"])
def test_raw_bodies(app: Starlette, content_type: str) -> None:
    assert _send(app, content=BLUE, headers={"content-type": content_type}).json()["class"] == "blue"


def test_base64_forms() -> None:
    data = bytes(range(256)) * 3  # standard base64 of this has both "+" and "/"
    standard = base64.b64encode(data).decode()
    assert "+" in standard and "/" in standard
    assert decode_base64(standard) == data
    assert decode_base64(base64.urlsafe_b64encode(data).decode()) == data
    assert decode_base64(base64.encodebytes(data).decode()) == data  # line breaks every 76 characters
    assert decode_base64("  " + standard[:40] + "\r\n\t" + standard[40:] + "\n") == data
    assert decode_base64("data:application/octet-stream;base64," + standard) == data
    assert decode_base64("data:image/png;base64,AAEC") == b"\x00\x01\x02"
    assert decode_base64("QUJD") == b"ABC"
    # URL-safe text with only one of its two letters: either alone marks the alphabet.
    assert decode_base64("--8=") == b"\xfb\xef" and decode_base64("__8=") == b"\xff\xff"
    assert decode_base64("++8=") == b"\xfb\xef" and decode_base64("//8=") == b"\xff\xff"


@pytest.mark.parametrize("text", ["", "   ", "\n\n", "data:image/png;base64,", "data:image/png;base64, \n", "data:x"])
def test_empty_base64(text: str) -> None:
    with pytest.raises(EmptyImage) as caught:
        decode_base64(text)
    assert caught.value.message == "the base64 image is empty"


@pytest.mark.parametrize("text", ["QUJ", "QUJD!", "not base64 !!", "QU=D", "QUJD-+", "é"])
def test_invalid_base64(text: str) -> None:
    with pytest.raises(InvalidBase64) as caught:
        decode_base64(text)
    assert caught.value.message == "`image` is not valid base64"


# --- refusals ---


@pytest.mark.parametrize(
    ("content_type", "shown"),
    [("text/plain", "'text/plain'"), ("", "'none'"), ("application/xml; charset=x", "'application/xml'")],
)
def test_unsupported_media_types(app: Starlette, content_type: str, shown: str) -> None:
    headers = {"content-type": content_type} if content_type else {}
    message = _error(_send(app, content=b"hello", headers=headers), 415, "unsupported_media_type")
    assert message == (
        f"content type {shown} cannot carry an image; send multipart/form-data with an `image` field, "
        'JSON {"image": "<base64>"}, or the raw bytes as image/* or application/octet-stream'
    ), message


def test_multipart_refusals(app: Starlette) -> None:
    message = _error(_send(app, files={"picture": RED}, data={"note": "x"}), 422, "missing_image")
    assert message == "the multipart body has no `image` (or `file`) part; parts received: note, picture"
    body, content_type = _multipart()
    message = _error(_send(app, content=body, headers={"content-type": content_type}), 422, "missing_image")
    assert message.endswith("parts received: none"), message
    bad = _send(app, content=b"--x\r\n", headers={"content-type": "multipart/form-data"})  # no boundary
    assert _error(bad, 400, "malformed_body").startswith("malformed multipart body: ")
    body, content_type = _multipart(("image", RED, None))  # binary bytes in a text field
    _error(_send(app, content=body, headers={"content-type": content_type}), 422, "invalid_base64")
    _error(_send(app, files={"image": ("a.png", b"", "image/png")}), 400, "empty_image")


@pytest.mark.parametrize(
    ("body", "status", "code", "message"),
    [
        (b"{nope", 422, "missing_image", 'the JSON body is not valid JSON; send {"image": "<base64>"}'),
        (b'{"image": "\xff"}', 422, "missing_image", 'the JSON body is not valid JSON; send {"image": "<base64>"}'),
        (b"[1, 2]", 422, "missing_image", 'the JSON body has no base64 string under key "image"'),
        (b'"QUJD"', 422, "missing_image", 'the JSON body has no base64 string under key "image"'),
        (b'{"image": 42}', 422, "missing_image", 'the JSON body has no base64 string under key "image"'),
        (b'{"picture": "QUJD"}', 422, "missing_image", 'the JSON body has no base64 string under key "image"'),
        (b'{"image": "QUJ"}', 422, "invalid_base64", "`image` is not valid base64"),
        (b'{"image": ""}', 400, "empty_image", "the base64 image is empty"),
        (b'{"image": "QUJD"}', 400, "invalid_image", None),
    ],
)
def test_json_refusals(app: Starlette, body: bytes, status: int, code: str, message: str | None) -> None:
    got = _error(_send(app, content=body, headers={"content-type": "application/json"}), status, code)
    assert message is None or got == message, got


def test_an_empty_raw_body(app: Starlette) -> None:
    message = _error(_send(app, content=b"", headers={"content-type": "image/png"}), 400, "empty_image")
    assert message == "the image is empty (0 bytes)"


# --- the limits, to the byte ---


def test_raw_body_limit_is_max_upload_bytes(app: Starlette) -> None:
    at_limit = b"\x89" * LIMIT
    _error(_send(app, content=at_limit, headers={"content-type": "image/png"}), 400, "invalid_image")
    over = _send(app, content=at_limit + b"\x89", headers={"content-type": "image/png"})
    assert _error(over, 413, "payload_too_large") == TOO_LARGE


def _padded_json(total: int) -> bytes:
    head = b'{"image": "' + base64.b64encode(RED) + b'", "pad": "'
    return head + b"x" * (total - len(head) - 2) + b'"}'


def test_json_body_limit_allows_base64_and_framing(app: Starlette) -> None:
    body_limit = (LIMIT * 4 + 2) // 3 + FRAMING
    at_limit = _padded_json(body_limit)
    assert len(at_limit) == body_limit
    assert _send(app, content=at_limit, headers={"content-type": "application/json"}).json()["class"] == "red"
    over = _send(app, content=_padded_json(body_limit + 1), headers={"content-type": "application/json"})
    assert _error(over, 413, "payload_too_large") == TOO_LARGE


def _padded_multipart(total: int) -> tuple[bytes, str]:
    body, content_type = _multipart(("image", RED, "red.png"), ("pad", b"", None))
    fill = total - len(body)
    body, content_type = _multipart(("image", RED, "red.png"), ("pad", b"x" * fill, None))
    assert len(body) == total
    return body, content_type


def test_multipart_body_limit_allows_framing(app: Starlette) -> None:
    body_limit = LIMIT + FRAMING
    body, content_type = _padded_multipart(body_limit)
    assert _send(app, content=body, headers={"content-type": content_type}).json()["class"] == "red"
    body, content_type = _padded_multipart(body_limit + 1)
    assert _error(_send(app, content=body, headers={"content-type": content_type}), 413, "payload_too_large")


def test_a_base64_text_part_over_starlettes_default_part_size_is_read(classifier: Classifier) -> None:
    # Starlette refuses a text part over 1 MiB unless told otherwise; base64 of an image up to MAX_UPLOAD_BYTES
    # sent as a text field must get through like a file part.
    app = make_app(classifier, MAX_UPLOAD_BYTES=str(2 << 20))
    text = base64.b64encode(b"\x89" * (3 << 19))  # 1.5 MiB of bytes, 2 MiB of base64
    body, content_type = _multipart(("image", text, None))
    # Read whole and decoded, then refused as an image, not as a malformed body.
    _error(_send(app, content=body, headers={"content-type": content_type}), 400, "invalid_image")


@pytest.mark.parametrize("content_type", ["image/jpeg", "application/json", "multipart/form-data; boundary=XyZ"])
def test_a_declared_length_over_the_limit_is_refused_before_reading(app: Starlette, content_type: str) -> None:
    # The body itself is tiny and valid: only the declared Content-Length can be refused.
    status, answer = _raw(app, RED, content_type, content_length=10 * 1024 * 1024)
    assert status == 413 and answer["error"].pop("request_id")
    assert answer["error"] == {"code": "payload_too_large", "message": TOO_LARGE}


def test_a_declared_length_at_the_limit_is_read(app: Starlette) -> None:
    status, answer = _raw(app, RED, "image/png", content_length=LIMIT)
    assert status == 200 and answer["class"] == "red"
    status, _ = _raw(app, RED, "image/png", content_length=LIMIT + 1)
    assert status == 413


def test_the_image_is_checked_against_the_limit_after_reading(app: Starlette) -> None:
    over = b"\x00" * (LIMIT + 1)  # within the JSON and multipart body limits, over MAX_UPLOAD_BYTES itself
    message = _error(_send(app, json={"image": base64.b64encode(over).decode()}), 413, "payload_too_large")
    assert message == TOO_LARGE
    assert _error(_send(app, files={"image": ("x.png", over)}), 413, "payload_too_large") == TOO_LARGE
    exact = b"\x00" * LIMIT  # exactly the limit: read, then refused as an image, not as too large
    _error(_send(app, json={"image": base64.b64encode(exact).decode()}), 400, "invalid_image")
    _error(_send(app, files={"image": ("x.png", exact)}), 400, "invalid_image")


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/infer", "image/jpeg"),
        ("/infer", "application/json"),
        ("/infer", "multipart/form-data; boundary=XyZ"),
        ("/v2/models/tiny-colour-classifier/infer", "application/json"),
    ],
)
def test_a_streamed_body_is_refused_once_it_passes_the_limit(
    classifier: Classifier, path: str, content_type: str
) -> None:
    """No Content-Length: the service counts chunks as they come and stops reading at the limit."""
    # Nothing read and dropped after the answer (MAX_DISCARD_BYTES=0), so what was taken is what the app read.
    app = make_app(classifier, MAX_UPLOAD_BYTES=str(LIMIT), MAX_DISCARD_BYTES="0")
    body_limit = {"image/jpeg": LIMIT, "application/json": (LIMIT * 4 + 2) // 3 + FRAMING}.get(
        content_type, LIMIT + FRAMING
    )
    chunk = b"\x00" * 500
    offered = body_limit // 500 + 20  # 10,000 bytes past the body limit
    taken = 0

    # A multipart body opens a file part first, then streams its bytes.
    opening = b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="a"\r\n\r\n'
    first = opening + chunk[len(opening) :] if content_type.startswith("multipart/") else chunk

    async def receive() -> dict[str, object]:
        nonlocal taken
        taken += 1
        return {"type": "http.request", "body": first if taken == 1 else chunk, "more_body": taken < offered}

    answer: dict[str, object] = {}

    async def send(message: dict[str, object]) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        elif message["type"] == "http.response.body":
            answer["body"] = answer.get("body", b"") + message.get("body", b"")  # type: ignore[operator]

    scope = post_scope(path, [(b"content-type", content_type.encode()), (b"transfer-encoding", b"chunked")])

    async def scenario() -> None:
        async with serving(app):
            await app(scope, receive, send)  # type: ignore[arg-type]

    asyncio.run(scenario())
    assert answer["status"] == 413
    assert TOO_LARGE.encode() in answer["body"]  # type: ignore[operator]
    # The app stopped at the first chunk past the body limit; the guard may take one more to look.
    first_past = body_limit // 500 + 1
    assert first_past <= taken <= first_past + 1, taken


# --- several images in one request ---


@pytest.fixture
def app3(classifier: Classifier) -> Starlette:
    return make_app(classifier, MAX_UPLOAD_BYTES=str(LIMIT), MAX_IMAGES_PER_REQUEST="3")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_json_images_list_is_answered_in_order_with_errors_in_place(app3: Starlette) -> None:
    body = _send(app3, json={"images": [_b64(RED), 7, _b64(BLUE)]}).json()
    assert set(body) == {"results"}
    first, bad, last = body["results"]
    assert first["class"] == "red" and last["class"] == "blue"
    assert bad == {"error": {"code": "invalid_base64", "message": "images[1] is not a base64 string"}}
    one = _send(app3, json={"images": [_b64(BLUE)]}).json()  # a list of one is still answered as a list
    assert [r["class"] for r in one["results"]] == ["blue"]
    errors = _send(app3, json={"images": ["QUJ", "", _b64(b"\0" * (LIMIT + 1))]}).json()["results"]
    assert [e["error"]["code"] for e in errors] == ["invalid_base64", "empty_image", "payload_too_large"]


def test_image_takes_precedence_over_images(app3: Starlette) -> None:
    body = _send(app3, json={"image": _b64(RED), "images": [_b64(BLUE), _b64(BLUE)]}).json()
    assert body["class"] == "red" and "results" not in body


@pytest.mark.parametrize("listed", [[], "QUJD", {"a": 1}, None])
def test_images_must_be_a_non_empty_list(app3: Starlette, listed: object) -> None:
    message = _error(_send(app3, json={"images": listed}), 422, "missing_image")
    assert message == '"images" must be a non-empty list of base64 strings'


def test_more_images_than_allowed(app3: Starlette) -> None:
    assert len(_send(app3, json={"images": [_b64(RED)] * 3}).json()["results"]) == 3
    message = _error(_send(app3, json={"images": [_b64(RED)] * 4}), 413, "payload_too_large")
    assert message == "4 images in one request; the limit is 3 (MAX_IMAGES_PER_REQUEST)"
    # Four `image` parts as base64 text fields: within the parser's part limits, over the image limit.
    body, content_type = _multipart(*[("image", base64.b64encode(RED), None)] * 4)
    message = _error(_send(app3, content=body, headers={"content-type": content_type}), 413, "payload_too_large")
    assert message == "4 images in one request; the limit is 3 (MAX_IMAGES_PER_REQUEST)"
    body, content_type = _multipart(*[("image", base64.b64encode(RED), None)] * 3)
    assert len(_send(app3, content=body, headers={"content-type": content_type}).json()["results"]) == 3


def test_several_multipart_parts(app3: Starlette) -> None:
    parts = [("file", ("a.png", BLUE, "image/png")), ("file", ("b.png", RED, "image/png"))]
    assert [r["class"] for r in _send(app3, files=parts).json()["results"]] == ["blue", "red"]
    body, content_type = _multipart(("image", RED, "a.png"), ("image", b"QUJD", None), ("image", b"", "c.png"))
    results = _send(app3, content=body, headers={"content-type": content_type}).json()["results"]
    assert results[0]["class"] == "red"
    assert results[1]["error"]["code"] == "invalid_image" and results[2]["error"]["code"] == "empty_image"


def test_too_many_multipart_parts_is_413(app3: Starlette) -> None:
    files = [(f"extra{i}", (f"{i}.png", RED, "image/png")) for i in range(4)]  # max_files is max(3, 2)
    message = _error(_send(app3, files=files), 413, "payload_too_large")
    assert message.startswith("more parts than MAX_IMAGES_PER_REQUEST (3) allows: Too many files"), message
    fields = {f"note{i}": "x" for i in range(20)}  # max_fields is 3 + 16
    message = _error(_send(app3, files={"image": RED}, data=fields), 413, "payload_too_large")
    assert message.startswith("more parts than MAX_IMAGES_PER_REQUEST (3) allows: Too many fields"), message
    fields = {f"note{i}": "x" for i in range(19)}
    assert _send(app3, files={"image": RED}, data=fields).json()["class"] == "red"


# --- the Open Inference Protocol reads its body through the same limits ---

OIP_INFER = "/v2/models/tiny-colour-classifier/infer"


def test_oip_body_limits(app: Starlette) -> None:
    body_limit = (LIMIT * 4 + 2) // 3 + FRAMING

    async def scenario() -> list[tuple[int, bytes]]:
        async with serving(app):
            return [
                await asgi_post(app, b"{}", "application/json", path=OIP_INFER, content_length=body_limit + 1),
                await asgi_post(app, b" " * (body_limit + 1), "application/json", path=OIP_INFER),
                await asgi_post(app, b" " * body_limit + b"{", "application/json", path=OIP_INFER),
                await asgi_post(app, b"{" + b" " * (body_limit - 1), "application/json", path=OIP_INFER),
            ]

    declared, streamed, over, at_limit = asyncio.run(scenario())
    for status, answer in (declared, streamed, over):
        assert status == 413 and TOO_LARGE.encode() in answer, answer
    assert at_limit[0] == 400, at_limit  # read whole, then refused as JSON
