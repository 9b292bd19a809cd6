"""End to end: the committed artifact, served as the README says, answering real car photos."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import ARTIFACTS, CARS, Server, image_bytes, running_service

NAMES = (ARTIFACTS / "labels.txt").read_text().splitlines()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_service(ARTIFACTS, tmp_path_factory.mktemp("e2e") / "server.log") as s:
        yield s


def test_home_says_the_model_is_untrained(server: Server) -> None:
    body = httpx.get(f"{server.url}/").json()
    assert body["status"] == "The car classification service is running!"
    assert body["model"]["trained"] is False
    assert body["model"]["quantization"].startswith("static_int8")
    assert body["model"]["classes"] == 196
    assert "untrained" in body["warning"].lower()


def test_a_real_car_photo_gets_a_stanford_cars_class(server: Server) -> None:
    if not CARS.exists():
        pytest.skip(f"{CARS} not present (the real photos live beside the project in CI)")
    for photo in sorted(CARS.glob("*.jpg")):
        with photo.open("rb") as f:  # exactly the original's client: requests.post(url, files={"image": f})
            response = httpx.post(f"{server.url}/infer", files={"image": f})
        assert response.status_code == 200, response.text
        body = response.json()
        # Untrained weights: the class is some Stanford Cars name, not a meaningful one, and it says so.
        assert body["class"] in NAMES and 0.0 < body["score"] < 1.0
        assert "untrained" in body["warning"]


def test_same_image_same_answer_every_way_it_is_sent(server: Server, tmp_path: Path) -> None:
    import base64

    photo = image_bytes((120, 40, 200), size=(640, 480), fmt="JPEG")
    answers = [
        httpx.post(f"{server.url}/infer?top_k=5", files={"image": photo}).json(),
        httpx.post(f"{server.url}/infer?top_k=5", files={"file": photo}).json(),
        httpx.post(f"{server.url}/infer?top_k=5", json={"image": base64.b64encode(photo).decode()}).json(),
        httpx.post(f"{server.url}/infer?top_k=5", content=photo, headers={"content-type": "image/jpeg"}).json(),
    ]
    assert all(a == answers[0] for a in answers)
    assert len(answers[0]["top_k"]) == 5
