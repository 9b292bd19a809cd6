"""A/B of service configurations or code: interleaved rounds under the same Locust load, throughput and CPU.

    python -m benchmarks.ab --variant "" --variant "WORKERS=4"             # 4 rounds, about 5 minutes
    python -m benchmarks.ab --variant "" --variant "WIDE_RUNS=never" --users 1 --neighbour   # beside a busy loop
    python -m benchmarks.ab --variant "" --variant "@HEAD~1" --users 32 --set small

A variant is environment settings for `python -m service` ("" = the defaults) and optionally one `@REV`: the
service's code from that revision, with the working tree's artifact, load and harness. Each round runs every
variant on a fresh server, in alternating order; throughput and CPU per answer come from the service's
steady-state window; the summary is the median over rounds of each variant's ratio to the first. Writes
benchmarks/results/<name>.{json,md} with --name, else under benchmarks/.cache/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import payloads
from benchmarks.harness import (
    SETTLE_S,
    TAIL_S,
    Variant,
    add_output_options,
    add_variant_option,
    alternating,
    command_line,
    destination,
    header,
    provenance,
    save,
    service_code,
    service_under_load,
)

USERS = 8  # where the curve bends on 2 cores: both cores busy, a short queue
ROLES = ("inference", "decode", "event loop", "other", "load generator")


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def summarize(variants: list[Variant], rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for variant in variants:
        runs = [r["runs"][variant.label] for r in rounds]
        windows = [r["window"] for r in runs]
        first_windows = [r["runs"][variants[0].label]["window"] for r in rounds]
        cpu = {role: statistics.median(w["cpu_ms_per_request"][role] for w in windows) for role in ROLES}
        total = [w["cpu_ms_per_request"]["all"] for w in windows]
        pairs = list(zip(windows, first_windows, strict=True))
        throughput = [_ratio(w["answered_per_s"], f["answered_per_s"]) for w, f in pairs]
        cpu_ratio = [_ratio(w["cpu_ms_per_request"]["all"], f["cpu_ms_per_request"]["all"]) for w, f in pairs]
        out.append(
            {
                "variant": variant.label,
                "answered_per_s": round(statistics.median(w["answered_per_s"] for w in windows), 2),
                "p99_over_p50": round(statistics.median(r["p99_over_p50"] or 0 for r in runs), 2),
                "errors": sum(r["errors"] for r in runs),
                "cpu_ms_per_request": {k: round(v, 2) for k, v in cpu.items()},
                "cpu_ms_per_request_total": round(statistics.median(total), 2),
                "throughput / first": round(statistics.median(x for x in throughput if x is not None), 3),
                "throughput / first by round": throughput,
                "cpu per request / first": round(statistics.median(x for x in cpu_ratio if x is not None), 3),
            }
        )
    return out


def markdown(result: dict[str, Any]) -> list[str]:
    first = result["summary"][0]["variant"]
    lines = [
        f"{header(result)} {len(result['rounds'])} rounds; each run: fresh server, {result['users']} Locust users "
        f"for {result['seconds']} s on the same cores{' beside a busy loop' if result.get('neighbour') else ''}, 48 "
        f"distinct JPEGs ({result.get('image_set', 'large')} set); throughput and CPU from the steady-state window "
        "counted by the service's /metrics.",
        "",
        f"| variant | answered/s (median) | throughput / {first} (median of rounds) | by round | p99/p50 | errors "
        "| CPU ms/request: inference | decode | event loop | other | load generator | total "
        f"| CPU per request / {first} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["summary"]:
        c = s["cpu_ms_per_request"]
        by_round = ", ".join(str(x) for x in s["throughput / first by round"])
        lines.append(
            f"| {s['variant']} | {s['answered_per_s']} | **{s['throughput / first']}** | {by_round} | "
            f"{s['p99_over_p50']} | {s['errors']} | {c['inference']} | {c['decode']} | {c['event loop']} | "
            f"{c['other']} | {c['load generator']} | {s['cpu_ms_per_request_total']} | {s['cpu per request / first']} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__.split("\n\n")[0])
    add_variant_option(parser)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=30, help="each run's Locust phase")
    parser.add_argument("--users", type=int, default=USERS, help="Locust users (concurrent clients) in each run")
    parser.add_argument("--neighbour", action="store_true", help="another process spins on one core throughout")
    parser.add_argument("--set", choices=list(payloads.SETS), default="large", help="the image set (payloads.py)")
    add_output_options(parser, "ab")
    args = parser.parse_args(argv)
    variants: list[Variant] = args.variant
    if len(variants) < 2 or len({v.label for v in variants}) != len(variants):
        parser.error("give at least two different --variant")
    if args.seconds < SETTLE_S + TAIL_S + 6 or args.users < 1:
        parser.error(f"--seconds must be at least {SETTLE_S + TAIL_S + 6:g}, --users at least 1")

    rounds = []
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.neighbour else None
    with tempfile.TemporaryDirectory(prefix="ab-") as tmp, contextlib.ExitStack() as stack:
        stack.callback(lambda: hog and (hog.kill(), hog.wait()))
        work = Path(tmp)
        code = service_code(variants, work)
        for i in range(args.rounds):
            order = alternating(variants, i)
            runs = {}
            for j, v in enumerate(order):
                runs[v.label] = service_under_load(
                    v.env, args.seconds, work, f"round{i}-{j}", args.users, code[v.label], args.set
                )
                print(f"round {i} {v.label}: {runs[v.label].get('window')}", flush=True)
            rounds.append({"round": i, "order": [v.label for v in order], "runs": runs})
    result = {
        **provenance(command_line("python -m benchmarks.ab", argv)),
        "seconds": args.seconds,
        "users": args.users,
        "neighbour": args.neighbour,
        "image_set": args.set,
        "variants": [v.label for v in variants],
        "rounds": rounds,
        "summary": summarize(variants, rounds),
    }
    save(destination(args), args.name or "ab", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
