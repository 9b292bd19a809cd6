"""The images, really built and run: podman (Debian's 4.3.1, as root) builds `Dockerfile` and `Dockerfile.export`
unchanged on a stand-in for python:3.11-slim-bookworm made from Debian's packages (scripts/container-base), then
runs them as a user would. docs/containers.md says how and what differs from Docker and the official base.

The first run on a machine makes the base (debootstrap, 1-2 minutes) and downloads the wheels for both images
(TensorFlow: several minutes); after that the base tarball, podman's images and its layer cache are reused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.manifest import Manifest
from tests.helpers import ARTIFACTS, CARS, ROOT, free_port, image_bytes, running_service
from tests.system import IN_CI, require_executable

pytestmark = pytest.mark.slow

# crun refuses this machine's hybrid cgroup setup; runc with cgroupfs works (docs/containers.md).
ENGINE_FLAGS = ["--runtime", "runc", "--cgroup-manager=cgroupfs"]
SERVE_TAG = "localhost/car-classifier:test"
EXPORT_TAG = "localhost/car-classifier-export:test"
# What pip inside a build step needs from this machine: its CA bundle and pip config (a proxy's certificate).
BUILD_MOUNTS = ["/etc/ssl/certs", "/etc/pip.conf"]
# What podman itself changes in a container's own layer: the mount points of the /etc files it provides.
PODMAN_DIFF = {"/etc", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/run", "/run/.containerenv"}


def _run(args: list[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


@pytest.fixture(scope="session")
def podman() -> list[str]:
    """podman's command with this machine's flags, once the system setting and the stand-in base are in place."""
    executable = require_executable("podman")
    require_executable("runc")
    require_executable("debootstrap")
    if os.geteuid() != 0:
        message = "the container tests run podman as root (rootless podman needs subordinate ids set up)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    _run(["bash", str(ROOT / "scripts" / "podman-setup")])
    _run(["bash", str(ROOT / "scripts" / "container-base")], timeout=900)
    return [executable, *ENGINE_FLAGS]


def build_inputs(podman: list[str], dockerfile: str) -> str:
    """A hash of everything a build reads: the base image, the Dockerfile and the files .dockerignore lets in."""
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] == "*", ".dockerignore no longer starts by excluding everything: hash what it admits"
    admitted = [ROOT / line[1:].rstrip("/") for line in patterns if line.startswith("!")]
    base = _run([*podman, "image", "inspect", "--format", "{{.Id}}", "docker.io/library/python:3.11-slim-bookworm"])
    digest = hashlib.sha256(base.stdout.encode() + (ROOT / dockerfile).read_bytes())
    for top in admitted:
        for path in sorted([top] if top.is_file() else top.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def build(podman: list[str], dockerfile: str, tag: str) -> None:
    """`podman build` of a Dockerfile as it is committed; --format docker keeps its HEALTHCHECK (OCI drops it).

    Skipped when the tag already holds an image built from the same inputs: even with every layer cached,
    podman spends about two minutes on a loaded machine checksumming the export's 1.7 GB venv for its COPY.
    """
    inputs = build_inputs(podman, dockerfile)
    label = '{{ index .Config.Labels "car-classifier.build-inputs" }}'
    if _run([*podman, "image", "inspect", "--format", label, tag], check=False).stdout.strip() == inputs:
        return
    mounts = [f"-v={path}:{path}:ro" for path in BUILD_MOUNTS if Path(path).exists()]
    _run(
        [*podman, "build", "--format", "docker", "--pull=never", "--network", "host", *mounts,
         "--label", f"car-classifier.build-inputs={inputs}", "-f", str(ROOT / dockerfile), "-t", tag, str(ROOT)],
        timeout=1200,
    )  # fmt: skip


@pytest.fixture(scope="session")
def serve_image(podman: list[str]) -> str:
    build(podman, "Dockerfile", SERVE_TAG)
    return SERVE_TAG


@pytest.fixture(scope="session")
def export_image(podman: list[str]) -> str:
    build(podman, "Dockerfile.export", EXPORT_TAG)
    return EXPORT_TAG


@dataclass
class Container:
    name: str
    url: str
    podman: list[str]

    def inspect(self, template: str) -> str:
        return _run([*self.podman, "inspect", "--format", template, self.name]).stdout.strip()

    def logs(self) -> str:
        done = _run([*self.podman, "logs", self.name], check=False)
        return done.stdout + done.stderr


@contextmanager
def container(podman: list[str], image: str, *options: str, read_only: bool = True) -> Iterator[Container]:
    """`podman run -d` of the image's own CMD on a free port of the host network; removed afterwards."""
    port = free_port()
    name = f"car-classifier-test-{uuid.uuid4().hex[:10]}"
    flags = ["--read-only"] if read_only else []
    env = ["-e", f"PORT={port}", "-e", "HOST=127.0.0.1"]
    _run([*podman, "run", "-d", "--name", name, "--network", "host", *flags, *env, *options, image])
    box = Container(name, f"http://127.0.0.1:{port}", podman)
    try:
        deadline = time.monotonic() + 60
        while True:
            if box.inspect("{{.State.Running}}") != "true":
                pytest.fail(f"the container exited ({box.inspect('{{.State.ExitCode}}')}):\n{box.logs()}")
            try:
                if httpx.get(f"{box.url}/ping", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the container did not answer /ping within 60 s:\n{box.logs()}")
            time.sleep(0.1)
        yield box
    finally:
        _run([*podman, "rm", "-f", "-t", "5", name], check=False)


def photo() -> bytes:
    photos = sorted(CARS.glob("*.jpg")) if CARS.is_dir() else []
    return photos[0].read_bytes() if photos else image_bytes((180, 40, 60), size=(640, 480), fmt="JPEG")


def infer(url: str, body: bytes, query: str = "") -> dict[str, object]:
    response = httpx.post(f"{url}/infer{query}", files={"image": body}, timeout=60)
    assert response.status_code == 200, response.text
    answer: dict[str, object] = response.json()
    return answer


def same_answer(container_answer: dict[str, object], venv_answer: dict[str, object]) -> None:
    # The same wheels on the same CPU, one intra-op thread per run: the score is reproducible to the last bits.
    assert container_answer["class"] == venv_answer["class"]
    assert container_answer["score"] == pytest.approx(venv_answer["score"], rel=1e-6, abs=1e-9)


def _queue_depth(url: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=5).text):
        if family.name == "inference_queue_depth":
            return float(family.samples[0].value)
    raise AssertionError("no inference_queue_depth gauge in /metrics")


def test_serve_image_runs_read_only_as_uid_1000_and_answers_like_the_venv(
    podman: list[str], serve_image: str, tmp_path: Path
) -> None:
    body = photo()
    with running_service(ARTIFACTS, tmp_path / "venv.log") as venv:
        expected = infer(venv.url, body)
    with container(podman, serve_image) as box:
        same_answer(infer(box.url, body), expected)
        assert box.inspect("{{.HostConfig.ReadonlyRootfs}}") == "true"
        # The service process itself, seen from the host: uid 1000 for every uid (real, effective, saved, fs).
        pid = box.inspect("{{.State.Pid}}")
        status = Path(f"/proc/{pid}/status").read_text()
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        assert uids == ["1000"] * 4, status
        assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:3] == [b"python", b"-m", b"service"]
        # The image's own HEALTHCHECK (kept by --format docker), run by podman inside the container.
        assert "/ping" in box.inspect("{{json .Config.Healthcheck}}")
        check = _run([*podman, "healthcheck", "run", box.name], check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        assert box.inspect("{{.State.Healthcheck.Status}}") == "healthy"
        # --read-only leaves podman's tmpfs mounts writable: the service leaves them empty.
        written = _run([*podman, "exec", box.name, "find", "/tmp", "/var/tmp", "/dev/shm", "-mindepth", "1"])
        assert written.stdout.split() == []


def test_stop_under_load_answers_every_accepted_request_and_writes_nothing(podman: list[str], serve_image: str) -> None:
    """A writable container this time, so that `podman diff` can show whatever the service writes under load."""
    body = photo()
    with container(podman, serve_image, "-e", "WORKERS=1", "-e", "MAX_QUEUE=64", read_only=False) as box:
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(infer, box.url, body) for _ in range(16)]
            deadline = time.monotonic() + 30
            while _queue_depth(box.url) < 4:  # requests inside the service, waiting for the one worker
                assert time.monotonic() < deadline, "the requests never queued up"
                time.sleep(0.005)
            stop = _run([*podman, "stop", "-t", "30", box.name], timeout=60)
            answers = [f.result() for f in futures]
        assert stop.returncode == 0
        assert all(a["class"] == answers[0]["class"] for a in answers)
        assert box.inspect("{{.State.ExitCode}}") == "0", box.logs()
        assert "Finished server process" in box.logs()
        changes = _run([*podman, "diff", "--format", "json", box.name]).stdout
        written = {path for paths in json.loads(changes or "{}").values() for path in paths}
        assert written <= PODMAN_DIFF, f"the service wrote into the container: {sorted(written - PODMAN_DIFF)}"


def test_serve_image_runs_classify_on_a_folder_read_only_as_uid_1000(
    podman: list[str], serve_image: str, tmp_path: Path
) -> None:
    """`classify /photos` in the serve image, as docs/api.md gives it: a read-only container with no network and
    the photos mounted read-only; its rows are the venv's own, and a file it writes belongs to uid 1000."""
    photos, out = tmp_path / "photos", tmp_path / "out"
    (photos / "nested").mkdir(parents=True)
    (photos / "car.jpg").write_bytes(photo())
    (photos / "nested" / "red.png").write_bytes(image_bytes((200, 20, 20), size=(320, 240)))
    (photos / "nested" / "corrupt.jpg").write_bytes(photo()[:300])
    (photos / "readme.txt").write_text("not an image")
    out.mkdir()
    os.chown(out, 1000, 1000)
    os.chmod(out, 0o700)
    venv = subprocess.run(
        [sys.executable, "-m", "service.classify", str(photos), "--top-k", "3", "--format", "jsonl"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    box = [*podman, "run", "--rm", "--read-only", "--network", "none", "-e", "THREADS=1"]
    mounts = ["-v", f"{photos}:/photos:ro", "-v", f"{out}:/out"]
    ran = _run([*box, *mounts, serve_image, "classify", "/photos", "--top-k", "3", "--format", "jsonl",
                "--out", "/out/rows.jsonl"], timeout=300, check=False)  # fmt: skip
    assert ran.returncode == venv.returncode == 1, ran.stdout + ran.stderr  # the corrupt JPEG
    assert "classified 2 of 3 images" in ran.stderr and "1 other files skipped" in ran.stderr, ran.stderr
    assert (out / "rows.jsonl").stat().st_uid == 1000
    inside = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    outside = [json.loads(line) for line in venv.stdout.splitlines()]
    assert [row["path"] for row in inside] == [
        f"/photos/{name}" for name in ("car.jpg", "nested/corrupt.jpg", "nested/red.png")
    ]
    assert inside[1]["error"]["code"] == outside[1]["error"]["code"] == "invalid_image"
    for mine, theirs in ((inside[0], outside[0]), (inside[2], outside[2])):
        same_answer(mine, theirs)
        assert [item["class"] for item in mine["top_k"]] == [item["class"] for item in theirs["top_k"]]


# A Keras 2 .h5 like the original's (tf_keras), small: the export image's TensorFlow loads and converts it.
TINY_H5 = """
import sys
import numpy as np
import tf_keras
tf_keras.utils.set_random_seed(3)
inputs = tf_keras.Input((32, 32, 3))
x = tf_keras.layers.Rescaling(1 / 255)(inputs)
x = tf_keras.layers.Conv2D(8, 3, strides=2, padding="same")(x)
x = tf_keras.layers.BatchNormalization()(x)
x = tf_keras.layers.Activation("swish")(x)
x = tf_keras.layers.GlobalAveragePooling2D()(x)
outputs = tf_keras.layers.Dense(5, activation="softmax")(x)
tf_keras.Model(inputs, outputs).save(sys.argv[1])
"""
FIVE = ["alpha", "bravo", "charlie", "delta", "echo"]


def test_the_quota_benchmark_runs_both_servers_in_the_serve_image_and_reads_their_throttling(
    podman: list[str], serve_image: str, tmp_path: Path
) -> None:
    """`python -m benchmarks.container --quota` (docs/operations.md's figures under a CPU quota): the service and
    the naive server in the serve image under `--cpus 1`, two clients, and the container cgroup's throttled time
    read for each. The naive server's two spinning intra-op threads exceed a 1-CPU quota whenever it works; ours
    is throttled too on a quiet host (47 periods in 5 s), but not when a starved host leaves it under one core."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.container", "--quota", "1", "--users", "2", "--rounds", "1",
         "--seconds", "5", "--out", str(tmp_path), "--name", "quota"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    result = json.loads((tmp_path / "quota.json").read_text())["quota"]
    assert {row["system"] for row in result["summary"]} == {"service", "naive"}
    rows = {row["system"]: row for row in result["summary"]}
    for row in rows.values():
        assert row["errors"] == 0 and row["ok_per_s"] > 0, row
        assert row["throttled_periods"] >= 0 and row["throttled_ms_per_request"] >= 0, row
    assert rows["naive"]["throttled_periods"] > 0 and rows["naive"]["throttled_ms_per_request"] > 0, rows
    assert "`--cpus 1.0`" in (tmp_path / "quota.md").read_text()


def test_export_image_writes_an_artifact_the_serve_image_serves(
    podman: list[str], serve_image: str, export_image: str, tmp_path: Path
) -> None:
    """The two-image workflow: the export container reads a Keras model from a read-only /input, with no network,
    and writes the artifact to /output as uid 1000; the read-only serve container serves that folder."""
    if importlib.util.find_spec("tf_keras") is None:
        message = "the tiny Keras 2 model is made with tf_keras (requirements-export.txt)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    given = tmp_path / "input"
    (given / "photos").mkdir(parents=True)
    made = subprocess.run(
        [sys.executable, "-c", TINY_H5, str(given / "model.h5")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )  # fmt: skip
    assert made.returncode == 0, made.stderr[-3000:]
    (given / "labels.txt").write_text("\n".join(FIVE) + "\n")
    for i in range(8):
        colour = (40 + 25 * i, 200 - 20 * i, (90 * i) % 256)
        (given / "photos" / f"{i}.jpg").write_bytes(image_bytes(colour, size=(96 + 8 * i, 80), fmt="JPEG"))
    output = tmp_path / "output"
    output.mkdir()
    os.chown(output, 1000, 1000)  # the export image runs as uid 1000, as the serve image does

    exported = _run(
        [*podman, "run", "--rm", "--network", "none", "--read-only",
         "-v", f"{given}:/input:ro", "-v", f"{output}:/output", export_image,
         "--keras-model", "/input/model.h5", "--labels", "/input/labels.txt",
         "--calibration-dir", "/input/photos", "--calibration-count", "8", "--validation-count", "8",
         "--variants", "fp32", "static_u8", "--out", "/output/artifact"],
        timeout=600,
    )  # fmt: skip
    artifact = output / "artifact"
    assert sorted(p.name for p in artifact.iterdir()) == ["labels.txt", "manifest.json", "model.onnx"], exported.stderr
    assert {p.stat().st_uid for p in artifact.iterdir()} == {1000}
    manifest = Manifest.read(artifact)
    assert manifest.source["loader"] == "tf_keras" and manifest.input.shape == (None, 32, 32, 3)

    body = image_bytes((200, 60, 30), size=(64, 64), fmt="JPEG")
    with running_service(artifact, tmp_path / "venv.log") as venv:
        expected = infer(venv.url, body, "?top_k=5")
    mount = ["-v", f"{artifact}:/models:ro", "-e", "MODEL_DIR=/models"]
    with container(podman, serve_image, *mount) as box:
        answer = infer(box.url, body, "?top_k=5")
        served = httpx.get(f"{box.url}/", timeout=10).json()["model"]
    assert served["sha256"] == manifest.model.sha256 and served["classes"] == len(FIVE), served
    same_answer(answer, expected)
    assert sorted(item["class"] for item in answer["top_k"]) == FIVE  # type: ignore[union-attr,index]
