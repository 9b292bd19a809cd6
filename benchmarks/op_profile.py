"""Where each export variant's batch-1 time goes: onnxruntime's own profiler, op type by op type, node by node.

    python -m export --reference --keep-variants /tmp/reference-variants --out /tmp/reference-artifact
    python -m benchmarks.op_profile --variants-dir /tmp/reference-variants        (about 1 minute)
    python -m benchmarks.op_profile --kernels      (the swish and rescaling alternatives alone, seconds)

Each variant (an artifact folder written by `--keep-variants`) runs as the service runs it: one session,
one intra-op thread, batch 1, the service's session options (so QDQ pairs are fused into QLinear kernels
exactly as in production). The profiler (`SessionOptions.enable_profiling`) records every kernel of every
run; the variants are run in turns, warm-up runs are dropped by their timestamps, and each node's figure is
its median over the runs.
Latency is measured again without the profiler, whose per-node bookkeeping costs a little, as wall time and
as the calling thread's CPU time. Writes results/<name>.{json,md} (default name: op_profile).
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
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

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


def _latency_ms(model: Path, feed: dict[str, np.ndarray], runs: int) -> tuple[float, float]:
    """Median wall and thread-CPU milliseconds per run. With one intra-op thread onnxruntime runs the whole
    graph on the calling thread, so its CPU time is the run's cost even while other jobs share the cores."""
    session = ort.InferenceSession(str(model), session_options(1), providers=["CPUExecutionProvider"])
    for _ in range(WARMUP):
        session.run(None, feed)
    wall, cpu = [], []
    for _ in range(runs):
        started, started_cpu = time.perf_counter(), time.thread_time()
        session.run(None, feed)
        wall.append((time.perf_counter() - started) * 1000)
        cpu.append((time.thread_time() - started_cpu) * 1000)
    return statistics.median(wall), statistics.median(cpu)


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
    """Per node, the median of its kernel times over the runs: a run preempted by another job on the machine
    inflates one sample of each node it hit, not the figure."""
    samples: dict[str, list[float]] = defaultdict(list)
    info: dict[str, dict[str, Any]] = {}
    for e in kernels:
        name = e["name"].removesuffix("_kernel_time")
        samples[name].append(float(e["dur"]))
        info.setdefault(name, {"op": e["args"].get("op_name", "?"), "output_shape": _shapes(e["args"])})
    us = {name: statistics.median(values) for name, values in samples.items()}
    total_us = sum(us.values())
    by_op: dict[str, dict[str, float]] = defaultdict(lambda: {"nodes": 0, "us": 0.0})
    for name, value in us.items():
        by_op[info[name]["op"]]["nodes"] += 1
        by_op[info[name]["op"]]["us"] += value
    ops = [
        {
            "op": op,
            "nodes": int(v["nodes"]),
            "ms_per_run": round(v["us"] / 1000, 3),
            "share": round(v["us"] / total_us, 4),
        }
        for op, v in sorted(by_op.items(), key=lambda kv: -kv[1]["us"])
    ]
    nodes = [
        {
            "node": name,
            "op": info[name]["op"],
            "ms_per_run": round(value / 1000, 3),
            "share": round(value / total_us, 4),
            "output_shape": info[name]["output_shape"],
        }
        for name, value in sorted(us.items(), key=lambda kv: -kv[1])
    ]
    return {"kernel_ms_per_run": round(total_us / 1000, 3), "nodes": len(us), "by_op": ops, "all_nodes": nodes}


def _shapes(args: dict[str, Any]) -> list[Any]:
    # Output shapes as onnxruntime records them: [{"uint8": [1, 150, 150, 40]}, ...]
    return [next(iter(s.values())) for s in args.get("output_type_shape", []) if isinstance(s, dict) and s]


def profile_in_turns(
    models: dict[str, tuple[Path, dict[str, np.ndarray]]], runs: int, rounds: int = 5
) -> dict[str, Any]:
    """Profile every model in turns (`runs` / `rounds` runs each per round), so that load from elsewhere on the
    machine falls on all of them alike; likewise the unprofiled wall and CPU medians."""
    per_round = max(1, runs // rounds)
    with tempfile.TemporaryDirectory(prefix="op-profile-") as work:
        plain, profiled = {}, {}
        for name, (model, _) in models.items():
            plain[name] = ort.InferenceSession(str(model), session_options(1), providers=["CPUExecutionProvider"])
            options = session_options(1)
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(work) / name)
            profiled[name] = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        for name, (_, feed) in models.items():
            for _ in range(WARMUP):
                plain[name].run(None, feed)
                profiled[name].run(None, feed)
        wall: dict[str, list[float]] = defaultdict(list)
        cpu: dict[str, list[float]] = defaultdict(list)
        for _ in range(rounds):
            for name, (_, feed) in models.items():
                for _ in range(per_round):
                    started, started_cpu = time.perf_counter(), time.thread_time()
                    plain[name].run(None, feed)
                    wall[name].append((time.perf_counter() - started) * 1000)
                    cpu[name].append((time.thread_time() - started_cpu) * 1000)
                for _ in range(per_round):
                    profiled[name].run(None, feed)
        results = {}
        for name, session in profiled.items():
            events = json.loads(Path(session.end_profiling()).read_text())
            kernels, kept = kernel_events(events, WARMUP)
            if kept != per_round * rounds:
                raise RuntimeError(f"{name}: the profile holds {kept} measured runs, expected {per_round * rounds}")
            results[name] = {
                "latency_ms": round(statistics.median(wall[name]), 2),
                "cpu_ms": round(statistics.median(cpu[name]), 2),
            } | summarize(kernels, kept)
    return results


FLOAT_CONVS = ("Conv", "FusedConv")
INT8_CONVS = ("QLinearConv",)


def conv_classes(fp32: list[dict[str, Any]], int8: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Convolutions grouped by output size, float against int8, to see which kind gains from int8.

    The float graph runs in onnxruntime's NCHWc layout ([1, C, H, W], C padded to a multiple of 8), the int8
    graph in NHWC: both are keyed (H, W, C rounded up to 8)."""

    def key(node: dict[str, Any], nchw: bool) -> tuple[int, int, int]:
        shape = node["output_shape"][0]
        h, w, c = (shape[2], shape[3], shape[1]) if nchw else (shape[1], shape[2], shape[3])
        return h, w, -(-c // 8) * 8

    groups: dict[tuple[int, int, int], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for nodes, ops, nchw, side in ((fp32, FLOAT_CONVS, True, "fp32"), (int8, INT8_CONVS, False, "int8")):
        for n in nodes:
            if n["op"] in ops and n["output_shape"] and len(n["output_shape"][0]) == 4:
                g = groups[key(n, nchw)]
                g[f"{side}_nodes"] += 1
                g[f"{side}_ms"] += n["ms_per_run"]
    rows = []
    for (h, w, c), g in sorted(groups.items(), key=lambda kv: -kv[1]["int8_ms"]):
        fp, q = round(g["fp32_ms"], 3), round(g["int8_ms"], 3)
        rows.append(
            {
                "output_hwc": [h, w, c],
                "fp32_nodes": int(g["fp32_nodes"]),
                "fp32_ms": fp,
                "int8_nodes": int(g["int8_nodes"]),
                "int8_ms": q,
                "int8_over_fp32": round(q / fp, 2) if fp else None,
            }
        )
    return rows


def markdown(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    lines = [
        f"Command: `{result['command']}` ({result['created_at']}); {m['cpu']} (VNNI: {m['vnni']}), "
        f"onnxruntime {result['onnxruntime']}. Batch 1, one intra-op thread, the service's session options, "
        f"{result['runs']} profiled runs after {WARMUP} warm-up runs, the variants in turns (5 rounds).",
        "",
        "Latency and CPU: medians without the profiler (CPU: the calling thread's CPU time, which is the run's "
        "whole cost with one intra-op thread). Kernel times: per node, the median over the profiled runs.",
        "",
        "| variant | quantization | latency ms | CPU ms | kernel ms/run (profiler) | nodes |",
        "|---|---|---|---|---|---|",
    ]
    for v in result["variants"]:
        lines.append(
            f"| {v['name']} | {v['quantization']} | {v['latency_ms']} | {v['cpu_ms']} | {v['kernel_ms_per_run']} "
            f"| {v['nodes']} |"
        )
    for name, rows in result.get("conv_classes", {}).items():
        lines += [
            "",
            f"### Convolutions, fp32 against {name}, by output size (C rounded up to 8; int8: QLinearConv only)",
            "",
            "| output H x W x C | fp32 nodes | fp32 ms/run | int8 nodes | int8 ms/run | int8 / fp32 |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {' x '.join(map(str, r['output_hwc']))} | {r['fp32_nodes']} | {r['fp32_ms']} | {r['int8_nodes']} | "
            f"{r['int8_ms']} | {r['int8_over_fp32']} |"
            for r in rows
        ]
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


def _kernel_models() -> dict[str, tuple[onnx.ModelProto, np.ndarray]]:
    """Alternatives for two things the profile singled out, each as a one-node-or-few model.

    Swish on a uint8 tensor of the shape of EfficientNetV2-B3's first blocks: the QLinearSigmoid x QLinearMul
    pair the int8 graph runs, a 256-entry lookup table (Cast + Gather: one uint8 input has only 256 values),
    and the swish in float between DequantizeLinear and QuantizeLinear. The input rescaling's per-channel Add:
    its constant shaped [1, 1, 1, 3] as exported, and tiled along the width to [1, 1, W, 3].
    """
    shape = [1, 150, 150, 40]
    u8 = onnx.TensorProto.UINT8
    x_u8 = helper.make_tensor_value_info("x", u8, shape)
    y_u8 = helper.make_tensor_value_info("y", u8, shape)
    scalars = [
        numpy_helper.from_array(np.array(v, dtype), name)
        for name, v, dtype in (
            ("s", 0.05, np.float32),
            ("z", 128, np.uint8),
            ("s_sig", 1 / 256, np.float32),
            ("z_sig", 0, np.uint8),
            ("s_out", 0.03, np.float32),
            ("z_out", 10, np.uint8),
        )
    ]
    table = numpy_helper.from_array(np.arange(256, dtype=np.uint8), "table")
    graphs = {
        "swish: QLinearSigmoid + QLinearMul (int8 graph)": [
            helper.make_node("QLinearSigmoid", ["x", "s", "z", "s_sig", "z_sig"], ["sig"], domain="com.microsoft"),
            helper.make_node(
                "QLinearMul", ["x", "s", "z", "sig", "s_sig", "z_sig", "s_out", "z_out"], ["y"], domain="com.microsoft"
            ),
        ],
        "swish: 256-entry table, Cast + Gather": [
            helper.make_node("Cast", ["x"], ["index"], to=onnx.TensorProto.INT32),
            helper.make_node("Gather", ["table", "index"], ["y"], axis=0),
        ],
        "swish: float between DequantizeLinear and QuantizeLinear": [
            helper.make_node("DequantizeLinear", ["x", "s", "z"], ["f"]),
            helper.make_node("Sigmoid", ["f"], ["sig"]),
            helper.make_node("Mul", ["f", "sig"], ["m"]),
            helper.make_node("QuantizeLinear", ["m", "s_out", "z_out"], ["y"]),
        ],
    }
    rng = np.random.default_rng(0)
    models = {}
    for name, nodes in graphs.items():
        graph = helper.make_graph(nodes, "swish", [x_u8], [y_u8], [*scalars, table])
        models[name] = (_model(graph), rng.integers(0, 256, shape, dtype=np.uint8))
    image = [1, 300, 300, 3]
    for label, constant_shape in (
        ("[1, 1, 1, 3] as exported", (1, 1, 1, 3)),
        ("tiled to [1, 1, 300, 3]", (1, 1, 300, 3)),
    ):
        constant = numpy_helper.from_array(
            np.tile(np.float32([-0.485, -0.456, -0.406]), constant_shape[2]).reshape(constant_shape), "c"
        )
        graph = helper.make_graph(
            [helper.make_node("Add", ["x", "c"], ["y"])],
            "rescale",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, image)],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, image)],
            [constant],
        )
        models[f"input rescaling Add, constant {label}"] = (_model(graph), rng.uniform(0, 1, image).astype(np.float32))
    return models


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )


def kernels(runs: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="op-kernels-") as work:
        for name, (model, x) in _kernel_models().items():
            path = Path(work) / "m.onnx"
            onnx.save(model, str(path))
            wall, cpu = _latency_ms(path, {"x": x}, runs)
            rows.append(
                {"kernel": name, "input_shape": list(x.shape), "latency_ms": round(wall, 3), "cpu_ms": round(cpu, 3)}
            )
            print(rows[-1], flush=True)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.op_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--variants-dir", type=Path, default=Path("/tmp/reference-variants"), help="--keep-variants DIR")
    p.add_argument("--variants", nargs="+", default=["fp32", "static"], help="artifact folders under the DIR")
    p.add_argument("--runs", type=int, default=25, help="profiled runs per variant")
    p.add_argument("--name", default="op_profile", help="results/<name>.{json,md}")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument(
        "--kernels",
        action="store_true",
        help="instead: time the swish and rescaling alternatives alone (results/<name>-kernels)",
    )
    p.add_argument("--all-nodes", type=Path, metavar="FILE", help="also write every node's time here (JSON)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result: dict[str, Any] = provenance(command_line("python -m benchmarks.op_profile", argv))
    result |= {"onnxruntime": ort.__version__, "runs": args.runs}
    if args.kernels:
        result["kernels"] = kernels(args.runs * 4)
        lines = [
            f"Command: `{result['command']}` ({result['created_at']}); {result['machine']['cpu']} "
            f"(VNNI: {result['machine']['vnni']}), onnxruntime {result['onnxruntime']}. Each alternative alone as a "
            f"small model, one intra-op thread, the service's session options, median of {args.runs * 4} runs.",
            "",
            "| kernel | input shape | latency ms | CPU ms |",
            "|---|---|---|---|",
            *(f"| {r['kernel']} | {r['input_shape']} | {r['latency_ms']} | {r['cpu_ms']} |" for r in result["kernels"]),
        ]
        save(args.results, f"{args.name}-kernels", result, lines)
        return result
    result["variants"] = []
    all_nodes: dict[str, list[dict[str, Any]]] = {}
    models, quantization = {}, {}
    for name in args.variants:
        folder = args.variants_dir / name
        manifest = Manifest.read(folder)
        models[name] = (folder / manifest.model.file, {manifest.input.name: _input(manifest)})
        quantization[name] = manifest.model.quantization
    for name, summary in profile_in_turns(models, args.runs).items():
        nodes = summary.pop("all_nodes")
        result["variants"].append(
            {"name": name, "quantization": quantization[name]} | summary | {"top": nodes[:TOP_NODES]}
        )
        all_nodes[name] = nodes
        print(
            f"{name}: {summary['latency_ms']} ms, {summary['cpu_ms']} ms CPU, {summary['kernel_ms_per_run']} ms kernels"
        )
    if "fp32" in all_nodes:
        result["conv_classes"] = {
            name: conv_classes(all_nodes["fp32"], nodes) for name, nodes in all_nodes.items() if name != "fp32"
        }
    if args.all_nodes:
        args.all_nodes.write_text(json.dumps(all_nodes, indent=1) + "\n")
    save(args.results, args.name, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
