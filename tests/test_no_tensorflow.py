"""The serve path never imports TensorFlow (nor Keras): a real server runs with those imports booby-trapped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from tests.helpers import ARTIFACTS, ROOT, image_bytes, running_service

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


def test_serving_the_committed_artifact_imports_no_tensorflow(tmp_path: Path) -> None:
    site, marker = _trap(tmp_path)
    with running_service(ARTIFACTS, tmp_path / "server.log", PYTHONPATH=f"{site}:{ROOT}") as server:
        assert httpx.get(f"{server.url}/").status_code == 200
        response = httpx.post(f"{server.url}/infer?top_k=3", files={"image": image_bytes((90, 90, 200), fmt="JPEG")})
        assert response.status_code == 200, response.text
        assert response.json()["class"]
        httpx.post(f"{server.url}/infer", content=b"junk", headers={"content-type": "image/png"})
    assert not marker.exists(), f"the service imported {marker.read_text().split()}"
