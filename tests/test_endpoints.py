"""The routes' answers, in-process: the real app and lifespan, a real tiny onnxruntime model, over ASGI.

Fast enough to run once per mutant (docs/security.md, "Mutation testing"); tests/test_http.py checks the same
over real HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette

from service.model import Classifier, ranked
from service.oip_codec import classification
from tests.helpers import edit_manifest, image_bytes, make_app, serving, write_tiny_artifact

RED = image_bytes((255, 0, 0))
STATUS = "The car classification service is running!"


@pytest.fixture(scope="module")
def classifier(tiny_artifact: Path) -> Classifier:
    return Classifier.load(tiny_artifact, 1, warm=True)


@pytest.fixture(scope="module")
def untrained(tmp_path_factory: pytest.TempPathFactory) -> Classifier:
    out = tmp_path_factory.mktemp("untrained") / "artifact"
    write_tiny_artifact(out, size=6, logits=True)
    edit_manifest(out, lambda m: m.update(trained=False, name="reference", description="untrained on purpose"))
    return Classifier.load(out, 1, warm=True)


def _calls(app: Starlette, *calls: Callable[[httpx.AsyncClient], object]) -> list[httpx.Response]:
    async def scenario() -> list[httpx.Response]:
        async with serving(app) as client:
            return [await call(client) for call in calls]  # type: ignore[misc]

    return asyncio.run(scenario())


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code, error
    return str(error["message"])


def test_home_describes_a_trained_model(classifier: Classifier) -> None:
    (response,) = _calls(make_app(classifier), lambda c: c.get("/"))
    manifest = classifier.manifest
    assert response.json() == {
        "status": STATUS,
        "model": {
            "name": "tiny-colour-classifier",
            "description": "test model: dominant colour",
            "trained": True,
            "sha256": manifest.model.sha256,
            "quantization": "fp32",
            "classes": 4,
            "input": {"height": 8, "width": 8},
            "created_at": "2026-01-01T00:00:00+00:00",
        },
    }


def test_home_and_answers_warn_about_an_untrained_model(untrained: Classifier) -> None:
    home, answer, ranked = _calls(
        make_app(untrained),
        lambda c: c.get("/"),
        lambda c: c.post("/infer", files={"image": RED}),
        lambda c: c.post("/infer?top_k=2", files={"image": RED}),
    )
    body = home.json()
    assert body["model"]["trained"] is False and body["model"]["name"] == "reference"
    assert body["model"]["input"] == {"height": 6, "width": 6}
    assert body["warning"].startswith("This artifact is an untrained reference model")
    assert answer.json()["warning"] == "untrained reference model: this class is not a real prediction"
    assert set(answer.json()) == {"class", "score", "warning"}
    assert set(ranked.json()) == {"class", "score", "top_k", "warning"}


def test_ping_ready_and_unknown_routes(classifier: Classifier) -> None:
    ping, ready, missing, wrong_method, wrong_method_ping = _calls(
        make_app(classifier),
        lambda c: c.get("/ping"),
        lambda c: c.get("/ready"),
        lambda c: c.get("/nowhere"),
        lambda c: c.get("/infer"),
        lambda c: c.post("/ping"),
    )
    assert ping.json() == {"message": "pong"}
    assert ready.status_code == 200 and ready.json() == {"ready": True}
    _error(missing, 404, "not_found")
    _error(wrong_method, 405, "method_not_allowed")
    _error(wrong_method_ping, 405, "method_not_allowed")


def test_ready_before_the_lifespan_is_503(classifier: Classifier) -> None:
    from tests.helpers import asgi_client

    app = make_app(classifier)

    async def scenario() -> httpx.Response:
        async with asgi_client(app) as client:
            return await client.get("/ready")

    message = _error(asyncio.run(scenario()), 503, "not_ready")
    assert message == "the model is not loaded yet, or the server is shutting down"


def test_an_answer_is_the_best_class_and_its_score(classifier: Classifier) -> None:
    (response,) = _calls(make_app(classifier), lambda c: c.post("/infer", files={"image": RED}))
    body = response.json()
    assert set(body) == {"class", "score"}
    assert body["class"] == "red" and 0.5 < body["score"] <= 1.0


@pytest.mark.parametrize("k", [1, 2, 3, 4, 20])
def test_top_k_is_sorted_complete_and_consistent(classifier: Classifier, k: int) -> None:
    (response,) = _calls(make_app(classifier), lambda c: c.post(f"/infer?top_k={k}", files={"image": RED}))
    body = response.json()
    ranked = body["top_k"]
    assert len(ranked) == min(k, 4)
    assert ranked[0] == {"class": body["class"], "score": body["score"]} and body["class"] == "red"
    scores = [item["score"] for item in ranked]
    assert scores == sorted(scores, reverse=True)
    if k >= 4:
        assert sorted(item["class"] for item in ranked) == ["blue", "dark", "green", "red"]
        assert sum(scores) == pytest.approx(1.0, abs=1e-5)


# "²" and "٣" are digits to str.isdigit(): int() raised on the first (a 500) and read the second as 3.
@pytest.mark.parametrize("value", ["0", "21", "-1", "two", "", "1.5", " 3", "+3", "²", "٣"])
def test_top_k_outside_1_to_20_is_422(classifier: Classifier, value: str) -> None:
    (response,) = _calls(
        make_app(classifier), lambda c: c.post("/infer", params={"top_k": value}, files={"image": RED})
    )
    message = _error(response, 422, "invalid_parameter")
    assert message == f"top_k must be an integer from 1 to 20, got {value!r}"


def test_the_best_class_is_the_first_of_the_ranking_whatever_the_ties_and_nans() -> None:
    # /infer's class, the first of its top_k and OIP's classification come from one ranking: the first of a tie
    # by index, a NaN (a logits model's inf through the softmax) after every number, never the answer.
    assert ranked(np.array([1, 1, 2, 2], dtype=np.float32), 1) == [2]
    assert ranked(np.array([1, 1, 2, 2], dtype=np.float32), 4) == [2, 3, 0, 1]
    assert ranked(np.array([np.nan, 0.2, 0.7, 0.1], dtype=np.float32), 1) == [2]
    assert ranked(np.array([np.nan, 0.2, 0.7, 0.1], dtype=np.float32), 4) == [2, 1, 3, 0]
    assert classification(np.array([[1, 1, 2, 2]], dtype=np.float32), ["a", "b", "c", "d"], 1) == [b"2.000000:2:c"]
    rng = np.random.default_rng(0)
    for _ in range(500):
        row = rng.integers(0, 4, size=int(rng.integers(2, 200))).astype(np.float32)  # many ties
        row[rng.random(row.size) < 0.05] = np.nan
        order = ranked(row, row.size)
        assert ranked(row, 1) == order[:1] and ranked(row, 5) == order[:5]
        values = [float(row[i]) for i in order]
        numbers = [v for v in values if not np.isnan(v)]
        assert values[: len(numbers)] == numbers == sorted(numbers, reverse=True)
        for a, b in zip(order, order[1:], strict=False):  # equal scores in index order
            if row[a] == row[b]:
                assert a < b
