"""The serve path never imports TensorFlow (nor Keras): a real server runs with those imports booby-trapped."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import httpx

from tests.helpers import ARTIFACTS, ROOT, Server, image_bytes, running_service, write_tiny_artifact

BLOCKER = """
import sys

BLOCKED = ("tensorflow", "keras", "tf_keras", "tf2onnx", "tensorflow_datasets")


class _Trap:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            with open({marker!r}, "a") as f:
                f.write(name + "\\n")
            raise ImportError(f"{{name}} is blocked on the serve path")
        return None


sys.meta_path.insert(0, _Trap())
"""


def _trap(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "blocked-imports.txt"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER.format(marker=str(marker)))
    return site, marker


def test_the_trap_catches_a_tensorflow_import(tmp_path: Path) -> None:
    site, marker = _trap(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", "import tensorflow"], env={"PYTHONPATH": str(site)}, capture_output=True, text=True
    )
    assert result.returncode != 0 and "blocked on the serve path" in result.stderr
    assert marker.read_text().split() == ["tensorflow"]


def _exercise_every_route(server: Server, image: bytes) -> None:
    """Each route and each answer path once: an import inside any of them springs the trap."""
    for path in ("/", "/ping", "/ready", "/metrics", "/docs", "/openapi.json"):
        assert httpx.get(f"{server.url}{path}").status_code == 200, path
    ways = [
        {"files": {"image": image}},
        {"json": {"image": base64.b64encode(image).decode()}},
        {"content": image, "headers": {"content-type": "image/jpeg"}},
    ]
    for way in ways:
        response = httpx.post(f"{server.url}/infer?top_k=3", **way)  # type: ignore[arg-type]
        assert response.status_code == 200, response.text
        assert response.json()["class"]
    # Error paths: bad image, bad parameter, wrong type, no route, wrong method.
    assert httpx.post(f"{server.url}/infer", content=b"junk", headers={"content-type": "image/png"}).status_code == 400
    assert httpx.post(f"{server.url}/infer?top_k=0", files={"image": image}).status_code == 422
    assert httpx.post(f"{server.url}/infer", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    assert httpx.get(f"{server.url}/nowhere").status_code == 404
    assert httpx.get(f"{server.url}/infer").status_code == 405


def test_serving_the_committed_artifact_imports_no_tensorflow(tmp_path: Path) -> None:
    site, marker = _trap(tmp_path)
    with running_service(ARTIFACTS, tmp_path / "server.log", PYTHONPATH=f"{site}:{ROOT}") as server:
        _exercise_every_route(server, image_bytes((90, 90, 200), fmt="JPEG"))
    assert not marker.exists(), f"the service imported {marker.read_text().split()}"


def test_a_logits_nchw_model_imports_no_tensorflow(tmp_path: Path) -> None:
    # The other model paths: softmax over logits in numpy, and the NCHW transpose.
    site, marker = _trap(tmp_path)
    write_tiny_artifact(tmp_path / "artifact", logits=True, nchw=True)
    with running_service(tmp_path / "artifact", tmp_path / "server.log", PYTHONPATH=f"{site}:{ROOT}") as server:
        _exercise_every_route(server, image_bytes((0, 0, 250), fmt="JPEG"))
        assert httpx.post(f"{server.url}/infer", files={"image": image_bytes((0, 0, 250))}).json()["class"] == "blue"
    assert not marker.exists(), f"the service imported {marker.read_text().split()}"
