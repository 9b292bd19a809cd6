"""How close the service gets to the engine, and where the rest goes: repeated, interleaved rounds.

    python -m benchmarks.saturation              # 5 rounds, about 6 minutes
    python -m benchmarks.saturation --rounds 2 --seconds 5
    python -m benchmarks.saturation --naive      # the naive reference server under the same load too
    python -m benchmarks.saturation --classify 2000  # `python -m service.classify` on 2,000 JPEGs each round

Each round, back to back on the same cores (machines drift 10-20% within minutes): the engine ceiling, the engine
with decoding (the service's own preprocessing, no HTTP: the most the service could reach), with --classify
`python -m service.classify`, the service under 8 Locust users (its rate over a steady-state window), with
--naive the naive server, and the ceiling again. Ratios are against the mean of the two ceilings, medians over
rounds; each phase records CPU ms per image or per answered request by thread (docs/benchmarks.md). Writes
benchmarks/results/<name>.{json,md} (saturation by default: benchmarks.capacity reads it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import engine, harness, payloads
from service.cpus import available_cpus
from service.imaging import preprocess
from service.manifest import Manifest


def _ceiling(artifact: Path, inputs: np.ndarray, cores: int, seconds: float) -> dict[str, Any]:
    runs = [engine.concurrent(artifact, inputs, n, seconds) for n in (cores, 2 * cores)]
    return max(runs, key=lambda r: float(r["images_per_s"]))


def classify(folder: Path) -> dict[str, Any]:
    """`python -m service.classify` over `folder`: its own rate (its summary), peak RSS, other work meanwhile."""
    before = dataclasses.replace(harness.snapshot(os.getpid()), process_s=0)  # this process and its children: ours
    command = [sys.executable, "-m", "service.classify", str(folder), "--quiet", "--out", os.devnull]
    with subprocess.Popen(command, cwd=harness.ROOT, stderr=subprocess.PIPE, text=True) as process:
        summary = process.stderr.read() if process.stderr else ""
        _, status, usage = os.wait4(process.pid, 0)  # its own peak RSS, not the largest of every child's
        process.returncode = os.waitstatus_to_exitcode(status)
    rate = re.search(r"classified (\d+) of \1 images .*\(([\d.]+) images/s\)", summary)
    if rate is None:
        raise RuntimeError(f"service.classify failed on {folder}: {summary}")
    work = harness.other_work(before, dataclasses.replace(harness.snapshot(os.getpid()), process_s=0))
    cpu_ms = round((usage.ru_utime + usage.ru_stime) * 1000 / int(rate[1]), 2)  # the model's load included
    return {"images": int(rate[1]), "images_per_s": float(rate[2]), "cpu_ms_per_image": cpu_ms,
            "peak_rss_mb": usage.ru_maxrss // 1024, "other_work": work}  # fmt: skip


def _round(
    index: int, inputs: np.ndarray, images: list[bytes], args: argparse.Namespace, work: Path, folder: Path | None
) -> dict[str, Any]:
    seconds, load_s, artifact, cores = args.seconds, args.load_seconds, harness.ROOT / "artifacts", available_cpus()
    before = _ceiling(artifact, inputs, cores, seconds)
    decoding = engine.with_decoding(artifact, images, cores, seconds)
    batch = classify(folder) if folder is not None else None  # right after its bound, on the same cores
    load = harness.service_under_load({}, load_s, work, tag := f"round-{index}")
    baseline = harness.under_load(harness.naive_system, load_s, work, f"{tag}-naive") if args.naive else None
    after = _ceiling(artifact, inputs, cores, seconds)
    ceiling = (before["images_per_s"] + after["images_per_s"]) / 2
    engine_cpu = (before["cpu_ms_per_image"] + after["cpu_ms_per_image"]) / 2
    steady = load["window"]
    if not steady["answered"]:
        raise RuntimeError(f"round {index}: the service answered nothing in its window; see {work}/round-{index}.log")
    service, cpu = steady["answered_per_s"], steady["cpu_ms_per_request"]
    row = {
        "round": index, "engine_before": before["images_per_s"], "engine_after": after["images_per_s"],
        "engine_with_decoding": decoding["images_per_s"], "service_answered_per_s": service,
        "service_locust_ok_per_s": load["ok_per_s"], "service_errors": load["errors"],
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
    }  # fmt: skip
    if batch is not None:
        per_image = decoding["cpu_ms_per_image"] / batch["cpu_ms_per_image"]
        row |= {
            "classify": batch,
            "classify / engine with decoding": round(batch["images_per_s"] / decoding["images_per_s"], 3),
            "classify / service answered": round(batch["images_per_s"] / service, 3),
            "engine with decoding CPU / classify CPU": round(per_image, 3),
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


RATIOS = ("decoding / engine", "service / engine", "service / engine with decoding",
          "service (Locust's count) / engine", "engine CPU per image / service CPU per request")  # fmt: skip
CLASSIFY_RATIOS = ("classify / engine with decoding", "classify / service answered",
                   "engine with decoding CPU / classify CPU")  # fmt: skip
NAIVE_RATIOS = (
    "naive / engine with decoding",
    "1.2 x naive / engine with decoding",
    "service (Locust's count) / naive",
)
ENGINE_CPU = ("engine per image", "engine with decoding per image")
CPU_PARTS = ("inference", "decode", "event loop", "load generator", "all")


def _row(*cells: object) -> str:
    return "|" + "|".join(f" {cell} " if cell != "" else " " for cell in cells) + "|"


def markdown(result: dict[str, Any]) -> list[str]:
    median, rounds, cpu = result["median"], result["rounds"], result["median_cpu_ms"]
    lines = [
        f"{harness.header(result)} Engine phases {result['seconds']} s, load phases {result['load_s']} s "
        "(8 Locust users on the same cores as the server, 48 distinct JPEGs, multipart `image`); the service's "
        "rate is its steady-state window, counted by its own /metrics.",
        "",
        _row("round", "engine before img/s", "engine with decoding img/s", "service answered/s", "engine after img/s",
             *RATIOS), "|---|---|---|---|---|---|---|---|---|---|",
        *(_row(r["round"], r["engine_before"], r["engine_with_decoding"], r["service_answered_per_s"],
               r["engine_after"], *(r[k] for k in RATIOS)) for r in rounds),
        _row("**median**", "", "", "", "", *(f"**{median[k]}**" for k in RATIOS)),
    ]  # fmt: skip
    if "naive / engine with decoding" in median:
        lines += [
            "",
            "The naive reference server under the same load (`--naive`), by Locust's count. Where 1.2 x naive / engine "
            "with decoding is above 1, 1.2x the naive server is more than the engine alone can do with decoding, "
            "without HTTP and without Locust on the cores:",
            "",
            _row("round", "naive answered/s (Locust)", "naive errors", *NAIVE_RATIOS), "|---|---|---|---|---|---|",
            *(_row(r["round"], r["naive_locust_ok_per_s"], r["naive_errors"], *(r[k] for k in NAIVE_RATIOS))
              for r in rounds),
            _row("**median**", "", "", *(f"**{median[k]}**" for k in NAIVE_RATIOS)),
        ]  # fmt: skip
    return lines + [
        *(f"`python -m service.classify` round {r['round']}: {r['classify']}, {({k: r[k] for k in CLASSIFY_RATIOS})}"
          for r in rounds if "classify" in r),
        "",
        "CPU milliseconds per image (engine) and per answered request (service, by thread, and the Locust process):",
        "",
        "| round | engine | engine with decoding | service: inference | decode | event loop | Locust | all |",
        "|---|---|---|---|---|---|---|---|",
        *(_row(r["round"], *(r["cpu_ms"][k] for k in ENGINE_CPU), *(r["cpu_ms"]["service per request"][k]
               for k in CPU_PARTS)) for r in rounds),
        _row(*(f"**{k}**" for k in ("median", *(cpu[k] for k in (*ENGINE_CPU, *CPU_PARTS))))),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.saturation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=8.0, help="each engine phase")
    parser.add_argument("--load-seconds", type=int, default=20, help="each service phase")
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    parser.add_argument("--name", default="saturation")
    parser.add_argument("--naive", action="store_true", help="the naive reference server under the same load too")
    parser.add_argument("--classify", type=int, metavar="N", help="service.classify on N JPEGs (links after 2,000)")
    args = parser.parse_args(argv)
    if args.load_seconds < (minimum := harness.SETTLE_S + harness.TAIL_S + 4):
        parser.error(f"--load-seconds must be at least {minimum:g}: the steady-state window needs room")

    images = payloads.image_bytes()
    spec = Manifest.read(harness.ROOT / "artifacts").preprocessing
    inputs = np.stack([preprocess(b, spec, 10**9) for b in images[:16]])
    engine.concurrent(harness.ROOT / "artifacts", inputs, available_cpus(), args.seconds)  # uncounted: warms the caches
    with tempfile.TemporaryDirectory(prefix="saturation-") as tmp:
        work, folder = Path(tmp), Path(tmp) / "photos" if args.classify else None
        if folder is not None:  # distinct JPEGs of the large set's sizes; past 2,000, links to them again
            distinct = payloads.image_paths(min(args.classify, 2000))
            folder.mkdir()
            for i in range(args.classify):
                (folder / f"{i:05d}.jpg").symlink_to(distinct[i % len(distinct)])
        rounds = [_round(i, inputs, images, args, work, folder) for i in range(args.rounds)]
    cpu = [r["cpu_ms"] | r["cpu_ms"]["service per request"] for r in rounds]  # the engine's and the service's parts
    result = {
        **harness.provenance(harness.command_line("python -m benchmarks.saturation", argv)),
        "seconds": args.seconds,
        "load_s": args.load_seconds,
        "rounds": rounds,
        "median": {
            k: round(statistics.median(r[k] for r in rounds), 3)
            for k in (*RATIOS, *(NAIVE_RATIOS if args.naive else ()), *(CLASSIFY_RATIOS if args.classify else ()))
            if all(r.get(k) is not None for r in rounds)
        },
        "median_cpu_ms": {k: round(statistics.median(c[k] for c in cpu), 2) for k in (*ENGINE_CPU, *CPU_PARTS)},
    }
    harness.save(args.out, args.name, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
