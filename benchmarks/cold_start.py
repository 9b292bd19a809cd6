"""Cold start, A/B: launch to the first answered `/infer`, many launches per variant, interleaved.

    python -m benchmarks.cold_start --variant "@HEAD~1" --variant ""     # about 1 minute
    python -m benchmarks.cold_start --variant "" --launches 3 --out /tmp/x
    python -m benchmarks.cold_start --variant "" --naive                  # ours beside the naive server
    python -m benchmarks.cold_start --variant "" --naive --imports        # and the imports alone: the floor

The same measurement as the cold-start column of `python -m benchmarks.run` (benchmarks.run.start: launch
`python -m service` on the committed artifact, post one JPEG until it is answered), repeated: one launch
is one sample of a figure that moves by tens of milliseconds with the machine's load. Variants are given
as in benchmarks.ab (environment settings and/or `@REV` for another revision's `service/`). Round 0 runs
every variant once uncounted, so the page cache is warm for all; then each round launches every variant
once, in alternating order. With --naive, the naive reference server (benchmarks/baselines/naive_server.py,
the yardstick of benchmarks.sweep) is launched in every round too, as one more variant. With --imports, so is
a Python that only imports what any Starlette + onnxruntime server imports before it can answer (IMPORTS), timed
from launch to the line it prints when done: the floor under every cold start measured beside it. Writes
results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
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
from benchmarks.ab import Variant, add_variant_option, alternating, service_code
from benchmarks.report import command_line, provenance, save
from benchmarks.run import System, _free_port, local_env, start, stop
from benchmarks.sweep import NAIVE, Contender

HERE = Path(__file__).resolve().parent
IMPORTS_ONLY = "imports only"
# What the naive server imports before it can answer (uvicorn's launcher, Starlette, onnxruntime and numpy, Pillow
# through the preprocessing), and nothing of ours: no server on this stack answers before these are imported.
IMPORTS = (
    "numpy",
    "onnxruntime",
    "PIL.Image",
    "starlette.applications",
    "starlette.requests",
    "starlette.responses",
    "starlette.routing",
    "uvicorn",
)


def _time_to_first_answer(system: System, port: int, image: bytes, log: Path) -> float:
    process, seconds = start(system, f"http://127.0.0.1:{port}", image, log)
    stop(process)
    return seconds


def launch(variant: Variant, where: Path, image: bytes, log: Path) -> float:
    """Seconds from launching the service to its first answered /infer; the server is stopped after."""
    port = _free_port()
    system = System(variant.label, [sys.executable, "-m", "service"], local_env(port) | variant.env, cwd=where)
    return _time_to_first_answer(system, port, image, log)


def launch_naive(image: bytes, log: Path) -> float:
    """The same for the naive reference server (uvicorn, module-level session)."""
    port = _free_port()
    return _time_to_first_answer(Contender(NAIVE).system(port), port, image, log)


def launch_imports_only(image: bytes, log: Path) -> float:
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
    first = labels[0]
    out = []
    for label in labels:
        values = [r[label] for r in rounds]
        ratios = [r[label] / r[first] for r in rounds]
        out.append(
            {
                "variant": label,
                "median_s": round(statistics.median(values), 3),
                "min_s": round(min(values), 3),
                "max_s": round(max(values), 3),
                "cold start / first (median of rounds)": round(statistics.median(ratios), 3),
            }
        )
    return out


def markdown(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    first = result["summary"][0]["variant"]
    lines = [
        f"Command: `{result['command']}` ({result['created_at']}); {m['cpu']}, {m['cores_available']} cores "
        f"available, Python {m['python']}. {len(result['rounds'])} counted launches per variant (after one "
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
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default="cold_start")
    args = parser.parse_args(argv)
    variants: list[Variant] = args.variant
    if len({v.label for v in variants}) != len(variants):
        parser.error("the variants must differ")
    if args.launches < 1:
        parser.error("--launches must be at least 1")

    image = payloads.image_bytes()[0]
    rounds: list[dict[str, float]] = []
    loads: list[float] = []  # the machine's 1-minute load average after each counted round
    with tempfile.TemporaryDirectory(prefix="cold-start-") as tmp:
        work = Path(tmp)
        code = service_code(variants, work)
        launchers: list[tuple[str, Callable[[bytes, Path], float]]] = [
            (v.label, partial(launch, v, code[v.label])) for v in variants
        ]
        if args.naive:
            launchers.append((NAIVE, launch_naive))
        if args.imports:
            launchers.append((IMPORTS_ONLY, launch_imports_only))
        for i in range(args.launches + 1):
            seconds = {label: run(image, work / f"{i}.log") for label, run in alternating(launchers, i)}
            print(f"launch {i}{' (not counted)' if i == 0 else ''}: {seconds}", flush=True)
            if i:
                rounds.append(seconds)
                loads.append(round(os.getloadavg()[0], 2))
    result = {
        **provenance(command_line("python -m benchmarks.cold_start", argv)),
        "variants": [label for label, _ in launchers],
        "rounds": rounds,
        "load_average_1min": loads,
        "summary": summarize([label for label, _ in launchers], rounds),
    }
    save(args.out, args.name, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
