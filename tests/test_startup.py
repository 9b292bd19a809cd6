"""Start-up: a bad artifact stops `python -m service` with one clear line and exit code 3, a bad setting with 2,
a port it cannot listen on with 4; a SIGTERM before the first request ends it at once, with 0."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port, start_service, write_unrunnable_model


def _start(model_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "MODEL_DIR": str(model_dir), "HOST": "127.0.0.1", "PORT": str(free_port()), **env}
    return subprocess.run(
        [sys.executable, "-m", "service"], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60
    )


def _copy(tiny_artifact: Path, tmp_path: Path) -> Path:
    target = tmp_path / "artifact"
    shutil.copytree(tiny_artifact, target)
    return target


BAD_SETTING, BAD_ARTIFACT, CANNOT_LISTEN = 2, 3, 4  # the exit codes the README documents


def _assert_clean_failure(result: subprocess.CompletedProcess[str], *needles: str, code: int = BAD_ARTIFACT) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("service: ")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_missing_artifact(tmp_path: Path) -> None:
    _assert_clean_failure(_start(tmp_path / "nothing-here"), "no manifest at", "python -m export")


def test_model_file_changed_after_export(tiny_artifact: Path, tmp_path: Path) -> None:
    artifact = _copy(tiny_artifact, tmp_path)
    with (artifact / "model.onnx").open("ab") as f:
        f.write(b"\0")
    _assert_clean_failure(_start(artifact), "sha256", "corrupt or was changed")


def test_model_file_missing(tiny_artifact: Path, tmp_path: Path) -> None:
    artifact = _copy(tiny_artifact, tmp_path)
    (artifact / "model.onnx").unlink()
    _assert_clean_failure(_start(artifact), "does not exist")


def test_corrupt_model_with_matching_hash(tiny_artifact: Path, tmp_path: Path) -> None:
    artifact = _copy(tiny_artifact, tmp_path)
    (artifact / "model.onnx").write_bytes(b"not a protobuf")
    manifest = json.loads((artifact / "manifest.json").read_text())
    import hashlib

    manifest["model"]["sha256"] = hashlib.sha256(b"not a protobuf").hexdigest()
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    _assert_clean_failure(_start(artifact), "onnxruntime cannot load")


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda m: m.pop("preprocessing"), "missing key 'preprocessing'"),
        (lambda m: m.update(schema_version=99), "schema_version 99"),
        (lambda m: m["input"].update(name="pixels"), "manifest says"),
        (lambda m: m["labels"].update(count=5), "labels"),
    ],
)
def test_manifest_that_does_not_match(tiny_artifact: Path, tmp_path: Path, edit: object, needle: str) -> None:
    artifact = _copy(tiny_artifact, tmp_path)
    manifest = json.loads((artifact / "manifest.json").read_text())
    edit(manifest)  # type: ignore[operator]
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    _assert_clean_failure(_start(artifact), needle)


def test_unreadable_manifest(tiny_artifact: Path, tmp_path: Path) -> None:
    artifact = _copy(tiny_artifact, tmp_path)
    (artifact / "manifest.json").write_text("{ not json")
    _assert_clean_failure(_start(artifact), "cannot read")


def test_model_input_that_does_not_take_the_preprocessed_images(tiny_artifact: Path, tmp_path: Path) -> None:
    artifact = _copy(tiny_artifact, tmp_path)
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["input"]["shape"] = [None, 9, 9, 3]  # the model takes 8x8
    manifest["preprocessing"].update(height=9, width=9)
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    _assert_clean_failure(_start(artifact), "has shape", "makes NHWC batches of shape ['N', 9, 9, 3]")


def test_model_that_loads_but_cannot_run(tiny_artifact: Path, tmp_path: Path) -> None:
    artifact = _copy(tiny_artifact, tmp_path)
    write_unrunnable_model(artifact)
    _assert_clean_failure(_start(artifact), "failed its first run")


@pytest.mark.parametrize(("key", "value"), [("PORT", "eighty"), ("WORKERS", "0"), ("LOG_LEVEL", "loud")])
def test_bad_setting(tiny_artifact: Path, key: str, value: str) -> None:
    result = _start(tiny_artifact, **{key: value})
    _assert_clean_failure(result, "bad setting", key, code=BAD_SETTING)


def test_a_bad_setting_is_reported_before_the_artifact_is_read(tmp_path: Path) -> None:
    _assert_clean_failure(_start(tmp_path / "nothing-here", THREADS="0"), "THREADS", code=BAD_SETTING)


# THREADS=2 on any machine: a wide session, whose build waits for the first answer, is then in the background
# when the server stops. Waited for, it kept a server that never answered from ever exiting.


def test_a_port_in_use_is_a_clear_error_and_an_exit_at_once(tiny_artifact: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _start(tiny_artifact, PORT=str(port), THREADS="2")
    _assert_clean_failure(result, "address already in use", f"cannot serve on 127.0.0.1:{port}", code=CANNOT_LISTEN)


def test_sigterm_before_any_request_exits_0_at_once(tiny_artifact: Path, tmp_path: Path) -> None:
    server = start_service(tiny_artifact, tmp_path / "service.log", THREADS="2")
    try:
        server.process.terminate()
        assert server.process.wait(timeout=30) == 0, server.output()
    finally:
        server.process.kill()
        server.process.wait()


@pytest.mark.parametrize(
    "target", [["service.app:app"], ["--factory", "service.app:create_app"]], ids=["module-app", "factory"]
)
def test_plain_uvicorn_entrypoints_serve(tiny_artifact: Path, tmp_path: Path, target: list[str]) -> None:
    import time

    import httpx

    from tests.helpers import image_bytes

    port = free_port()
    env = {**os.environ, "MODEL_DIR": str(tiny_artifact)}
    command = [sys.executable, "-m", "uvicorn", *target, "--host", "127.0.0.1", "--port", str(port)]
    with (tmp_path / "uvicorn.log").open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (tmp_path / "uvicorn.log").read_text()
            try:
                response = httpx.post(f"http://127.0.0.1:{port}/infer", files={"image": image_bytes((0, 0, 250))})
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "uvicorn never answered"
                time.sleep(0.1)
        assert response.json()["class"] == "blue"
        assert httpx.get(f"http://127.0.0.1:{port}/ready").json() == {"ready": True}
    finally:
        process.terminate()
        process.wait(timeout=15)


_HEAPS_AFTER_MAIN = """
import ctypes, os, sys, threading
import numpy as np
from service.__main__ import main

os.environ["THREADS"] = "0"  # a bad setting: main() stops at once, after what it does before reading settings
assert main() == 2
together = threading.Barrier(4)

def decode_like() -> None:
    held = [np.ones((300, 300, 3), np.float32) for _ in range(4)]  # a decoding's buffers, all four threads at once
    together.wait()
    del held

threads = [threading.Thread(target=decode_like) for _ in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
path = sys.argv[1]
stream = ctypes.c_void_p(libc.fopen(path.encode(), b"w"))
libc.malloc_info(0, stream)
libc.fclose(stream)
print(open(path).read().count("<heap nr="))
"""


def _heaps_after_main(tmp_path: Path, **env: str) -> int:
    """How many malloc arenas four threads use after `python -m service`'s main() has set up the process."""
    result = subprocess.run(
        [sys.executable, "-c", _HEAPS_AFTER_MAIN, str(tmp_path / "malloc_info.xml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")} | env,
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc arenas: Linux only")
def test_threads_keep_their_own_malloc_arenas(tmp_path: Path) -> None:
    # With one arena shared by the engine and decode threads the service answered about 5% fewer requests at 8
    # clients than with per-thread arenas.
    assert _heaps_after_main(tmp_path) > 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc arenas: Linux only")
@pytest.mark.parametrize(
    "env", [{"MALLOC_ARENA_MAX": "1"}, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"}], ids=["variable", "tunable"]
)
def test_an_arena_count_the_operator_set_is_kept(tmp_path: Path, env: dict[str, str]) -> None:
    # glibc's own setting, chosen for the least memory over throughput (docs/operations.md): the service must
    # not undo it.
    assert _heaps_after_main(tmp_path, **env) == 1
