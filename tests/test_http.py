"""The HTTP contract, over real HTTP against a real `python -m service` serving a tiny real ONNX model."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import time
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import Server, image_bytes, running_service, write_tiny_artifact

RED = image_bytes((255, 0, 0))
GREEN_JPEG = image_bytes((0, 200, 0), fmt="JPEG")


def _error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def test_home_keeps_the_seed_status_and_describes_the_model(tiny_server: Server) -> None:
    body = httpx.get(f"{tiny_server.url}/").json()
    assert body["status"] == "The car classification service is running!"
    assert body["model"]["name"] == "tiny-colour-classifier"
    assert body["model"]["trained"] is True
    assert body["model"]["classes"] == 4
    assert "warning" not in body


def test_ping_is_exactly_pong(tiny_server: Server) -> None:
    response = httpx.get(f"{tiny_server.url}/ping")
    assert response.status_code == 200
    assert response.json() == {"message": "pong"}


def test_infer_multipart_image_field_like_the_original_clients(tiny_server: Server) -> None:
    response = httpx.post(f"{tiny_server.url}/infer", files={"image": ("car.png", RED, "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["class"] == "red"
    assert 0.5 < body["score"] <= 1.0
    assert set(body) == {"class", "score"}  # a trained model's answer carries no warning


def test_infer_multipart_file_alias(tiny_server: Server) -> None:
    response = httpx.post(f"{tiny_server.url}/infer", files={"file": ("x", GREEN_JPEG, "application/octet-stream")})
    assert response.json()["class"] == "green"


def _multipart(name: str, value: bytes, filename: str | None) -> tuple[bytes, dict[str, str]]:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    body = b"--b0undary\r\nContent-Disposition: " + disposition.encode() + b"\r\n\r\n" + value + b"\r\n--b0undary--\r\n"
    return body, {"content-type": "multipart/form-data; boundary=b0undary"}


def test_a_part_without_filename_is_a_text_field_read_as_base64(tiny_server: Server) -> None:
    # Without a filename a multipart part is a form field, not a file: its text must be base64.
    body, headers = _multipart("image", base64.b64encode(GREEN_JPEG), None)
    assert httpx.post(f"{tiny_server.url}/infer", content=body, headers=headers).json()["class"] == "green"
    body, headers = _multipart("file", GREEN_JPEG, None)  # raw bytes sent as a field
    _error(httpx.post(f"{tiny_server.url}/infer", content=body, headers=headers), 422, "invalid_base64")
    body, headers = _multipart("image", GREEN_JPEG, "car.jpg")  # the same bytes as a file part
    assert httpx.post(f"{tiny_server.url}/infer", content=body, headers=headers).json()["class"] == "green"


def test_infer_json_base64(tiny_server: Server) -> None:
    blue = image_bytes((0, 0, 255), fmt="WEBP")
    response = httpx.post(f"{tiny_server.url}/infer", json={"image": base64.b64encode(blue).decode()})
    assert response.json()["class"] == "blue"
    data_url = "data:image/webp;base64," + base64.b64encode(blue).decode()
    assert httpx.post(f"{tiny_server.url}/infer", json={"image": data_url}).json()["class"] == "blue"


def test_infer_raw_body(tiny_server: Server) -> None:
    dark = image_bytes((5, 5, 5), fmt="BMP")
    for content_type in ("image/bmp", "application/octet-stream", "image/jpeg"):  # format comes from the bytes
        response = httpx.post(f"{tiny_server.url}/infer", content=dark, headers={"content-type": content_type})
        assert response.json()["class"] == "dark", content_type


def test_top_k_is_sorted_and_bounded(tiny_server: Server) -> None:
    response = httpx.post(f"{tiny_server.url}/infer?top_k=3", files={"image": RED})
    body = response.json()
    assert body["class"] == "red"
    scores = [item["score"] for item in body["top_k"]]
    assert len(body["top_k"]) == 3
    assert scores == sorted(scores, reverse=True)
    assert body["top_k"][0] == {"class": body["class"], "score": body["score"]}
    # More than there are classes: all of them, summing to one.
    all_classes = httpx.post(f"{tiny_server.url}/infer?top_k=20", files={"image": RED}).json()["top_k"]
    assert sorted(i["class"] for i in all_classes) == ["blue", "dark", "green", "red"]
    assert sum(i["score"] for i in all_classes) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("value", ["0", "21", "-1", "two", ""])
def test_top_k_out_of_range_is_422(tiny_server: Server, value: str) -> None:
    _error(httpx.post(f"{tiny_server.url}/infer?top_k={value}", files={"image": RED}), 422, "invalid_parameter")


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"this is not an image", "invalid_image"),
        (RED[: len(RED) // 2], "invalid_image"),  # truncated PNG
        (GREEN_JPEG[:200], "invalid_image"),  # truncated JPEG
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "invalid_image"),  # corrupt header
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "invalid_image"),  # a format we refuse to open
    ],
)
def test_bad_image_bytes_are_400(tiny_server: Server, payload: bytes, code: str) -> None:
    _error(httpx.post(f"{tiny_server.url}/infer", files={"image": ("x.jpg", payload, "image/jpeg")}), 400, code)


def test_empty_image_is_400(tiny_server: Server) -> None:
    _error(httpx.post(f"{tiny_server.url}/infer", files={"image": ("x.jpg", b"", "image/jpeg")}), 400, "empty_image")
    _error(
        httpx.post(f"{tiny_server.url}/infer", content=b"", headers={"content-type": "image/png"}), 400, "empty_image"
    )


def test_decompression_bomb_is_refused_from_the_header(tiny_server: Server) -> None:
    # 1200x1200 = 1.44 MP > the 1 MP limit this server runs with; a flat PNG compresses to a few KB.
    bomb = image_bytes(0, size=(1200, 1200), mode="L")
    assert len(bomb) < 50_000
    _error(httpx.post(f"{tiny_server.url}/infer", files={"image": bomb}), 413, "image_too_large")


def test_an_image_too_costly_to_decode_is_refused_and_a_jpeg_of_its_size_is_not(tiny_server: Server) -> None:
    # 800x800 = 0.64 MP, under the 1 MP limit, but 2.4 MiB decoded whole (a PNG) against the 2 MiB this server
    # allows; a JPEG of the same size is decoded reduced for the tiny model's input and costs a few KiB.
    png = image_bytes((10, 200, 30), size=(800, 800))
    assert len(png) < 10_000
    refused = httpx.post(f"{tiny_server.url}/infer", files={"image": png})
    _error(refused, 413, "image_too_large")
    assert "MAX_DECODE_BYTES" in refused.json()["error"]["message"]
    jpeg = image_bytes((10, 200, 30), size=(800, 800), fmt="JPEG")
    assert httpx.post(f"{tiny_server.url}/infer", files={"image": jpeg}).status_code == 200


def test_upload_over_limit_is_413(tiny_server: Server) -> None:
    big = b"\xff\xd8" + b"\x00" * (3 * 1024 * 1024)
    _error(
        httpx.post(f"{tiny_server.url}/infer", content=big, headers={"content-type": "image/jpeg"}),
        413,
        "payload_too_large",
    )
    _error(httpx.post(f"{tiny_server.url}/infer", files={"image": big}), 413, "payload_too_large")
    _error(
        httpx.post(f"{tiny_server.url}/infer", json={"image": base64.b64encode(big).decode()}), 413, "payload_too_large"
    )


def _raw_request(server: Server, head: bytes, body_chunks: int, chunk: bytes) -> tuple[bytes, int]:
    """Send `head`, then body chunks until the server answers; return the answer and the chunks sent."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head)
        sent = 0
        pending = b""  # a non-blocking send may take part of a chunk: the rest goes first next time
        sock.setblocking(False)
        answer = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                received = sock.recv(65536)
                answer += received
                if b"\r\n\r\n" in answer or not received:
                    break
            except BlockingIOError:
                pass
            if not pending and sent < body_chunks:
                pending, sent = chunk, sent + 1
            if pending:
                with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
                    pending = pending[sock.send(pending) :]
            else:
                time.sleep(0.01)
        return answer, sent


def test_oversized_declared_length_is_refused_from_the_header(tiny_server: Server) -> None:
    # Not one byte of the body is sent: only a check of Content-Length can answer. A check made while or after
    # the body streams in would wait for it (and end in 408 or the test's own deadline), not answer 413.
    for content_type in ("image/jpeg", "application/json", "multipart/form-data; boundary=x"):
        declared = 104857600
        head = (
            f"POST /infer HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\nContent-Length: {declared}\r\n\r\n"
        ).encode()
        answer, _ = _raw_request(tiny_server, head, body_chunks=0, chunk=b"")
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b'"code":"payload_too_large"' in answer and b"2,097,152 bytes" in answer, answer


def test_the_size_is_checked_again_once_the_image_is_read(tiny_server: Server) -> None:
    # Within the body limits (base64 and multipart framing are allowed for), yet the image itself is over
    # MAX_UPLOAD_BYTES (2 MiB here): only the check after reading can refuse these. Without it, 400 invalid_image.
    over = b"\x00" * (2 * 1024 * 1024 + 1000)
    as_json = httpx.post(f"{tiny_server.url}/infer", json={"image": base64.b64encode(over).decode()})
    assert "2,097,152 bytes" in as_json.json()["error"]["message"]
    _error(as_json, 413, "payload_too_large")
    _error(httpx.post(f"{tiny_server.url}/infer", files={"image": over}), 413, "payload_too_large")


def test_oversized_streamed_body_is_refused_while_it_streams(tiny_server: Server) -> None:
    # Chunked upload, no Content-Length: the server can only count. 2 MiB limit, 64 KiB chunks, 100 MiB offered.
    # Past the limit the server reads and drops up to MAX_DISCARD_BYTES (4 MiB here) so the client can read the
    # 413, then closes: a server that buffered the whole body first would take all 1600 chunks.
    chunk = b"10000\r\n" + b"\x00" * 0x10000 + b"\r\n"
    head = b"POST /infer HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer, sent = _raw_request(tiny_server, head, body_chunks=1600, chunk=chunk)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 1600, "the server answered only after the whole body was sent"


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "application/x-www-form-urlencoded", ""])
def test_content_types_that_cannot_carry_an_image_are_415(tiny_server: Server, content_type: str) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = httpx.post(f"{tiny_server.url}/infer", content=b"hello", headers=headers)
    _error(response, 415, "unsupported_media_type")


def test_multipart_without_image_part_is_422(tiny_server: Server) -> None:
    response = httpx.post(f"{tiny_server.url}/infer", files={"picture": RED}, data={"note": "x"})
    _error(response, 422, "missing_image")
    assert "picture" in response.json()["error"]["message"]


def test_malformed_multipart_is_400(tiny_server: Server) -> None:
    headers = {"content-type": "multipart/form-data"}  # no boundary
    _error(httpx.post(f"{tiny_server.url}/infer", content=b"--x\r\n", headers=headers), 400, "malformed_body")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"picture": "abc"}, "missing_image"),
        ({"image": 42}, "missing_image"),
        ({"image": "not base64 !!"}, "invalid_base64"),
        ({"image": "QUJ"}, "invalid_base64"),  # bad padding
    ],
)
def test_json_without_valid_base64_image_is_422(tiny_server: Server, body: object, code: str) -> None:
    _error(httpx.post(f"{tiny_server.url}/infer", json=body), 422, code)


def test_url_safe_and_line_broken_base64_are_accepted(tiny_server: Server) -> None:
    noisy = np.random.default_rng(3).integers(0, 80, (16, 16, 3), dtype=np.uint8)
    noisy[:, :, 2] += 170  # blue dominates
    buffer = BytesIO()
    Image.fromarray(noisy).save(buffer, format="PNG")
    data = buffer.getvalue()
    standard = base64.b64encode(data).decode()
    url_safe = base64.urlsafe_b64encode(data).decode()
    assert ("+" in standard or "/" in standard) and url_safe != standard
    lines = base64.encodebytes(data).decode()  # MIME style: a line break every 76 characters
    assert lines.count("\n") > 2
    for text in (standard, url_safe, lines, "data:image/png;base64," + url_safe):
        response = httpx.post(f"{tiny_server.url}/infer", json={"image": text})
        assert response.json()["class"] == "blue", (text[:40], response.text)


@pytest.mark.parametrize("content_type", ["application/vnd.api+json", "application/JSON; charset=utf-8"])
def test_json_flavoured_content_types_carry_json(tiny_server: Server, content_type: str) -> None:
    body = json.dumps({"image": base64.b64encode(RED).decode()}).encode()
    response = httpx.post(f"{tiny_server.url}/infer", content=body, headers={"content-type": content_type})
    assert response.json()["class"] == "red", response.text


def test_multipart_with_too_many_parts_is_refused(tiny_server: Server) -> None:
    fields = {f"note{i}": "x" for i in range(80)}
    response = httpx.post(f"{tiny_server.url}/infer", files={"image": RED}, data=fields)
    _error(response, 413, "payload_too_large")
    files = [(f"extra{i}", ("x.png", RED, "image/png")) for i in range(40)]
    _error(
        httpx.post(f"{tiny_server.url}/infer", files=[("image", ("a.png", RED, "image/png")), *files]),
        413,
        "payload_too_large",
    )


def test_an_image_with_no_pixels_is_400(tiny_server: Server) -> None:
    gif = bytearray(image_bytes((1, 2, 3), size=(1, 1), fmt="GIF"))
    gif[6:10] = b"\x00\x00\x00\x00"  # a 0x0 logical screen
    frame = gif.index(b",")
    gif[frame + 5 : frame + 9] = b"\x00\x00\x00\x00"  # and a 0x0 frame
    _error(httpx.post(f"{tiny_server.url}/infer", files={"image": bytes(gif)}), 400, "invalid_image")


def test_json_that_is_not_json_is_422(tiny_server: Server) -> None:
    response = httpx.post(f"{tiny_server.url}/infer", content=b"{nope", headers={"content-type": "application/json"})
    _error(response, 422, "missing_image")


def test_json_base64_of_non_image_is_400(tiny_server: Server) -> None:
    response = httpx.post(f"{tiny_server.url}/infer", json={"image": base64.b64encode(b"plain text").decode()})
    _error(response, 400, "invalid_image")


def test_404_and_405_are_json(tiny_server: Server) -> None:
    _error(httpx.get(f"{tiny_server.url}/nowhere"), 404, "not_found")
    _error(httpx.get(f"{tiny_server.url}/infer"), 405, "method_not_allowed")
    _error(httpx.post(f"{tiny_server.url}/ping"), 405, "method_not_allowed")


def test_server_keeps_serving_after_every_bad_request(tiny_server: Server) -> None:
    bad = [
        httpx.post(f"{tiny_server.url}/infer", content=b"junk", headers={"content-type": "image/png"}),
        httpx.post(f"{tiny_server.url}/infer", json={"image": "%%%"}),
        httpx.post(f"{tiny_server.url}/infer", content=b"x", headers={"content-type": "text/plain"}),
    ]
    assert all(400 <= r.status_code < 500 for r in bad)
    assert httpx.get(f"{tiny_server.url}/ping").json() == {"message": "pong"}
    assert httpx.post(f"{tiny_server.url}/infer", files={"image": RED}).json()["class"] == "red"
    assert tiny_server.process.poll() is None
    assert "Traceback" not in tiny_server.output()


def test_a_logits_model_is_served_as_probabilities(tmp_path: Path) -> None:
    out = tmp_path / "logits"
    write_tiny_artifact(out, logits=True)
    with running_service(out, tmp_path / "server.log") as server:
        body = httpx.post(f"{server.url}/infer?top_k=4", files={"image": RED}).json()
    assert body["class"] == "red"
    assert sum(item["score"] for item in body["top_k"]) == pytest.approx(1.0, abs=1e-5)
    assert all(0.0 <= item["score"] <= 1.0 for item in body["top_k"])
