"""How closely an ONNX variant answers like the Keras model, how fast it runs, and the gate it must pass."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from export.convert import INPUT_NAME
from service.model import session_options

_EPS = 1e-12


@dataclass(frozen=True)
class Thresholds:
    fp32_max_abs_diff: float = 1e-3
    min_top1_agreement: float = 0.98
    min_cosine: float = 0.97


@dataclass(frozen=True)
class Parity:
    images: int
    max_abs_diff: float
    top1_agreement: float
    probability_cosine: float
    logit_cosine: float


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + _EPS)


def _centred_logits(probabilities: np.ndarray) -> np.ndarray:
    # log p differs from the logits by a per-row constant; centring removes it, so this is exact
    # without needing the pre-softmax tensor.
    logp = np.log(np.clip(probabilities.astype(np.float64), 1e-30, None))
    return logp - logp.mean(-1, keepdims=True)


def compare(reference: np.ndarray, candidate: np.ndarray) -> Parity:
    return Parity(
        images=len(reference),
        max_abs_diff=float(np.abs(reference - candidate).max()),
        top1_agreement=float((reference.argmax(-1) == candidate.argmax(-1)).mean()),
        probability_cosine=float(_cosine(reference, candidate).mean()),
        logit_cosine=float(_cosine(_centred_logits(reference), _centred_logits(candidate)).mean()),
    )


def failures(variant: str, parity: Parity, thresholds: Thresholds, trained: bool) -> list[str]:
    """Why `variant` fails the gate; empty if it passes."""
    problems = []
    if variant == "fp32":
        if parity.max_abs_diff > thresholds.fp32_max_abs_diff:
            problems.append(f"max |Δp| {parity.max_abs_diff:.2e} > {thresholds.fp32_max_abs_diff:.2e}")
        return problems
    if trained:
        if parity.top1_agreement < thresholds.min_top1_agreement:
            problems.append(f"top-1 agreement {parity.top1_agreement:.3f} < {thresholds.min_top1_agreement:.3f}")
        if parity.probability_cosine < thresholds.min_cosine:
            problems.append(f"probability cosine {parity.probability_cosine:.4f} < {thresholds.min_cosine:.4f}")
    # An untrained model's outputs are near-uniform: top-1 is a coin toss between ties, so judge the logits.
    elif parity.logit_cosine < thresholds.min_cosine:
        problems.append(f"logit cosine {parity.logit_cosine:.4f} < {thresholds.min_cosine:.4f}")
    return problems


def onnx_predict(path: Path, arrays: np.ndarray, batch: int = 8) -> np.ndarray:
    session = ort.InferenceSession(str(path), session_options(0), providers=["CPUExecutionProvider"])
    output = session.get_outputs()[0].name
    parts = [
        session.run([output], {INPUT_NAME: _as_input(arrays[i : i + batch], session)})[0]
        for i in range(0, len(arrays), batch)
    ]
    return np.concatenate(parts).astype(np.float32)


@dataclass(frozen=True)
class Timing:
    latency_ms: float  # median wall time of a batch-1 run
    cpu_ms: float  # median CPU time of the same runs


def latencies_ms(paths: dict[str, Path], sample: np.ndarray, rounds: int = 5, runs: int = 8) -> dict[str, Timing]:
    """Batch-1 timings of each model with one intra-op thread: the service's per-worker configuration.

    The models take turns, `runs` runs each per round, so that a spell of load from elsewhere on the machine
    slows them all alike instead of whichever was being timed. With one intra-op thread onnxruntime runs the
    whole graph on the calling thread, so that thread's CPU time is a run's cost even on a busy machine,
    where wall time also counts the time other processes held the core.
    """
    sessions = {
        name: ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
        for name, path in paths.items()
    }
    feeds = {name: {s.get_inputs()[0].name: _as_input(sample[:1], s)} for name, s in sessions.items()}
    wall: dict[str, list[float]] = {name: [] for name in sessions}
    cpu: dict[str, list[float]] = {name: [] for name in sessions}
    for name, session in sessions.items():
        for _ in range(3):
            session.run(None, feeds[name])
    for _ in range(rounds):
        for name, session in sessions.items():
            for _ in range(runs):
                started, started_cpu = time.perf_counter(), time.thread_time()
                session.run(None, feeds[name])
                wall[name].append((time.perf_counter() - started) * 1000)
                cpu[name].append((time.thread_time() - started_cpu) * 1000)
    return {name: Timing(statistics.median(wall[name]), statistics.median(cpu[name])) for name in sessions}


def _as_input(arrays: np.ndarray, session: ort.InferenceSession) -> np.ndarray:
    """float32 pixels as the model takes them: rounded to uint8 for a uint8-input model."""
    if session.get_inputs()[0].type == "tensor(uint8)":
        return np.clip(np.rint(arrays), 0, 255).astype(np.uint8)
    return arrays.astype(np.float32, copy=False)


def as_dict(parity: Parity) -> dict[str, Any]:
    return {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in asdict(parity).items()}


def preprocessing_vs_tensorflow(images: list[bytes], height: int, width: int) -> dict[str, dict[str, float]]:
    """Mean and max |Δ| (0..255 scale) between our decode + resize options and the Keras training pipeline's
    `tf.image.resize(tf.io.decode_image(...))`, so the manifest's choice is a measured one."""
    from dataclasses import replace

    import tensorflow as tf

    from service.imaging import preprocess
    from service.manifest import Preprocessing

    theirs = [
        tf.image.resize(tf.io.decode_image(data, channels=3, expand_animations=False), (height, width)).numpy()
        for data in images
    ]
    base = Preprocessing(height=height, width=width)
    results: dict[str, dict[str, float]] = {}
    for resize in ("bilinear_tf", "bilinear"):
        for draft in (False, True):
            spec = replace(base, resize=resize, jpeg_draft=draft)
            diffs = [np.abs(preprocess(data, spec, 1 << 40) - ref) for data, ref in zip(images, theirs, strict=True)]
            key = resize + ("+jpeg_draft" if draft else "")
            results[key] = {
                "mean_abs": round(float(np.mean([d.mean() for d in diffs])), 4),
                "max_abs": round(float(max(d.max() for d in diffs)), 4),
            }
    return results
