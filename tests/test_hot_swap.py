"""Hot model swap: POST /v2/repository/models/{name}/load and SIGHUP load MODEL_DIR again without a restart.

Two real tiny artifacts that answer differently (B: another graph, logits instead of probabilities, and its
labels in capitals), a bad one (its model file does not match the manifest's sha256), real servers under
load from several clients, and the real app in-process with a gated engine for "accepted before the swap".
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from service.manifest import Manifest, sha256_file
from tests.helpers import (
    TINY_LABELS,
    GatedClassifier,
    Server,
    edit_manifest,
    image_bytes,
    make_app,
    running_service,
    sample,
    server_metric,
    serving,
    tiny_onnx_model,
    until,
    wait_for,
    write_tiny_artifact,
)

MODEL = "tiny-colour-classifier"
RED = image_bytes((255, 0, 0))
B64_RED = base64.b64encode(RED).decode()
LOAD = f"/v2/repository/models/{MODEL}/load"
OIP_BODY = {
    "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [B64_RED]}],
    "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}],
}


def _write_b(out: Path) -> None:
    """The tiny model with its classes in another order (weights rolled one place) and its labels in capitals:
    the same answers for people ("RED" for red), different numbers for the engine (red is class 1, not 0)."""
    write_tiny_artifact(out, logits=True)
    model = tiny_onnx_model(logits=True)
    for tensor in model.graph.initializer:
        if tensor.name in ("w", "b"):
            tensor.CopyFrom(numpy_helper.from_array(np.roll(numpy_helper.to_array(tensor), 1, axis=-1), tensor.name))
    onnx.save(model, str(out / "model.onnx"))
    labels = ("\n".join(label.upper() for label in np.roll(TINY_LABELS, 1)) + "\n").encode()
    (out / "labels.txt").write_bytes(labels)

    def edit(manifest: dict[str, Any]) -> None:
        manifest["model"].update(sha256=sha256_file(out / "model.onnx"), bytes=(out / "model.onnx").stat().st_size)
        manifest["labels"].update(sha256=hashlib.sha256(labels).hexdigest())

    edit_manifest(out, edit)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("swap")
    a, b, bad = root / "a", root / "b", root / "bad"
    write_tiny_artifact(a)
    _write_b(b)
    write_tiny_artifact(bad)
    edit_manifest(bad, lambda m: m["model"].update(sha256="0" * 64))  # type: ignore[attr-defined]
    return {"a": a, "b": b, "bad": bad}


def deploy(source: Path, model_dir: Path) -> None:
    """Replace MODEL_DIR's contents in one rename, as `python -m export` writes an artifact."""
    staging = model_dir.with_name(f".{model_dir.name}-staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    if model_dir.exists():
        retired = model_dir.with_name(f".{model_dir.name}-retired")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(model_dir, retired)
        os.replace(staging, model_dir)
        shutil.rmtree(retired)
    else:
        os.replace(staging, model_dir)


def _sha(artifact: Path) -> str:
    return Manifest.read(artifact).model.sha256


def _tag(artifact: Path) -> str:
    """How an answer's X-Model header names the artifact's model."""
    return f"{MODEL}@sha256:{_sha(artifact)[:12]}"


def _served_sha(server: Server) -> str:
    return str(httpx.get(f"{server.url}/", timeout=30).json()["model"]["sha256"])


def _model_info(server: Server, sha: str) -> float:
    return server_metric(server, "model_info", sha256=sha)


class Clients:
    """Several clients posting to /infer and the OIP infer endpoint in a loop until stopped; every answer kept."""

    def __init__(self, server: Server, count: int) -> None:
        self.server = server
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.failures: list[str] = []
        self.classes: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(count)]

    def _run(self, index: int) -> None:
        oip = index % 2 == 1
        with httpx.Client(base_url=self.server.url, timeout=60) as client:
            while not self.stop.is_set():
                try:
                    if oip:
                        response = client.post(f"/v2/models/{MODEL}/infer", json=OIP_BODY)
                        label = response.json()["outputs"][0]["data"][0].split(":")[2] if response.is_success else ""
                    else:
                        response = client.post("/infer", files={"image": RED})
                        label = response.json()["class"] if response.is_success else ""
                except httpx.HTTPError as exc:
                    with self.lock:
                        self.failures.append(repr(exc))
                    continue
                with self.lock:
                    if response.status_code != 200:
                        self.failures.append(f"{response.status_code} {response.text}")
                    else:
                        self.classes.append(label)

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()

    def answered(self) -> int:
        with self.lock:
            return len(self.classes)


def test_three_swaps_under_load_fail_no_request(artifacts: dict[str, Path], tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    deploy(artifacts["a"], model_dir)
    env = {"THREADS": "2", "MAX_QUEUE": "256", "MODEL_LOAD": "enabled"}
    with running_service(model_dir, tmp_path / "server.log", **env) as server:
        assert httpx.post(f"{server.url}/infer", files={"image": RED}).status_code == 200  # the wide comes after
        wait_for(lambda: server_metric(server, "inference_session_threads", session="wide") == 2, "the wide session")
        with Clients(server, 4) as clients:
            wait_for(lambda: clients.answered() >= 20, "the clients under way")

            # 1. good: B replaces A.
            deploy(artifacts["b"], model_dir)
            answer = httpx.post(f"{server.url}{LOAD}", timeout=60)
            assert answer.status_code == 200, answer.text
            assert answer.json()["sha256"] == _sha(artifacts["b"])
            assert answer.json()["replaced"]["sha256"] == _sha(artifacts["a"])
            assert answer.headers["x-model"] == _tag(artifacts["b"])
            after = httpx.post(f"{server.url}/infer", files={"image": RED})
            assert after.json()["class"] == "RED" and after.headers["x-model"] == _tag(artifacts["b"])
            assert _served_sha(server) == _sha(artifacts["b"])
            assert _model_info(server, _sha(artifacts["b"])) == 1 and _model_info(server, _sha(artifacts["a"])) == 0
            wait_for(lambda: server_metric(server, "inference_session_threads", session="wide") == 2, "B's wide")
            seen = clients.answered()
            wait_for(lambda: clients.answered() >= seen + 20, "answers from B")

            # 2. bad: B serves on, and the load says why.
            deploy(artifacts["bad"], model_dir)
            refused = httpx.post(f"{server.url}{LOAD}", timeout=60)
            assert refused.status_code == 400, refused.text
            message = refused.json()["error"]
            assert "sha256" in message and "still serving" in message and _sha(artifacts["b"])[:12] in message
            assert httpx.post(f"{server.url}/infer", files={"image": RED}).json()["class"] == "RED"
            assert _served_sha(server) == _sha(artifacts["b"]) and refused.headers["x-model"] == _tag(artifacts["b"])
            seen = clients.answered()
            wait_for(lambda: clients.answered() >= seen + 20, "answers after the refused load")

            # 3. good: A again.
            deploy(artifacts["a"], model_dir)
            assert httpx.post(f"{server.url}{LOAD}", timeout=60).status_code == 200
            assert httpx.post(f"{server.url}/infer", files={"image": RED}).json()["class"] == "red"
            assert _model_info(server, _sha(artifacts["a"])) == 1 and _model_info(server, _sha(artifacts["b"])) == 0
            seen = clients.answered()
            wait_for(lambda: clients.answered() >= seen + 20, "answers from A again")

        assert clients.failures == [], clients.failures[:5]
        assert {"red", "RED"} <= set(clients.classes)
        assert server_metric(server, "model_loads_total", outcome="loaded") == 2
        assert server_metric(server, "model_loads_total", outcome="failed") == 1
        wait_for(lambda: server_metric(server, "inference_session_threads", session="wide") == 2, "A's wide again")


def test_a_load_naming_another_model_is_404_and_changes_nothing(artifacts: dict[str, Path], tmp_path: Path) -> None:
    with running_service(artifacts["a"], tmp_path / "server.log", MODEL_LOAD="enabled") as server:
        answer = httpx.post(f"{server.url}/v2/repository/models/other-model/load")
        assert answer.status_code == 404 and MODEL in answer.json()["error"]
        overrides = httpx.post(f"{server.url}{LOAD}", json={"parameters": {"config": "{}"}})
        assert overrides.status_code == 400 and "MODEL_DIR" in overrides.json()["error"]
        assert server_metric(server, "model_loads_total", outcome="loaded") == 0


def test_sighup_loads_model_dir_again_and_a_bad_artifact_leaves_the_old_one(
    artifacts: dict[str, Path], tmp_path: Path
) -> None:
    model_dir = tmp_path / "model"
    deploy(artifacts["a"], model_dir)
    with running_service(model_dir, tmp_path / "server.log") as server:
        # The load route is off by default (MODEL_LOAD); SIGHUP is the local operator's and works regardless.
        refused = httpx.post(f"{server.url}{LOAD}", json={})
        assert refused.status_code == 403 and "MODEL_LOAD=enabled" in refused.json()["error"], refused.text
        assert server_metric(server, "http_requests_total", route="/v2/repository/models/{name}/load", status="403")
        deploy(artifacts["bad"], model_dir)
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: server_metric(server, "model_loads_total", outcome="failed") == 1, "the refused load")
        assert "still serving" in server.output() and server.process.poll() is None
        assert httpx.post(f"{server.url}/infer", files={"image": RED}).json()["class"] == "red"

        deploy(artifacts["b"], model_dir)
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: _model_info(server, _sha(artifacts["b"])) == 1, "B in model_info")
        assert httpx.post(f"{server.url}/infer", files={"image": RED}).json()["class"] == "RED"
        assert _served_sha(server) == _sha(artifacts["b"])
        assert server_metric(server, "model_loads_total", outcome="loaded") == 1


def test_requests_accepted_before_a_swap_finish_on_their_model(artifacts: dict[str, Path], tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    deploy(artifacts["a"], model_dir)
    gated = GatedClassifier.from_dir(model_dir)
    deploy(artifacts["b"], model_dir)  # what a load will find
    app = make_app(gated, MODEL_DIR=str(model_dir), MAX_BATCH="4", MODEL_LOAD="enabled")

    async def scenario() -> None:
        async with serving(app) as client:
            with gated.held():
                running = asyncio.ensure_future(client.post("/infer", files={"image": RED}))
                await until(lambda: gated.runs == 1, "a request in A's engine")
                queued = asyncio.ensure_future(client.post("/infer", files={"image": RED}))
                await until(lambda: app.state.data_plane.admission.pending == 2, "a request admitted on A")
                await until(lambda: sample(app, "inference_in_flight") == 2, "A's job queued on the thread")
                assert (await client.post(LOAD)).status_code == 200
                assert hasattr(gated, "session")  # A still has requests to answer
                after = asyncio.ensure_future(client.post("/infer", files={"image": RED}))
                await until(lambda: sample(app, "inference_queue_depth") == 1, "B's job queued behind A's")
            # Each runs on its own model, and says so (a batch holding both: test_scheduling_inprocess.py).
            answers = [await task for task in (running, queued, after)]
            assert [answer.json()["class"] for answer in answers] == ["red", "red", "RED"]
            a, b = _tag(artifacts["a"]), _tag(artifacts["b"])
            assert [answer.headers["x-model"] for answer in answers] == [a, a, b]
            # The running one and the queued one ran on A's engine; B's job never touched it.
            assert (gated.runs, gated.images) == (2, 2)
            # Its last request answered, A's sessions are freed, though this test still holds the object.
            assert not hasattr(gated, "session") and gated.wide is None

    asyncio.run(scenario())
