"""Several images in one POST /infer: each answered in order, a bad one as its own error, one scheduler for all.

Over real HTTP against `python -m service` with a tiny real ONNX model, plus the real app in-process with a
gated engine where the scheduler's decisions are the point.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import httpx
import pytest

from tests.helpers import GatedClassifier, Server, image_bytes, make_app, sample, serving, until

RED = image_bytes((255, 0, 0))
GREEN = image_bytes((0, 200, 0), fmt="JPEG")
BLUE = image_bytes((0, 0, 255))
NOT_AN_IMAGE = b"this is not an image at all"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_json_images_answer_results_in_order_with_a_bad_image_as_its_own_error(tiny_server: Server) -> None:
    images = [_b64(RED), _b64(NOT_AN_IMAGE), _b64(GREEN), "%%% not base64 %%%", _b64(b""), _b64(BLUE)]
    response = httpx.post(f"{tiny_server.url}/infer?top_k=2", json={"images": images})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 6
    assert [r.get("class") for r in results] == ["red", None, "green", None, None, "blue"]
    assert [r["error"]["code"] for r in results if "error" in r] == ["invalid_image", "invalid_base64", "empty_image"]
    for good in (results[0], results[2], results[5]):
        assert set(good) == {"class", "score", "top_k"} and len(good["top_k"]) == 2
        assert good["top_k"][0] == {"class": good["class"], "score": good["score"]}
    assert set(response.json()) == {"results"}  # a trained model: no warning


def test_several_multipart_image_parts_answer_results_in_order(tiny_server: Server) -> None:
    files = [("image", ("a.png", RED)), ("image", ("b.bin", NOT_AN_IMAGE)), ("image", ("c.jpg", GREEN))]
    response = httpx.post(f"{tiny_server.url}/infer", files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert results[0]["class"] == "red" and results[2]["class"] == "green"
    assert results[1] == {"error": results[1]["error"]} and results[1]["error"]["code"] == "invalid_image"


def test_each_result_equals_the_single_image_answer(tiny_server: Server) -> None:
    singles = [httpx.post(f"{tiny_server.url}/infer?top_k=3", files={"image": data}).json() for data in (RED, GREEN)]
    batch = httpx.post(f"{tiny_server.url}/infer?top_k=3", json={"images": [_b64(RED), _b64(GREEN)]}).json()
    assert batch["results"] == singles


def test_a_single_image_answers_exactly_as_before(tiny_server: Server) -> None:
    assert set(httpx.post(f"{tiny_server.url}/infer", json={"image": _b64(RED)}).json()) == {"class", "score"}
    bad = httpx.post(f"{tiny_server.url}/infer", files={"image": NOT_AN_IMAGE})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_image"
    # One image in the list form is still the list form.
    assert len(httpx.post(f"{tiny_server.url}/infer", json={"images": [_b64(RED)]}).json()["results"]) == 1


def test_more_images_than_max_images_per_request_is_413(tiny_artifact: Path, tmp_path: Path) -> None:
    from tests.helpers import running_service

    with running_service(tiny_artifact, tmp_path / "server.log", MAX_IMAGES_PER_REQUEST="3") as server:
        ok = httpx.post(f"{server.url}/infer", json={"images": [_b64(RED)] * 3})
        assert ok.status_code == 200 and len(ok.json()["results"]) == 3
        over = httpx.post(f"{server.url}/infer", json={"images": [_b64(RED)] * 4})
        assert over.status_code == 413 and over.json()["error"]["code"] == "payload_too_large"
        assert "MAX_IMAGES_PER_REQUEST" in over.json()["error"]["message"]
        parts = httpx.post(f"{server.url}/infer", files=[("image", ("x.png", RED))] * 4)
        assert parts.status_code == 413 and parts.json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize("body", [{"images": []}, {"images": "abc"}, {"images": None}])
def test_an_empty_or_malformed_images_list_is_422(tiny_server: Server, body: object) -> None:
    response = httpx.post(f"{tiny_server.url}/infer", json=body)
    assert response.status_code == 422 and response.json()["error"]["code"] == "missing_image"


def test_the_images_of_one_request_go_through_the_scheduler_and_batch_together(tiny_artifact: Path) -> None:
    gated = GatedClassifier.from_dir(tiny_artifact)
    app = make_app(gated, MAX_BATCH="8", BATCH_WAIT_MS="200")

    async def scenario() -> None:
        async with serving(app) as client:
            with gated.held():
                first = asyncio.ensure_future(client.post("/infer", files={"image": BLUE}))
                await until(lambda: gated.runs == 1, "a lone request in the engine")
                batch = asyncio.ensure_future(
                    client.post("/infer", json={"images": [_b64(RED), _b64(NOT_AN_IMAGE), _b64(GREEN)]})
                )
                # The two good images are handed to the thread together, behind the lone run; the bad one never
                # reaches the queue.
                await until(lambda: sample(app, "inference_in_flight") == 3, "the request's two images as a batch")
                # Admission counts images, each from before its decoding: one running, three in the batch request.
                assert app.state.data_plane.admission.pending == 4
            assert (await first).json()["class"] == "blue"
            results = (await batch).json()["results"]
            assert [r.get("class") for r in results] == ["red", None, "green"]
            assert gated.runs == 2 and gated.images == 3  # the request's two images ran as one batch

    asyncio.run(scenario())
