"""Where each export variant's batch-1 time goes: onnxruntime's own profiler, op type by op type, node by node.

    python -m export --reference --keep-variants /tmp/reference-variants --out /tmp/reference-artifact
    python -m benchmarks.op_profile --variants-dir /tmp/reference-variants        (about 1 minute)

Each variant (an artifact folder written by `--keep-variants`) runs as the service runs it: one session,
one intra-op thread, batch 1, the service's session options (so QDQ pairs are fused into QLinear kernels
exactly as in production). The profiler (`SessionOptions.enable_profiling`) records every kernel of every
run; warm-up runs are dropped by their timestamps. Median latency is measured again without the profiler,
whose per-node bookkeeping costs a little. Writes results/<name>.{json,md} (default name: op_profile).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from benchmarks.report import command_line, provenance, save
from export.images import synthetic_jpegs
from service.imaging import preprocess
from service.manifest import Manifest
from service.model import session_options

RESULTS = Path(__file__).parent / "results"
TOP_NODES = 20
WARMUP = 5


def _input(manifest: Manifest, seed: int = 11) -> np.ndarray:
    blob = synthetic_jpegs(1, seed)[0]
    array = preprocess(blob, manifest.preprocessing, 1 << 40)[None]
    return array.astype(manifest.input.dtype)


def _latency_ms(model: Path, feed: dict[str, np.ndarray], runs: int) -> float:
    session = ort.InferenceSession(str(model), session_options(1), providers=["CPUExecutionProvider"])
    for _ in range(WARMUP):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def kernel_events(events: list[dict[str, Any]], skip_runs: int) -> tuple[list[dict[str, Any]], int]:
    """The node kernel events of every run after the first `skip_runs`, and how many runs that is."""
    runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"]
    )
    kept = runs[skip_runs:]
    windows = [(r["ts"], r["ts"] + r["dur"]) for r in kept]
    kernels = [
        e
        for e in events
        if e.get("cat") == "Node"
        and e.get("name", "").endswith("_kernel_time")
        and any(start <= e["ts"] <= end for start, end in windows)
    ]
    return kernels, len(kept)


def summarize(kernels: list[dict[str, Any]], runs: int) -> dict[str, Any]:
    by_node: dict[str, dict[str, Any]] = {}
    for e in kernels:
        name = e["name"].removesuffix("_kernel_time")
        node = by_node.setdefault(
            name,
            {"node": name, "op": e["args"].get("op_name", "?"), "us": 0.0, "output_shape": _shapes(e["args"])},
        )
        node["us"] += float(e["dur"])
    total_us = sum(n["us"] for n in by_node.values())
    by_op: dict[str, dict[str, float]] = defaultdict(lambda: {"nodes": 0, "us": 0.0})
    for n in by_node.values():
        by_op[n["op"]]["nodes"] += 1
        by_op[n["op"]]["us"] += n["us"]
    ops = [
        {
            "op": op,
            "nodes": int(v["nodes"]),
            "ms_per_run": round(v["us"] / runs / 1000, 3),
            "share": round(v["us"] / total_us, 4),
        }
        for op, v in sorted(by_op.items(), key=lambda kv: -kv[1]["us"])
    ]
    nodes = [
        {
            "node": n["node"],
            "op": n["op"],
            "ms_per_run": round(n["us"] / runs / 1000, 3),
            "share": round(n["us"] / total_us, 4),
            "output_shape": n["output_shape"],
        }
        for n in sorted(by_node.values(), key=lambda n: -n["us"])[:TOP_NODES]
    ]
    return {"kernel_ms_per_run": round(total_us / runs / 1000, 3), "nodes": len(by_node), "by_op": ops, "top": nodes}


def _shapes(args: dict[str, Any]) -> list[Any]:
    # Output shapes as onnxruntime records them: [{"uint8": [1, 150, 150, 40]}, ...]
    return [next(iter(s.values())) for s in args.get("output_type_shape", []) if isinstance(s, dict) and s]


def profile(model: Path, feed: dict[str, np.ndarray], runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="op-profile-") as work:
        options = session_options(1)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(work) / "profile")
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        for _ in range(WARMUP + runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    kernels, kept = kernel_events(events, WARMUP)
    if kept != runs:
        raise RuntimeError(f"the profile holds {kept} measured runs, expected {runs}")
    return summarize(kernels, runs)


def markdown(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    lines = [
        f"Command: `{result['command']}` ({result['created_at']}); {m['cpu']} (VNNI: {m['vnni']}), "
        f"onnxruntime {result['onnxruntime']}. Batch 1, one intra-op thread, the service's session options, "
        f"{result['runs']} profiled runs after {WARMUP} warm-up runs.",
        "",
        "| variant | quantization | median latency ms (no profiler) | kernel time ms/run (profiler) | nodes |",
        "|---|---|---|---|---|",
    ]
    for v in result["variants"]:
        lines.append(
            f"| {v['name']} | {v['quantization']} | {v['latency_ms']} | {v['kernel_ms_per_run']} | {v['nodes']} |"
        )
    for v in result["variants"]:
        lines += [
            "",
            f"### {v['name']}: time by op type",
            "",
            "| op type | nodes | ms/run | share |",
            "|---|---|---|---|",
        ]
        lines += [f"| {o['op']} | {o['nodes']} | {o['ms_per_run']} | {o['share']:.1%} |" for o in v["by_op"]]
        lines += [
            "",
            f"### {v['name']}: the {TOP_NODES} costliest nodes",
            "",
            "| node | op type | output shape | ms/run | share |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| `{n['node']}` | {n['op']} | {n['output_shape']} | {n['ms_per_run']} | {n['share']:.1%} |"
            for n in v["top"]
        ]
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.op_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--variants-dir", type=Path, default=Path("/tmp/reference-variants"), help="--keep-variants DIR")
    p.add_argument("--variants", nargs="+", default=["fp32", "static"], help="artifact folders under the DIR")
    p.add_argument("--runs", type=int, default=25, help="profiled runs per variant")
    p.add_argument("--name", default="op_profile", help="results/<name>.{json,md}")
    p.add_argument("--results", type=Path, default=RESULTS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result: dict[str, Any] = provenance(command_line("python -m benchmarks.op_profile", argv))
    result |= {"onnxruntime": ort.__version__, "runs": args.runs, "variants": []}
    for name in args.variants:
        folder = args.variants_dir / name
        manifest = Manifest.read(folder)
        model = folder / manifest.model.file
        feed = {manifest.input.name: _input(manifest)}
        latency = _latency_ms(model, feed, args.runs)
        summary = profile(model, feed, args.runs)
        result["variants"].append(
            {"name": name, "quantization": manifest.model.quantization, "latency_ms": round(latency, 2)} | summary
        )
        print(f"{name}: {latency:.1f} ms median, {summary['kernel_ms_per_run']} ms of kernels per run", flush=True)
    save(args.results, args.name, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
