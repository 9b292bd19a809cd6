"""The Open Inference Protocol (v2 REST), spoken by Triton's own client (tritonclient.http) to a real server.

`python -m service` serves a tiny real ONNX model; every check goes over real HTTP, with the binary tensor
data extension (tritonclient's default) and with plain JSON, and compares with what /infer answers.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service.imaging import preprocess
from service.manifest import Manifest
from tests.helpers import TINY_LABELS, Server, image_bytes, make_app, running_service, serving

MODEL = "tiny-colour-classifier"
KEY = "oip-key-0123"
RED = image_bytes((255, 0, 0))
GREEN = image_bytes((0, 200, 0), fmt="JPEG")
BLUE = image_bytes((0, 0, 255))
DARK = image_bytes((10, 10, 10), fmt="WEBP")
IMAGES = [RED, GREEN, BLUE, DARK]
NOT_AN_IMAGE = b"definitely not an image"


def _client(server: Server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=server.url.removeprefix("http://"))


@pytest.fixture(scope="module")
def client(tiny_server: Server) -> Iterator[triton.InferenceServerClient]:
    c = _client(tiny_server)
    yield c
    c.close()


def _image_input(images: list[bytes], binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    # JSON carries each image as base64 text; binary data carries the files themselves.
    values = images if binary else [base64.b64encode(image) for image in images]
    tensor.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
    return tensor


def _infer_answers(server: Server, images: list[bytes], k: int) -> list[dict[str, Any]]:
    return [httpx.post(f"{server.url}/infer?top_k={k}", files={"image": image}).json() for image in images]


def test_health_and_server_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready("no-such-model") and not client.is_model_ready(MODEL, "2")
    metadata = client.get_server_metadata()
    assert metadata["name"] == "car-classifier"
    assert {"binary_tensor_data", "classification", "model_repository"} <= set(metadata["extensions"])


def test_model_metadata_names_the_manifest_model_and_both_inputs(
    client: triton.InferenceServerClient, tiny_artifact: Path
) -> None:
    metadata = client.get_model_metadata(MODEL)
    assert metadata == client.get_model_metadata(MODEL, "1")
    assert metadata["name"] == Manifest.read(tiny_artifact).name == MODEL
    assert metadata["platform"] == "onnxruntime_onnx" and metadata["versions"] == ["1"]
    assert metadata["inputs"] == [
        {"name": "image", "datatype": "BYTES", "shape": [-1]},
        {"name": "pixels", "datatype": "FP32", "shape": [-1, 8, 8, 3]},
    ]
    assert metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(TINY_LABELS)]}]
    with pytest.raises(InferenceServerException) as missing:
        client.get_model_metadata("no-such-model")
    assert missing.value.status() == "404" and "no-such-model" in missing.value.message()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_several_images_give_the_class_and_score_of_infer(
    client: triton.InferenceServerClient, tiny_server: Server, binary: bool
) -> None:
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=binary)]
    result = client.infer(MODEL, [_image_input(IMAGES, binary)], outputs=outputs, request_id="req-7")
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (4, len(TINY_LABELS))
    response = result.get_response()
    assert response["model_name"] == MODEL and response["model_version"] == "1" and response["id"] == "req-7"
    assert ("binary_data_size" in response["outputs"][0].get("parameters", {})) is binary
    for row, answer in zip(probabilities, _infer_answers(tiny_server, IMAGES, 1), strict=True):
        best = int(np.argmax(row))
        assert (TINY_LABELS[best], float(row[best])) == (answer["class"], answer["score"])


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_the_classification_extension_answers_score_index_label(
    client: triton.InferenceServerClient, tiny_server: Server, binary: bool
) -> None:
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)]
    result = client.infer(MODEL, [_image_input(IMAGES, True)], outputs=outputs)
    top = result.as_numpy("probabilities")
    assert top.shape == (4, 3)
    for row, answer in zip(top, _infer_answers(tiny_server, IMAGES, 3), strict=True):
        fields = [(item.decode() if isinstance(item, bytes) else item).split(":") for item in row]
        assert [label for _, _, label in fields] == [item["class"] for item in answer["top_k"]]
        assert [TINY_LABELS[int(index)] for _, index, _ in fields] == [label for _, _, label in fields]
        for (score, _, _), item in zip(fields, answer["top_k"], strict=True):
            assert float(score) == pytest.approx(item["score"], abs=1e-6)


def test_no_outputs_named_means_every_output_in_binary(client: triton.InferenceServerClient) -> None:
    result = client.infer(MODEL, [_image_input([RED], True)])
    assert result.get_response()["outputs"][0]["parameters"]["binary_data_size"] == 4 * len(TINY_LABELS)
    assert TINY_LABELS[int(np.argmax(result.as_numpy("probabilities")[0]))] == "red"


def test_preprocessed_fp32_pixels_answer_like_the_encoded_image(
    client: triton.InferenceServerClient, tiny_artifact: Path
) -> None:
    spec = Manifest.read(tiny_artifact).preprocessing
    pixels = np.stack([preprocess(image, spec, max_pixels=10**6) for image in IMAGES])
    for binary in (True, False):
        tensor = triton.InferInput("pixels", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels, binary_data=binary)
        from_pixels = client.infer(MODEL, [tensor]).as_numpy("probabilities")
        from_bytes = client.infer(MODEL, [_image_input(IMAGES, True)]).as_numpy("probabilities")
        np.testing.assert_array_equal(from_pixels, from_bytes)


def test_errors_are_the_protocols_shape_with_the_right_status(
    client: triton.InferenceServerClient, tiny_server: Server
) -> None:
    with pytest.raises(InferenceServerException) as bad_image:
        client.infer(MODEL, [_image_input([RED, NOT_AN_IMAGE], True)])
    assert bad_image.value.status() == "400" and "image 1" in bad_image.value.message()
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("no-such-model", [_image_input([RED], True)])
    assert unknown.value.status() == "404"
    wrong_shape = triton.InferInput("pixels", [1, 4, 4, 3], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((1, 4, 4, 3), dtype=np.float32))
    with pytest.raises(InferenceServerException) as shape:
        client.infer(MODEL, [wrong_shape])
    assert shape.value.status() == "400" and "[N, 8, 8, 3]" in shape.value.message()
    # The body itself, as any OIP client reads it: {"error": "<message>"}.
    url = f"{tiny_server.url}/v2/models/{MODEL}/infer"
    for body, status in [
        ({"inputs": []}, 400),
        ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]}, 422),
        ({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["AAAA"]}]}, 400),
        ({"inputs": [{"name": "other", "shape": [1], "datatype": "BYTES", "data": ["AAAA"]}]}, 400),
    ]:
        answer = httpx.post(url, json=body)
        assert answer.status_code == status, (body, answer.text)
        assert set(answer.json()) == {"error", "request_id"} and isinstance(answer.json()["error"], str)
        assert answer.json()["request_id"] == answer.headers["x-request-id"]


def test_binary_data_that_does_not_add_up_is_400(tiny_server: Server) -> None:
    header = json.dumps(
        {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 99}}]}
    ).encode()
    answer = httpx.post(
        f"{tiny_server.url}/v2/models/{MODEL}/infer",
        content=header + b"\x04\x00\x00\x00abcd",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert answer.status_code == 400 and "binary_data_size" in answer.json()["error"]


@pytest.mark.parametrize("declared", [b"\xb2", b"-1", b"1e3", b"9" * 30])
def test_a_header_length_that_is_not_a_length_is_400(tiny_server: Server, declared: bytes) -> None:
    # b"\xb2" reads as "²" (latin-1), a digit to str.isdigit() that int() refuses: it was a 500.
    answer = httpx.post(
        f"{tiny_server.url}/v2/models/{MODEL}/infer",
        content=b'{"inputs": []}',
        headers={"Inference-Header-Content-Length": declared},
    )
    assert answer.status_code == 400, answer.text
    assert "Inference-Header-Content-Length" in answer.json()["error"]


def test_more_images_than_allowed_is_413(tiny_artifact: Path, tmp_path: Path) -> None:
    with running_service(tiny_artifact, tmp_path / "server.log", MAX_IMAGES_PER_REQUEST="2") as server:
        client = _client(server)
        assert client.infer(MODEL, [_image_input([RED, GREEN], True)]).as_numpy("probabilities").shape == (2, 4)
        with pytest.raises(InferenceServerException) as over:
            client.infer(MODEL, [_image_input([RED, GREEN, BLUE], True)])
        assert over.value.status() == "413" and "MAX_IMAGES_PER_REQUEST" in over.value.message()


def test_with_an_api_key_only_health_and_server_metadata_are_open(tiny_artifact: Path, tmp_path: Path) -> None:
    with running_service(tiny_artifact, tmp_path / "server.log", API_KEY=KEY, MODEL_LOAD="enabled") as server:
        client = _client(server)
        assert client.is_server_live() and client.is_server_ready() and client.get_server_metadata()
        assert not client.is_model_ready(MODEL)
        with pytest.raises(InferenceServerException) as refused:
            client.infer(MODEL, [_image_input([RED], True)])
        assert refused.value.status() == "401"
        assert httpx.post(f"{server.url}/v2/repository/models/{MODEL}/load").status_code == 401
        keyed = {"Authorization": f"Bearer {KEY}"}
        assert client.is_model_ready(MODEL, headers=keyed)
        result = client.infer(MODEL, [_image_input([RED], True)], headers=keyed)
        assert TINY_LABELS[int(np.argmax(result.as_numpy("probabilities")[0]))] == "red"
        client.load_model(MODEL, headers=keyed)  # the same artifact again: loads and serves on
        assert client.is_model_ready(MODEL, headers=keyed)


EDGE_MODEL = "tiny-colour-classifier"


def _post_oip(
    app_client: httpx.AsyncClient, doc: dict[str, Any], binary: bytes = b"", declared: int | None = None
) -> Any:
    header = json.dumps(doc).encode()
    headers: dict[str, str] = {}
    if binary or declared is not None:
        headers["Inference-Header-Content-Length"] = str(len(header) if declared is None else declared)
    return app_client.post(f"/v2/models/{EDGE_MODEL}/infer", content=header + binary, headers=headers)


def test_oip_edges_of_the_request_grammar(tiny_artifact: Path) -> None:
    # 413 (not 503) for more images than the queue can ever take; no stray binary bytes; a header length equal to
    # the whole body; an image tensor's second dimension must be 1.
    app = make_app(MODEL_DIR=str(tiny_artifact), MAX_QUEUE="2")
    b64 = base64.b64encode(RED).decode()

    async def scenario() -> None:
        async with serving(app) as client:
            three = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3], "data": [b64] * 3}]}
            r = await _post_oip(client, three)
            assert r.status_code == 413 and "MAX_QUEUE" in r.json()["error"], r.text
            one_bin = {
                "inputs": [
                    {
                        "name": "image",
                        "datatype": "BYTES",
                        "shape": [1],
                        "parameters": {"binary_data_size": 4 + len(RED)},
                    }
                ]
            }
            blob = len(RED).to_bytes(4, "little") + RED
            assert (await _post_oip(client, one_bin, blob)).status_code == 200
            assert (await _post_oip(client, one_bin, blob + b"junk")).status_code == 400
            one_json = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}]}
            header = json.dumps(one_json).encode()
            assert (await _post_oip(client, one_json, declared=len(header))).status_code == 200
            wide = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 2], "data": [[b64, b64]]}]}
            assert (await _post_oip(client, wide)).status_code == 400

    asyncio.run(scenario())


def test_starlettes_own_errors_under_v2_are_in_the_protocols_shape(tiny_artifact: Path) -> None:
    # An OIP client (tritonclient) reads `error` as a message: Starlette's 404 and 405 under /v2 must say one too.
    app = make_app(MODEL_DIR=str(tiny_artifact))

    async def scenario() -> None:
        async with serving(app) as client:
            wrong_method = await client.get(f"/v2/models/{EDGE_MODEL}/infer")
            unknown = await client.get("/v2/no/such/route")
            ours = await client.get("/no/such/route")
        assert wrong_method.status_code == 405 and isinstance(wrong_method.json()["error"], str)
        assert unknown.status_code == 404 and isinstance(unknown.json()["error"], str)
        assert ours.status_code == 404 and ours.json()["error"]["code"] == "not_found"

    asyncio.run(scenario())
