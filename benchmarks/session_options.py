"""Which onnxruntime session options serve the shipped INT8 model fastest on this machine.

    python -m benchmarks.session_options        (about 1 minute)

Engine only (no HTTP): each configuration runs `workers` threads calling `run` on one shared session for a
few seconds, batch 1 unless stated; optionally with one more thread decoding JPEGs the whole time, since in
the service decoding competes with the engine for the same cores. Writes results/session_options.{json,md}.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from benchmarks import payloads
from benchmarks.engine import run_concurrently
from benchmarks.report import save
from service.imaging import preprocess
from service.manifest import Manifest
from service.model import session_options

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
SECONDS = 5.0


def _options(threads: int, tweak: Callable[[ort.SessionOptions], None] | None = None) -> ort.SessionOptions:
    options = session_options(threads)
    if tweak:
        tweak(options)
    return options


def no_spinning(options: ort.SessionOptions) -> None:
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")


def extended(options: ort.SessionOptions) -> None:
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED


def no_arena(options: ort.SessionOptions) -> None:
    options.enable_cpu_mem_arena = False


def parallel(options: ort.SessionOptions) -> None:
    options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    options.inter_op_num_threads = 2


CONFIGS: list[tuple[str, int, int, int, Callable[[ort.SessionOptions], None] | None]] = [
    # name, workers, intra-op threads, batch, tweak
    ("2 workers x 1 thread (service default)", 2, 1, 1, None),
    ("1 worker x 2 threads", 1, 2, 1, None),
    ("1 worker x 2 threads, no spinning", 1, 2, 1, no_spinning),
    ("2 workers x 2 threads, no spinning", 2, 2, 1, no_spinning),
    ("4 workers x 1 thread", 4, 1, 1, None),
    ("2 workers x 1 thread, batch 2", 2, 1, 2, None),
    ("2 workers x 1 thread, batch 4", 2, 1, 4, None),
    ("2 workers x 1 thread, EXTENDED optimization", 2, 1, 1, extended),
    ("2 workers x 1 thread, no memory arena", 2, 1, 1, no_arena),
    ("1 worker x 1 thread, parallel execution mode", 1, 1, 1, parallel),
]


def decode_load(stop: threading.Event, images: list[bytes], manifest: Manifest) -> None:
    k = 0
    while not stop.is_set():
        preprocess(images[k % len(images)], manifest.preprocessing, 10**9)
        k += 1


def measure(
    model: Path,
    inputs: np.ndarray,
    workers: int,
    threads: int,
    batch: int,
    tweak: Any,
    decode: Callable[[], None] | None,
) -> dict[str, float]:
    session = ort.InferenceSession(str(model), _options(threads, tweak), providers=["CPUExecutionProvider"])
    stop_decode = threading.Event()
    decoder = threading.Thread(target=decode, args=(stop_decode,)) if decode else None
    if decoder:
        decoder.start()
    latencies, elapsed, _ = run_concurrently(session, session.get_inputs()[0].name, inputs, workers, batch, SECONDS)
    stop_decode.set()
    if decoder:
        decoder.join()
    return {"images_per_s": round(len(latencies) * batch / elapsed, 2)}


def main() -> None:
    manifest = Manifest.read(ROOT / "artifacts")
    images = payloads.image_bytes()
    inputs = np.stack([preprocess(b, manifest.preprocessing, 10**9) for b in images[:16]])
    model = ROOT / "artifacts" / manifest.model.file
    rows = []
    for name, workers, threads, batch, tweak in CONFIGS:
        alone = measure(model, inputs, workers, threads, batch, tweak, None)
        busy = measure(model, inputs, workers, threads, batch, tweak, lambda stop: decode_load(stop, images, manifest))
        rows.append({"config": name, "engine_only": alone["images_per_s"], "with_decoding": busy["images_per_s"]})
        print(rows[-1], flush=True)
    lines = [
        f"Shipped INT8 artifact, {SECONDS:g} s per run. Command: `python -m benchmarks.session_options`",
        "",
        "| configuration | img/s, engine only | img/s, one thread decoding JPEGs alongside |",
        "|---|---|---|",
        *(f"| {r['config']} | {r['engine_only']} | {r['with_decoding']} |" for r in rows),
    ]
    save(RESULTS, "session_options", {"seconds": SECONDS, "rows": rows}, lines)


if __name__ == "__main__":
    main()
