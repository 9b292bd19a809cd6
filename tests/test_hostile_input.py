"""What a hostile or careless client sends gets a JSON 4xx from a real server, never a 500 and a traceback.

Each case below was a 500 (an unhandled exception in the app, logged with its traceback; uvicorn then also
dropped the keep-alive connection) until the fix it names. Found by a review that sent odd bytes to every
parser of the service (the notes of issue 12's sixth session)."""

from __future__ import annotations

import base64
import json
import re
import socket
import time
import warnings
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx
import pytest

from tests.helpers import Server, image_bytes

MODEL = "tiny-colour-classifier"
JPEG = image_bytes((200, 10, 10), fmt="JPEG")
B64 = base64.b64encode(JPEG).decode()
PIXELS = 8 * 8 * 3  # the tiny model's (8, 8, 3) input


def _multipart(part_name: bytes, charset: str, body: bytes = b"x", filename: bytes = b"") -> tuple[bytes, str]:
    disposition = b'form-data; name="' + part_name + b'"' + (b'; filename="' + filename + b'"' if filename else b"")
    content = b"--B\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + body + b"\r\n--B--\r\n"
    return content, f"multipart/form-data; boundary=B; charset={charset}"


def _infer(server: Server, content: bytes, content_type: str, query: str = "", **headers: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/infer{query}", content=content, headers={"content-type": content_type, **headers}, timeout=30
    )


def _oip(server: Server, document: object, binary: bytes = b"") -> httpx.Response:
    header = json.dumps(document).encode() if not isinstance(document, bytes) else document
    headers = {"Inference-Header-Content-Length": str(len(header))} if binary else {}
    return httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=header + binary, headers=headers, timeout=30)


def _image_input(**fields: object) -> dict[str, object]:
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [B64]}], **fields}


def _pixels_input(shape: list[int], data: object = None, binary_size: int | None = None) -> dict[str, object]:
    tensor: dict[str, object] = {"name": "pixels", "datatype": "FP32", "shape": shape}
    if binary_size is not None:
        tensor["parameters"] = {"binary_data_size": binary_size}
    else:
        tensor["data"] = data
    return {"inputs": [tensor]}


NESTED = b"[" * 1000 + b"]" * 1000
HUGE = "9" * 4301  # int() refuses more than 4300 digits


def _oip_with_length(server: Server, declared: str) -> httpx.Response:
    body = json.dumps(_image_input()).encode()
    return httpx.post(
        f"{server.url}/v2/models/{MODEL}/infer", content=body, headers={"Inference-Header-Content-Length": declared}
    )


def _load(server: Server, body: bytes) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/repository/models/{MODEL}/load", content=body, timeout=30)


def _huge_shape(server: Server) -> httpx.Response:
    tensor = f'{{"name": "image", "datatype": "BYTES", "shape": [{HUGE}], "data": ["{B64}"]}}'
    return _oip(server, f'{{"inputs": [{tensor}]}}'.encode())


def _shape_past_int64(server: Server) -> httpx.Response:
    return _oip(server, {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2**64], "data": [B64]}]})


def _shape_that_wraps(server: Server) -> httpx.Response:
    # (2**62 + 1) * 8 * 8 * 3 is 192 in int64: the number of values of one image, whose binary data is sent.
    return _oip(server, _pixels_input([2**62 + 1, 8, 8, 3], binary_size=PIXELS * 4), b"\0" * PIXELS * 4)


def _pixel_past_float64(server: Server) -> httpx.Response:
    values = b", ".join([b"1" + b"0" * 400] + [b"0"] * (PIXELS - 1))
    tensor = b'{"name": "pixels", "datatype": "FP32", "shape": [1, 8, 8, 3], "data": [' + values + b"]}"
    return _oip(server, b'{"inputs": [' + tensor + b"]}")


def _surrogate_id(server: Server) -> httpx.Response:
    return _oip(server, b'{"id": "\\ud800", ' + json.dumps(_image_input())[1:].encode())


def _gzip(server: Server) -> httpx.Response:
    return _infer(server, JPEG, "image/jpeg", **{"content-encoding": "gzip"})


# (what, the request, the status it gets); each was a 500
CASES: list[tuple[str, Callable[[Server], httpx.Response], int]] = [
    # a multipart charset naming a codec that raises UnicodeError (payload._from_multipart)
    ("charset=undefined", lambda s: _infer(s, *_multipart(b"image", "undefined", JPEG, b"a.jpg")), 400),
    ("charset=idna, a value IDNA refuses", lambda s: _infer(s, *_multipart(b"f", "idna", b"xn--a-")), 400),
    ("charset=punycode, a name with a dot", lambda s: _infer(s, *_multipart(b"a.b", "punycode")), 400),
    # a part name that decodes to a lone surrogate, quoted in the error (errors.ErrorJSON)
    ("a part name that is a lone surrogate", lambda s: _infer(s, *_multipart(b"+2AA-", "utf-7")), 422),
    # numbers past int()'s 4300 digits (payload.decimal, payload.parse_json)
    ("top_k of 4301 digits", lambda s: _infer(s, JPEG, "image/jpeg", f"?top_k={HUGE}"), 422),
    ("a JSON integer of 4301 digits", lambda s: _infer(s, f'{{"image": {HUGE}}}'.encode(), "application/json"), 422),
    ("an OIP header length of 4301 digits", lambda s: _oip_with_length(s, HUGE), 400),
    ("an OIP shape of 4301 digits", _huge_shape, 400),
    # JSON nested past the interpreter's recursion limit (payload.parse_json)
    ("JSON nested 1000 deep on /infer", lambda s: _infer(s, NESTED, "application/json"), 422),
    ("JSON nested 1000 deep on OIP infer", lambda s: _oip(s, NESTED), 400),
    ("JSON nested 1000 deep on OIP load", lambda s: _load(s, NESTED), 400),
    # OIP shapes past int64 (oip._count)
    ("an OIP shape of 2**64", _shape_past_int64, 400),
    ("an OIP shape whose int64 product wraps round", _shape_that_wraps, 400),
    # a pixel value past float64 (oip._pixels)
    ("a pixel value of 10**400", _pixel_past_float64, 400),
    # client text sent back in the answer (oip._parse) or in an error (errors.ErrorJSON)
    ("an OIP id that is a lone surrogate", _surrogate_id, 400),
    ("load parameters named with a lone surrogate", lambda s: _load(s, b'{"parameters": {"file:\\ud800": 1}}'), 400),
    # a compressed body (payload.check_identity_encoding): /infer read it as the image; OIP answered 415 already
    ("Content-Encoding: gzip on /infer", _gzip, 415),
]


@pytest.mark.parametrize(("what", "send", "status"), CASES, ids=[case[0] for case in CASES])
def test_is_a_json_4xx(tiny_server: Server, what: str, send: Callable[[Server], httpx.Response], status: int) -> None:
    answer = send(tiny_server)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    error = answer.json()["error"]
    assert isinstance(error, str if "/v2/" in str(answer.url) else dict), error


def test_error_messages_quote_lone_surrogates_as_json_escapes(tiny_server: Server) -> None:
    answer = _infer(tiny_server, *_multipart(b"+2AA-", "utf-7"))  # the part's name decodes to "\ud800"
    assert answer.status_code == 422
    assert rb"parts received: \ud800" in answer.content and answer.content.isascii()


def test_an_out_of_range_pixel_value_is_refused_without_a_warning(tiny_server: Server) -> None:
    values = ", ".join(["1e39"] + ["0"] * (PIXELS - 1))
    document = f'{{"inputs": [{{"name": "pixels", "datatype": "FP32", "shape": [1, 8, 8, 3], "data": [{values}]}}]}}'
    answer = _oip(tiny_server, document.encode())
    assert answer.status_code == 400 and "NaN or infinite" in answer.json()["error"]
    assert "RuntimeWarning" not in tiny_server.output()


def test_the_load_endpoints_413_names_its_own_limit(tiny_server: Server) -> None:
    answer = httpx.post(f"{tiny_server.url}/v2/repository/models/{MODEL}/load", content=b" " * (65 * 1024))
    assert answer.status_code == 413
    assert "the limit of a load request" in answer.json()["error"] and "MAX_UPLOAD_BYTES" not in answer.text


def _requests_by_status(server: Server, route: str) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics").text
    pattern = rf'^http_requests_total\{{route="{re.escape(route)}",status="(\d+)"\}} (\S+)$'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text, re.MULTILINE)}


@pytest.mark.parametrize("content_type", ["image/jpeg", "multipart/form-data; boundary=B"])
def test_a_client_that_hangs_up_inside_its_body_is_a_499_not_a_500(tiny_server: Server, content_type: str) -> None:
    before = _requests_by_status(tiny_server, "/infer")
    url = urlsplit(tiny_server.url)
    head = f"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: 100000\r\n\r\n"
    with socket.create_connection((url.hostname, url.port)) as sock:
        part = b'--B\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
        sock.sendall(head.encode() + (part if content_type.startswith("multipart") else b"") + JPEG[:100])
        time.sleep(0.2)  # the body is being read when the client goes
    deadline = time.monotonic() + 10
    while (after := _requests_by_status(tiny_server, "/infer")) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    grown = {status: after[status] - before.get(status, 0) for status in after if after[status] != before.get(status)}
    assert grown == {"499": 1}, (grown, tiny_server.output()[-3000:])


NOT_HTTP = {
    "not HTTP at all": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS hello on the plain port
    "a header line without a colon": b"GET /ping HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    "a broken chunk size": b"POST /infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
}


@pytest.mark.parametrize("raw", NOT_HTTP.values(), ids=NOT_HTTP.keys())
def test_bytes_that_are_not_http_get_a_json_400(tiny_server: Server, raw: bytes) -> None:
    # They never reach the app; uvicorn answered them in plain text (service/protocol.py).
    url = urlsplit(tiny_server.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(raw)
        answer = b""
        while chunk := sock.recv(65536):  # the server closes the connection after its answer
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("ascii").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    assert lines[0] == "HTTP/1.1 400 Bad Request", answer
    assert headers["content-type"] == "application/json" and int(headers["content-length"]) == len(body), answer
    assert json.loads(body)["error"]["code"] == "malformed_http", body
    assert "server" not in headers and httpx.get(f"{tiny_server.url}/ping").status_code == 200


def test_the_server_logged_no_traceback(tiny_server: Server) -> None:
    # Last in this module: every case above went to this server (its own, module-scoped).
    with warnings.catch_warnings():
        assert "Traceback" not in tiny_server.output(), tiny_server.output()[-5000:]
