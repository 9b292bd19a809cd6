"""Cold start, A/B: launch to the first answered `/infer`, many launches per variant, interleaved.

    python -m benchmarks.cold_start --variant "@HEAD~1" --variant ""     # about 1 minute
    python -m benchmarks.cold_start --variant "" --naive --imports        # beside the naive server and the floor

Each launch (benchmarks.harness.start) is one sample of a figure that moves by tens of milliseconds with the
machine's load. Round 0 runs every variant once uncounted (a warm page cache for all), then each round launches
each once, in alternating order. --naive adds the naive server; --imports a Python that only imports what any
Starlette + onnxruntime server imports (IMPORTS): the floor. Variants and output as in benchmarks.ab.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks import payloads
from benchmarks.harness import (
    Variant,
    add_output_options,
    add_variant_option,
    cold_start_s,
    command_line,
    destination,
    header,
    launch_rounds,
    naive_system,
    provenance,
    save,
    service_code,
    service_system,
    spread,
)

NAIVE = "naive"
IMPORTS_ONLY = "imports only"
# What the naive server imports before it can answer (uvicorn's launcher, Starlette, onnxruntime and numpy, Pillow
# through the preprocessing), and nothing of ours: no server on this stack answers before these are imported.
IMPORTS: tuple[str, ...] = ("numpy", "onnxruntime", "PIL.Image", "starlette.applications", "starlette.requests")
IMPORTS += ("starlette.responses", "starlette.routing", "uvicorn")


def launch_imports_only(log: Path) -> float:
    """Seconds from launching a Python that imports IMPORTS to the line it prints once they are imported."""
    command = [sys.executable, "-c", f"import {', '.join(IMPORTS)}; print(flush=True)"]
    launched = time.perf_counter()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as process:
        assert process.stdout is not None
        if process.stdout.readline() != b"\n":
            raise RuntimeError(f"{' '.join(command)} failed (exit status {process.wait()})")
        seconds = time.perf_counter() - launched
    return seconds


def summarize(labels: list[str], rounds: list[dict[str, float]]) -> list[dict[str, Any]]:
    ratio = "cold start / first (median of rounds)"
    return [
        {
            "variant": label,
            **spread([r[label] for r in rounds]),
            ratio: round(statistics.median(r[label] / r[labels[0]] for r in rounds), 3),
        }
        for label in labels
    ]


def markdown(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    first = result["summary"][0]["variant"]
    lines = [
        f"{header(result)} {len(result['rounds'])} counted launches per variant (after one "
        "uncounted each); cold start = process launch to the first answered `/infer` (one 640x480 JPEG), "
        "committed artifact."
        + (
            " `naive`: the naive reference server (benchmarks/baselines/naive_server.py) on the same artifact."
            if NAIVE in result["variants"]
            else ""
        )
        + (
            f" `{IMPORTS_ONLY}`: a Python that imports {', '.join(IMPORTS)}, timed from launch to the line it prints "
            "once they are imported; no model, no answer: the floor under the others."
            if IMPORTS_ONLY in result["variants"]
            else ""
        ),
        *(
            [
                f"Machine load, the 1-minute load average after each round: median {statistics.median(loads):g} "
                f"({min(loads):g} to {max(loads):g}) on {m['cores_available']} cores."
            ]
            if (loads := result.get("load_average_1min"))
            else []
        ),
        "",
        f"| variant | median s | min s | max s | cold start / {first} (median of rounds) |",
        "|---|---|---|---|---|",
    ]
    for s in result["summary"]:
        lines.append(
            f"| {s['variant']} | **{s['median_s']}** | {s['min_s']} | {s['max_s']} | "
            f"{s['cold start / first (median of rounds)']} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cold_start", description=__doc__.split("\n\n")[0])
    add_variant_option(parser)
    parser.add_argument("--launches", type=int, default=10, help="counted launches per variant")
    parser.add_argument("--naive", action="store_true", help="launch the naive reference server in every round too")
    parser.add_argument(
        "--imports", action="store_true", help="launch a Python that only imports the stack, every round (the floor)"
    )
    add_output_options(parser, "cold_start")
    args = parser.parse_args(argv)
    variants: list[Variant] = args.variant
    if len({v.label for v in variants}) != len(variants):
        parser.error("the variants must differ")
    if args.launches < 1:
        parser.error("--launches must be at least 1")

    image = payloads.image_bytes()[0]
    with tempfile.TemporaryDirectory(prefix="cold-start-") as tmp:
        work = Path(tmp)
        code = service_code(variants, work)
        launchers: list[tuple[str, Callable[[Path], float]]] = [
            (v.label, partial(cold_start_s, partial(service_system, v.label, v.env, code[v.label]), image))
            for v in variants
        ]
        if args.naive:
            launchers.append((NAIVE, partial(cold_start_s, naive_system, image)))
        if args.imports:
            launchers.append((IMPORTS_ONLY, launch_imports_only))
        rounds, loads = launch_rounds(launchers, args.launches, work)
    result = {
        **provenance(command_line("python -m benchmarks.cold_start", argv)),
        "variants": [label for label, _ in launchers],
        "rounds": rounds,
        "load_average_1min": loads,
        "summary": summarize([label for label, _ in launchers], rounds),
    }
    save(destination(args), args.name or "cold_start", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
