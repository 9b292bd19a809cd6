"""The engine ceiling: onnxruntime alone on an artifact, no HTTP, no decoding.

Two ways to use 2 cores: one session run at a time over batches (intra-op threads = cores), or several
single-threaded runs at once on one shared session. The best images/s of either is what the service is
judged against.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.cpus import available_cpus
from service.manifest import Manifest
from service.model import session_options


def _percentiles(latencies_ms: list[float]) -> dict[str, float]:
    values = np.asarray(latencies_ms)
    return {f"p{p}": round(float(np.percentile(values, p)), 2) for p in (50, 95, 99)}


def _session(artifact: Path, threads: int) -> tuple[ort.InferenceSession, str]:
    manifest = Manifest.read(artifact)
    session = ort.InferenceSession(
        str(artifact / manifest.model.file), session_options(threads), providers=["CPUExecutionProvider"]
    )
    return session, manifest.input.name


def batched(artifact: Path, inputs: np.ndarray, batch: int, seconds: float) -> dict[str, Any]:
    threads = available_cpus()
    session, name = _session(artifact, threads)
    x = np.ascontiguousarray(inputs[:batch])
    session.run(None, {name: x})
    latencies, images, started = [], 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        t = time.perf_counter()
        session.run(None, {name: x})
        latencies.append((time.perf_counter() - t) * 1000)
        images += batch
    elapsed = time.perf_counter() - started
    return {
        "mode": f"batch {batch}, {threads} threads",
        "images_per_s": round(images / elapsed, 2),
        **_percentiles(latencies),
    }


def run_concurrently(
    session: ort.InferenceSession, name: str, inputs: np.ndarray, workers: int, batch: int, seconds: float
) -> tuple[list[float], float]:
    """`workers` threads calling `run` on one shared session for `seconds`: (latencies in ms, elapsed s)."""
    session.run(None, {name: inputs[:batch]})
    latencies: list[list[float]] = [[] for _ in range(workers)]
    stop = time.perf_counter() + seconds

    def work(i: int) -> None:
        k = i
        while time.perf_counter() < stop:
            start = (k * batch) % (len(inputs) - batch + 1)
            t = time.perf_counter()
            session.run(None, {name: inputs[start : start + batch]})
            latencies[i].append((time.perf_counter() - t) * 1000)
            k += workers

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [x for per in latencies for x in per], time.perf_counter() - started


def concurrent(artifact: Path, inputs: np.ndarray, workers: int, seconds: float) -> dict[str, Any]:
    session, name = _session(artifact, 1)
    latencies, elapsed = run_concurrently(session, name, inputs, workers, 1, seconds)
    return {
        "mode": f"{workers} concurrent runs x 1 thread, batch 1",
        "images_per_s": round(len(latencies) / elapsed, 2),
        **_percentiles(latencies),
    }


def ceiling(artifact: Path, inputs: np.ndarray, seconds: float, batches: tuple[int, ...] = (1, 4, 8)) -> dict[str, Any]:
    cores = available_cpus()
    runs = [batched(artifact, inputs, b, seconds) for b in batches]
    runs += [concurrent(artifact, inputs, w, seconds) for w in sorted({1, cores, 2 * cores})]
    best = max(runs, key=lambda r: r["images_per_s"])
    return {"cores": cores, "runs": runs, "best": best}
