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
    parts = [session.run([output], {INPUT_NAME: arrays[i : i + batch]})[0] for i in range(0, len(arrays), batch)]
    return np.concatenate(parts).astype(np.float32)


def latency_ms(path: Path, sample: np.ndarray, runs: int = 20) -> float:
    """Median batch-1 latency with one intra-op thread: the service's per-worker configuration."""
    session = ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
    feed = {INPUT_NAME: sample[:1]}
    for _ in range(3):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


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
