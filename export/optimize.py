"""Save the model with onnxruntime's portable graph optimizations already applied: the service starts faster.

Building the session spends most of its time optimizing the graph (about two thirds of it for the reference
model on a Xeon). The EXTENDED level's rewrites (QDQ pairs fused into QLinear* kernels, constant folding,
redundant nodes removed) depend on the execution provider, not on the CPU, so they are done once, here, and
saved. The layout rewrites that depend on the CPU's vector width (NCHWc, the ALL level) are not saved
(PITFALLS: a model saved after ALL is hardware-specific): the service still applies them when it loads. The
saved graph is kept only if it answers exactly as the original does on probe inputs.

    python -m export.optimize artifacts/      # an existing artifact, in place (atomically)
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from export.artifact import write_artifact
from service.manifest import Manifest, read_labels
from service.model import session_options

log = logging.getLogger("export")
LEVEL = "extended"


def _session(path: Path, *, save_to: Path | None = None) -> tuple[ort.InferenceSession, float]:
    options = session_options(1)
    if save_to is not None:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(save_to)
    started = time.perf_counter()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session, (time.perf_counter() - started) * 1000


def _probes(session: ort.InferenceSession, count: int) -> list[np.ndarray]:
    spec = session.get_inputs()[0]
    shape = [1 if not isinstance(d, int) else d for d in spec.shape]
    dtype = np.uint8 if spec.type == "tensor(uint8)" else np.float32
    rng = np.random.default_rng(0)
    probes = [rng.uniform(0, 255, shape).astype(dtype) for _ in range(count)]
    return [np.zeros(shape, dtype), np.full(shape, 255, dtype), *probes]


def preoptimize(source: Path, target: Path, probes: int = 4) -> dict[str, Any]:
    """Write `source` with EXTENDED optimizations to `target` if it answers identically; else copy it unchanged.

    Returns what was done, with the session build times of both (median of three builds each).
    """
    original, _ = _session(source)
    _session(source, save_to=target)
    optimized, _ = _session(target)
    name = original.get_inputs()[0].name
    for x in _probes(original, probes):
        want = original.run(None, {name: x})
        got = optimized.run(None, {name: x})
        if not all(np.array_equal(a, b) for a, b in zip(want, got, strict=True)):
            target.write_bytes(source.read_bytes())
            log.warning("the %s-optimized graph answers differently: the model is shipped unoptimized", LEVEL)
            return {"graph_optimization": "none", "reason": "the optimized graph did not answer identically"}
    before = statistics.median(_session(source)[1] for _ in range(3))
    after = statistics.median(_session(target)[1] for _ in range(3))
    log.info("graph saved at the %s level: the session builds in %.0f ms instead of %.0f ms", LEVEL, after, before)
    return {
        "graph_optimization": LEVEL,
        "session_build_ms": {"original": round(before, 1), "optimized": round(after, 1)},
        "identical_outputs_on_probes": probes + 2,
    }


def optimize_artifact(folder: Path) -> Manifest:
    """Replace an artifact's model with its pre-optimized graph (one atomic rename, manifest hash updated)."""
    manifest = Manifest.read(folder)
    labels = read_labels(folder, manifest.labels)
    if manifest.export.get("graph", {}).get("graph_optimization") == LEVEL:
        log.info("%s is already optimized", folder)
        return manifest
    with tempfile.TemporaryDirectory() as scratch:
        target = Path(scratch) / "model.onnx"
        report = preoptimize(folder / manifest.model.file, target)
        manifest = replace(manifest, export={**manifest.export, "graph": report})
        return write_artifact(folder, target, labels, manifest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path, help="an artifact folder (manifest.json, model, labels)")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(message)s")
    manifest = optimize_artifact(args.artifact)
    print(manifest.export["graph"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
