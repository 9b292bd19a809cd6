"""How close the service gets to the engine, and where the rest goes: repeated, interleaved rounds.

    python -m benchmarks.saturation              # 5 rounds, about 6 minutes
    python -m benchmarks.saturation --rounds 2 --seconds 5
    python -m benchmarks.saturation --naive      # the naive reference server under the same load too

The machines are shared and their speed drifts by 10-20% within minutes, so one ceiling at the start of a
long run is a weak yardstick. Each round here measures, back to back on the same cores:

1. the engine ceiling (onnxruntime alone on preprocessed arrays; the better of one and two single-threaded
   runs per core, the modes that win in benchmarks/engine.py),
2. the engine with decoding: the same runs, each first decoding and resizing a JPEG with the service's
   own code (no HTTP), i.e. the most the service could reach if HTTP and the load generator were free,
3. the service under Locust (same JPEGs, multipart, 8 users), with Locust on the same cores; its rate is
   taken over a steady-state window counted by the service itself (benchmarks.harness.window),
4. with --naive: the naive reference server (benchmarks/baselines/naive_server.py) under the same Locust load,
   its rate by Locust's count: whether "1.2x the naive server" (issue 12) fits under the engine-with-decoding
   bound at all (2: no HTTP, no load generator on the cores),
5. the engine ceiling again.

Ratios in a round are against the mean of 1 and 5; the result is the median over rounds. An uncounted engine
phase comes first, so round 0 does not pay for cold caches.

Each phase also records CPU milliseconds per image (engine) or per answered request (service, by thread:
inference, decode, event loop; and the Locust process). Those drift far less than throughput, and they
show where the gap goes: the engine pays only for inference, the service also for everything around it.
Writes benchmarks/results/<name>.{json,md} (saturation by default: benchmarks.capacity reads it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import engine, payloads
from benchmarks.harness import (
    RESULTS,
    ROOT,
    SETTLE_S,
    TAIL_S,
    command_line,
    header,
    naive_system,
    provenance,
    save,
    service_under_load,
    under_load,
)
from service.cpus import available_cpus
from service.imaging import preprocess
from service.manifest import Manifest


def _ceiling(artifact: Path, inputs: np.ndarray, cores: int, seconds: float) -> dict[str, Any]:
    runs = [engine.concurrent(artifact, inputs, n, seconds) for n in (cores, 2 * cores)]
    return max(runs, key=lambda r: float(r["images_per_s"]))


def _round(
    index: int, inputs: np.ndarray, images: list[bytes], seconds: float, load_s: int, work: Path, naive: bool
) -> dict[str, Any]:
    artifact = ROOT / "artifacts"
    cores = available_cpus()
    before = _ceiling(artifact, inputs, cores, seconds)
    decoding = engine.with_decoding(artifact, images, cores, seconds)
    load = service_under_load({}, images, load_s, work, f"round-{index}")
    baseline = under_load(naive_system, images, load_s, work, f"round-{index}-naive") if naive else None
    after = _ceiling(artifact, inputs, cores, seconds)
    ceiling = (before["images_per_s"] + after["images_per_s"]) / 2
    engine_cpu = (before["cpu_ms_per_image"] + after["cpu_ms_per_image"]) / 2
    steady = load["window"]
    if not steady["answered"]:
        raise RuntimeError(f"round {index}: the service answered nothing in its window; see {work}/round-{index}.log")
    service = steady["answered_per_s"]
    cpu = steady["cpu_ms_per_request"]
    row = {
        "round": index,
        "engine_before": before["images_per_s"],
        "engine_after": after["images_per_s"],
        "engine_with_decoding": decoding["images_per_s"],
        "service_answered_per_s": service,
        "service_locust_ok_per_s": load["ok_per_s"],
        "service_errors": load["errors"],
        "service_p99_over_p50": load["p99_over_p50"],
        "cpu_ms": {
            "engine per image": round(engine_cpu, 2),
            "engine with decoding per image": decoding["cpu_ms_per_image"],
            "service per request": cpu,
        },
        "machine_idle_in_service_window": steady["machine_idle"],
        "decoding / engine": round(decoding["images_per_s"] / ceiling, 3),
        "service / engine": round(service / ceiling, 3),
        "service / engine with decoding": round(service / decoding["images_per_s"], 3),
        "service (Locust's count) / engine": round(load["ok_per_s"] / ceiling, 3),
        "engine CPU per image / service CPU per request": round(engine_cpu / cpu["all"], 3),
    }
    if baseline is not None:
        rate = baseline["ok_per_s"]
        row |= {
            "naive_locust_ok_per_s": rate,
            "naive_errors": baseline["errors"],
            "naive / engine with decoding": round(rate / decoding["images_per_s"], 3),
            "1.2 x naive / engine with decoding": round(1.2 * rate / decoding["images_per_s"], 3),
            "service (Locust's count) / naive": round(load["ok_per_s"] / rate, 3) if rate else None,
        }
    print(json.dumps(row), flush=True)
    return row


RATIOS = (
    "decoding / engine",
    "service / engine",
    "service / engine with decoding",
    "service (Locust's count) / engine",
    "engine CPU per image / service CPU per request",
)
NAIVE_RATIOS = (
    "naive / engine with decoding",
    "1.2 x naive / engine with decoding",
    "service (Locust's count) / naive",
)
ENGINE_CPU = ("engine per image", "engine with decoding per image")
CPU_PARTS = ("inference", "decode", "event loop", "load generator", "all")


def markdown(result: dict[str, Any]) -> list[str]:
    median = result["median"]
    lines = [
        f"{header(result)} Engine phases {result['seconds']} s, load phases {result['load_s']} s "
        "(8 Locust users on the same cores as the server, 48 distinct JPEGs, multipart `image`); the service's "
        "rate is its steady-state window, counted by its own /metrics.",
        "",
        "| round | engine before img/s | engine with decoding img/s | service answered/s | engine after img/s "
        "| decoding / engine | service / engine | service / engine with decoding | service (Locust's count) / engine "
        "| engine CPU per image / service CPU per request |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rounds"]:
        lines.append(
            f"| {r['round']} | {r['engine_before']} | {r['engine_with_decoding']} | {r['service_answered_per_s']} | "
            f"{r['engine_after']} | " + " | ".join(str(r[k]) for k in RATIOS) + " |"
        )
    lines.append("| **median** | | | | | " + " | ".join(f"**{median[k]}**" for k in RATIOS) + " |")
    if "naive / engine with decoding" in median:
        lines += [
            "",
            "The naive reference server under the same load (`--naive`), by Locust's count. Where 1.2 x naive / engine "
            "with decoding is above 1, 1.2x the naive server is more than the engine alone can do with decoding, "
            "without HTTP and without Locust on the cores:",
            "",
            "| round | naive answered/s (Locust) | naive errors | " + " | ".join(NAIVE_RATIOS) + " |",
            "|---|---|---|---|---|---|",
        ]
        for r in result["rounds"]:
            lines.append(
                f"| {r['round']} | {r['naive_locust_ok_per_s']} | {r['naive_errors']} | "
                + " | ".join(str(r[k]) for k in NAIVE_RATIOS)
                + " |"
            )
        lines.append("| **median** | | | " + " | ".join(f"**{median[k]}**" for k in NAIVE_RATIOS) + " |")
    lines += [
        "",
        "CPU milliseconds per image (engine) and per answered request (service, by thread, and the Locust process):",
        "",
        "| round | engine | engine with decoding | service: inference | decode | event loop | Locust | all |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rounds"]:
        c = r["cpu_ms"]
        lines.append(
            f"| {r['round']} | {c['engine per image']} | {c['engine with decoding per image']} | "
            + " | ".join(str(c["service per request"][k]) for k in CPU_PARTS)
            + " |"
        )
    cpu = result["median_cpu_ms"]
    lines.append(
        f"| **median** | **{cpu['engine per image']}** | **{cpu['engine with decoding per image']}** | "
        + " | ".join(f"**{cpu[k]}**" for k in CPU_PARTS)
        + " |"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.saturation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=8.0, help="each engine phase")
    parser.add_argument("--load-seconds", type=int, default=20, help="each service phase")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="saturation")
    parser.add_argument("--naive", action="store_true", help="the naive reference server under the same load too")
    args = parser.parse_args(argv)
    if args.load_seconds < SETTLE_S + TAIL_S + 4:
        minimum = SETTLE_S + TAIL_S + 4
        parser.error(f"--load-seconds must be at least {minimum:g}: the steady-state window needs room")

    images = payloads.image_bytes()
    spec = Manifest.read(ROOT / "artifacts").preprocessing
    inputs = np.stack([preprocess(b, spec, 10**9) for b in images[:16]])
    engine.concurrent(ROOT / "artifacts", inputs, available_cpus(), args.seconds)  # uncounted: warms the caches
    with tempfile.TemporaryDirectory(prefix="saturation-") as tmp:
        work, naive = Path(tmp), args.naive
        rounds = [_round(i, inputs, images, args.seconds, args.load_seconds, work, naive) for i in range(args.rounds)]
    cpu = [r["cpu_ms"] | r["cpu_ms"]["service per request"] for r in rounds]  # the engine's and the service's parts
    result = {
        **provenance(command_line("python -m benchmarks.saturation", argv)),
        "seconds": args.seconds,
        "load_s": args.load_seconds,
        "rounds": rounds,
        "median": {
            k: round(statistics.median(r[k] for r in rounds), 3)
            for k in (*RATIOS, *(NAIVE_RATIOS if args.naive else ()))
            if all(r.get(k) is not None for r in rounds)
        },
        "median_cpu_ms": {k: round(statistics.median(c[k] for c in cpu), 2) for k in (*ENGINE_CPU, *CPU_PARTS)},
    }
    save(args.out, args.name, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
