"""The HTTP contract, over real HTTP against a real `python -m service` serving a tiny real ONNX model."""

from __future__ import annotations

import base64
import socket
import time
from pathlib import Path

import httpx
import pytest

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


def test_infer_multipart_file_alias_and_no_filename(tiny_server: Server) -> None:
    response = httpx.post(f"{tiny_server.url}/infer", files={"file": ("x", GREEN_JPEG, "application/octet-stream")})
    assert response.json()["class"] == "green"


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
        sock.setblocking(False)
        answer = b""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                answer += sock.recv(65536)
                if b"\r\n\r\n" in answer:
                    break
            except BlockingIOError:
                pass
            if sent < body_chunks:
                try:
                    sock.send(chunk)
                    sent += 1
                except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                    pass
            else:
                time.sleep(0.01)
        return answer, sent


def test_oversized_declared_length_is_refused_before_the_body(tiny_server: Server) -> None:
    head = b"POST /infer HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\nContent-Length: 104857600\r\n\r\n"
    answer, sent = _raw_request(tiny_server, head, body_chunks=0, chunk=b"")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent == 0


def test_oversized_streamed_body_is_refused_while_it_streams(tiny_server: Server) -> None:
    # Chunked upload, no Content-Length: the server can only count. 2 MiB limit, 64 KiB chunks, 100 MiB offered.
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
