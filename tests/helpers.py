"""Test helpers: a tiny real ONNX classifier artifact, real servers on 127.0.0.1, and test images."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import onnx
from onnx import TensorProto, helper
from PIL import Image

from export.artifact import placeholder_model_file, write_artifact
from service.manifest import Labels, Manifest, OutputSpec, Preprocessing, TensorSpec

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
SHARED = ROOT.parent / "shared"
CARS = SHARED / "data" / "cars"
TINY_LABELS = ["red", "green", "blue", "dark"]


def tiny_onnx_model(size: int = 8, busy_matmuls: int = 0, logits: bool = False) -> onnx.ModelProto:
    """mean colour -> 4 classes: which of R, G, B dominates, or "dark". Small, real and predictable.

    `busy_matmuls` adds a chain of 384x384 matrix products that depends on the input (so it cannot be
    constant-folded) but not the answer: a model that takes real engine time, for load tests.
    """
    w = 10.0 * np.array([[1, 0, 0, -1 / 3], [0, 1, 0, -1 / 3], [0, 0, 1, -1 / 3]], dtype=np.float32)
    b = np.array([0, 0, 0, 5.0], dtype=np.float32)
    initializers = [
        onnx.numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"),
        onnx.numpy_helper.from_array(np.array(1 / 255, dtype=np.float32), "inv255"),
        onnx.numpy_helper.from_array(w, "w"),
        onnx.numpy_helper.from_array(b, "b"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["input", "axes"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "inv255"], ["scaled"]),
        helper.make_node("MatMul", ["scaled", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["raw"]),
    ]
    if busy_matmuls:
        rng = np.random.default_rng(0)
        initializers += [
            onnx.numpy_helper.from_array((rng.standard_normal((384, 384)) / 20).astype(np.float32), "m"),
            onnx.numpy_helper.from_array(np.array([0, 1, 2, 3], dtype=np.int64), "all_axes"),
            onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), "axes_last"),
            onnx.numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        ]
        # (batch, 1, 1, 1) * m: one 384x384 matrix per image, then the chain, then x0 onto the logits.
        nodes += [
            helper.make_node("ReduceMean", ["input", "all_axes"], ["level"], keepdims=1),
            helper.make_node("Mul", ["level", "m"], ["busy0"]),
            *[helper.make_node("MatMul", [f"busy{i}", "m"], [f"busy{i + 1}"]) for i in range(busy_matmuls)],
            helper.make_node("ReduceMean", [f"busy{busy_matmuls}", "axes"], ["busy_sum"], keepdims=0),
            helper.make_node("ReduceMean", ["busy_sum", "axes_last"], ["busy_scalar"], keepdims=1),
            helper.make_node("Mul", ["busy_scalar", "zero"], ["nothing"]),
            helper.make_node("Add", ["raw", "nothing"], ["logits"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["raw"], ["logits"]))
    if not logits:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("logits" if logits else "probabilities", TensorProto.FLOAT, ["batch", 4])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def write_tiny_artifact(out: Path, size: int = 8, busy_matmuls: int = 0, logits: bool = False) -> Manifest:
    model_path = out.parent / f"{out.name}-tiny.onnx"
    onnx.save(tiny_onnx_model(size, busy_matmuls, logits), str(model_path))
    manifest = Manifest(
        name="tiny-colour-classifier",
        description="test model: dominant colour",
        trained=True,
        created_at="2026-01-01T00:00:00+00:00",
        model=placeholder_model_file("fp32", 18),
        input=TensorSpec(name="input", shape=(None, size, size, 3), layout="NHWC", dtype="float32"),
        output=OutputSpec(name="logits", kind="logits") if logits else OutputSpec("probabilities", "probabilities"),
        preprocessing=Preprocessing(height=size, width=size),
        labels=Labels(file="", count=len(TINY_LABELS), sha256=""),
    )
    written = write_artifact(out, model_path, TINY_LABELS, manifest)
    model_path.unlink()
    return written


def image_bytes(
    colour: tuple[int, ...] | int, size: tuple[int, int] = (64, 48), mode: str = "RGB", fmt: str = "PNG", **save: object
) -> bytes:
    buffer = BytesIO()
    Image.new(mode, size, colour).save(buffer, format=fmt, **save)  # type: ignore[arg-type]
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_service(
    model_dir: Path, log: Path, python: str = sys.executable, cwd: str | None = None, **env: str
) -> Server:
    port = free_port()
    environment = {**os.environ, "MODEL_DIR": str(model_dir), "HOST": "127.0.0.1", "PORT": str(port), **env}
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [python, "-m", "service"], cwd=cwd or ROOT, env=environment, stdout=sink, stderr=sink
        )
    server = Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"service exited with {process.returncode}:\n{server.output()}")
        try:
            if httpx.get(f"{server.url}/ping", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"service did not answer /ping within 60 s:\n{server.output()}")


def stop_service(server: Server) -> int:
    server.process.terminate()
    try:
        return server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        return server.process.wait()


@contextmanager
def running_service(model_dir: Path, log: Path, **env: str) -> Iterator[Server]:
    server = start_service(model_dir, log, **env)
    try:
        yield server
    finally:
        stop_service(server)
