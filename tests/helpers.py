"""Test helpers: a tiny real ONNX classifier artifact, real servers on 127.0.0.1, and test images."""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import onnx
from onnx import TensorProto, helper
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from export.artifact import placeholder_model_file, write_artifact
from service.manifest import Labels, Manifest, OutputSpec, Preprocessing, TensorSpec, sha256_file
from service.model import Classifier

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
SHARED = ROOT.parent / "shared"
CARS = SHARED / "data" / "cars"
TINY_LABELS = ["red", "green", "blue", "dark"]


def tiny_onnx_model(size: int = 8, busy_matmuls: int = 0, logits: bool = False, nchw: bool = False) -> onnx.ModelProto:
    """mean colour -> 4 classes: which of R, G, B dominates, or "dark". Small, real and predictable.

    `busy_matmuls` adds a chain of 384x384 matrix products that depends on the input (so it cannot be
    constant-folded) but not the answer: a model that takes real engine time, for load tests.
    `nchw` takes (batch, 3, size, size) instead of (batch, size, size, 3).
    """
    w = 10.0 * np.array([[1, 0, 0, -1 / 3], [0, 1, 0, -1 / 3], [0, 0, 1, -1 / 3]], dtype=np.float32)
    b = np.array([0, 0, 0, 5.0], dtype=np.float32)
    initializers = [
        onnx.numpy_helper.from_array(np.array([2, 3] if nchw else [1, 2], dtype=np.int64), "pixel_axes"),
        onnx.numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"),
        onnx.numpy_helper.from_array(np.array(1 / 255, dtype=np.float32), "inv255"),
        onnx.numpy_helper.from_array(w, "w"),
        onnx.numpy_helper.from_array(b, "b"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["input", "pixel_axes"], ["mean"], keepdims=0),
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
        [
            helper.make_tensor_value_info(
                "input", TensorProto.FLOAT, ["batch", 3, size, size] if nchw else ["batch", size, size, 3]
            )
        ],
        [helper.make_tensor_value_info("logits" if logits else "probabilities", TensorProto.FLOAT, ["batch", 4])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def write_tiny_artifact(
    out: Path, size: int = 8, busy_matmuls: int = 0, logits: bool = False, nchw: bool = False
) -> Manifest:
    model_path = out.parent / f"{out.name}-tiny.onnx"
    onnx.save(tiny_onnx_model(size, busy_matmuls, logits, nchw), str(model_path))
    shape = (None, 3, size, size) if nchw else (None, size, size, 3)
    manifest = Manifest(
        name="tiny-colour-classifier",
        description="test model: dominant colour",
        trained=True,
        created_at="2026-01-01T00:00:00+00:00",
        model=placeholder_model_file("fp32", 18),
        input=TensorSpec(name="input", shape=shape, layout="NCHW" if nchw else "NHWC", dtype="float32"),
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
    model_dir: Path,
    log: Path,
    python: str = sys.executable,
    cwd: str | None = None,
    max_files: int | None = None,
    **env: str,
) -> Server:
    """`python -m service` on a free port; `max_files`: its descriptor limit, soft and hard (as `prlimit`)."""
    port = free_port()
    environment = {**os.environ, "MODEL_DIR": str(model_dir), "HOST": "127.0.0.1", "PORT": str(port), **env}
    limit = None if max_files is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [python, "-m", "service"], cwd=cwd or ROOT, env=environment, stdout=sink, stderr=sink, preexec_fn=limit
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
def running_service(model_dir: Path, log: Path, max_files: int | None = None, **env: str) -> Iterator[Server]:
    server = start_service(model_dir, log, max_files=max_files, **env)
    try:
        yield server
    finally:
        stop_service(server)


def write_unrunnable_model(artifact: Path) -> None:
    """Rewrite the artifact's model so it loads and passes every load-time check but fails on every run."""
    model = onnx.load(str(artifact / "model.onnx"))
    # Reshape the (batch, 4) answer to the input's own shape: valid as a graph, fails on every run.
    (output,) = model.graph.output
    model.graph.node[-1].output[0] = "answer"
    model.graph.node.extend(
        [
            helper.make_node("Shape", ["input"], ["input_shape"]),
            helper.make_node("Reshape", ["answer", "input_shape"], [output.name]),
        ]
    )
    output.type.tensor_type.ClearField("shape")
    onnx.save(model, str(artifact / "model.onnx"))
    edit_manifest(
        artifact,
        lambda m: m["model"].update(
            sha256=sha256_file(artifact / "model.onnx"), bytes=(artifact / "model.onnx").stat().st_size
        ),
    )


def edit_manifest(artifact: Path, edit: Callable[[dict[str, object]], object]) -> None:
    import json

    path = artifact / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


# --- The service's own counters, read from /metrics: tests wait on these instead of sleeping. ---


def metric_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def metric(text: str, name: str, **labels: str) -> float:
    """The value of sample `name` with these labels (0 when the series does not exist yet)."""
    for sample_name, sample_labels, value in metric_samples(text):
        if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items()):
            return value
    return 0.0


def server_metric(server: Server, name: str, **labels: str) -> float:
    return metric(httpx.get(f"{server.url}/metrics", timeout=30).text, name, **labels)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60, interval: float = 0.005) -> None:
    """Poll `condition` until it holds. The timeout only stops a broken test from hanging; nothing is timed."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting for {what} after {timeout:g} s")
        time.sleep(interval)


def answers_ok(url: str) -> bool:
    """Whether `url` answers 200 now; a refused connection (a process still starting) is a no."""
    try:
        return httpx.get(url, timeout=10).status_code == 200
    except httpx.TransportError:
        return False


def wait_until_ok(url: str, context: Callable[[], str], timeout: float = 60) -> None:
    """Poll `url` until it answers 200; past `timeout`, fail showing `context()` (its log)."""
    try:
        wait_for(lambda: answers_ok(url), f"a 200 from {url}", timeout, interval=0.05)
    except AssertionError as exc:
        raise AssertionError(f"{exc}:\n{context()}") from None


# --- In-process: the real app, a real onnxruntime session and a real event loop, without a socket. ---


class GatedClassifier(Classifier):
    """The real classifier, whose engine runs wait until the test opens the gate.

    The test, not the clock, decides when a run ends: "one request in the engine, two queued" is a state
    the test creates and then observes, on any machine and under any load.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gate = threading.Event()
        self.gate.set()
        self._lock = threading.Lock()
        self.runs = 0  # engine runs started
        self.images = 0  # images in those runs
        self.finished = threading.Event()  # set when a run returns (or raises)
        self.fail_with: Exception | None = None  # set: runs raise it (an engine fault)

    @classmethod
    def from_dir(cls, model_dir: Path) -> GatedClassifier:
        classifier = cls.load(model_dir, 1, warm=True)
        assert isinstance(classifier, cls)
        classifier.runs = classifier.images = 0
        return classifier

    @contextmanager
    def held(self) -> Iterator[None]:
        """Engine runs wait inside this block; leaving it (an assertion failing included) lets them finish."""
        self.gate.clear()
        try:
            yield
        finally:
            self.gate.set()

    def predict(self, batch: np.ndarray, *args: object, **kwargs: object) -> np.ndarray:
        with self._lock:
            self.runs += 1
            self.images += len(batch)
        try:
            if not self.gate.wait(timeout=20):
                raise RuntimeError("the test never opened the gate")
            if self.fail_with is not None:
                raise self.fail_with
            return super().predict(batch, *args, **kwargs)  # type: ignore[arg-type]
        finally:
            self.finished.set()


def make_app(classifier: Classifier | None = None, **env: str) -> Starlette:
    """The real app, configured through the same environment variables as the service; `classifier` handed over."""
    from service.app import create_app
    from service.settings import Settings

    settings = Settings.from_env({"THREADS": "1", "WORKERS": "1", **env})
    return create_app(settings, classifier)


def asgi_client(app: Starlette) -> httpx.AsyncClient:
    # Starlette's error middleware re-raises after answering 500; the answer is what the tests check.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://service", timeout=120)


@asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """The app's lifespan (model, scheduler, pools) around an ASGI client, as uvicorn would run it."""
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        yield client


def sample(app: Starlette, name: str, **labels: str) -> float:
    value = app.state.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else float(value)


async def until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Yield to the event loop until `condition` holds (the timeout only stops a broken test from hanging)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting for {what} after {timeout:g} s")
        await asyncio.sleep(0.001)


def post_scope(path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, object]:
    """The ASGI scope uvicorn would hand the app for a POST to `path` with these headers."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("service", 80),
    }


async def asgi_post(
    app: Starlette,
    body: bytes,
    content_type: str,
    leave: asyncio.Event | None = None,
    path: str = "/infer",
    content_length: int | None = None,
) -> tuple[int, bytes]:
    """POST over raw ASGI; when `leave` is set the client disconnects (what uvicorn tells an app then).

    `content_length` declares a length other than the body's own (a client that lies, or has more to send).
    """
    length = str(len(body) if content_length is None else content_length).encode()
    scope = post_scope(path, [(b"content-type", content_type.encode()), (b"content-length", length)])
    sent_body = False
    answered = asyncio.Event()
    status, chunks = 0, []

    async def receive() -> dict[str, object]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        waits = [asyncio.ensure_future(answered.wait())]
        if leave is not None:
            waits.append(asyncio.ensure_future(leave.wait()))
        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])  # type: ignore[call-overload]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                answered.set()

    await app(scope, receive, send)  # type: ignore[arg-type]
    return status, b"".join(chunks)  # type: ignore[arg-type]
