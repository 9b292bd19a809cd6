"""The engine ceiling: onnxruntime alone on an artifact, no HTTP, no decoding.

Two ways to use 2 cores: one session run at a time over batches (intra-op threads = cores), or several
single-threaded runs at once on one shared session. The best images/s of either is what the service is
judged against. A second reference adds the service's own JPEG decoding and resizing to each run, still
without HTTP: the gap between the two is the cost of decoding, the rest of the service's gap is HTTP.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.cpus import available_cpus
from service.imaging import preprocess
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
        "params": {"batch": batch},
        **_percentiles(latencies),
    }


def _threads_running(
    session: ort.InferenceSession, name: str, feed: Callable[[int], np.ndarray], workers: int, seconds: float
) -> tuple[list[float], float, float]:
    """`workers` threads calling `run(feed(k))` on one shared session for `seconds`.

    Thread i feeds k = i, i + workers, i + 2 * workers, ...; a latency covers `feed` and `run` both.
    Returns (latencies in ms, elapsed s, this process's CPU s meanwhile).
    """
    session.run(None, {name: feed(0)})
    latencies: list[list[float]] = [[] for _ in range(workers)]
    stop = time.perf_counter() + seconds

    def work(i: int) -> None:
        k = i
        while time.perf_counter() < stop:
            t = time.perf_counter()
            session.run(None, {name: feed(k)})
            latencies[i].append((time.perf_counter() - t) * 1000)
            k += workers

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    started, cpu_started = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies_ms = [x for per in latencies for x in per]
    return latencies_ms, time.perf_counter() - started, time.process_time() - cpu_started


def _concurrent_result(mode: str, workers: int, latencies: list[float], elapsed: float, cpu_s: float) -> dict[str, Any]:
    return {
        "mode": mode,
        "images_per_s": round(len(latencies) / elapsed, 2),
        "cpu_ms_per_image": round(cpu_s * 1000 / len(latencies), 2),
        "params": {"workers": workers},
        **_percentiles(latencies),
    }


def concurrent(artifact: Path, inputs: np.ndarray, workers: int, seconds: float) -> dict[str, Any]:
    session, name = _session(artifact, 1)
    timed = _threads_running(session, name, lambda k: inputs[k % len(inputs) : k % len(inputs) + 1], workers, seconds)
    return _concurrent_result(f"{workers} concurrent runs x 1 thread, batch 1", workers, *timed)


def rerun(artifact: Path, inputs: np.ndarray, run: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The same mode as an earlier run, measured again: a ceiling taken right next to a load phase."""
    params = run["params"]
    if "batch" in params:
        return batched(artifact, inputs, params["batch"], seconds)
    return concurrent(artifact, inputs, params["workers"], seconds)


def with_decoding(artifact: Path, images: list[bytes], workers: int, seconds: float) -> dict[str, Any]:
    """`workers` threads, each decoding and resizing a JPEG with the service's code, then running it."""
    session, name = _session(artifact, 1)
    spec = Manifest.read(artifact).preprocessing

    def feed(k: int) -> np.ndarray:
        return preprocess(images[k % len(images)], spec, 10**9)[None]

    timed = _threads_running(session, name, feed, workers, seconds)
    return _concurrent_result(f"{workers} concurrent decode+run x 1 thread, batch 1", workers, *timed)


def ceiling(
    artifact: Path,
    inputs: np.ndarray,
    seconds: float,
    images: list[bytes] | None = None,
    batches: tuple[int, ...] = (1, 4, 8),
) -> dict[str, Any]:
    cores = available_cpus()
    runs = [batched(artifact, inputs, b, seconds) for b in batches]
    runs += [concurrent(artifact, inputs, w, seconds) for w in sorted({1, cores, 2 * cores})]
    best = max(runs, key=lambda r: r["images_per_s"])
    result: dict[str, Any] = {"cores": cores, "runs": runs, "best": best}
    if images:
        decoding = [with_decoding(artifact, images, w, seconds) for w in sorted({cores, cores + 1})]
        result["with_decoding"] = max(decoding, key=lambda r: r["images_per_s"])
        result["decoding_runs"] = decoding
    return result
