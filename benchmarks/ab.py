"""A/B of service configurations: interleaved rounds under the same Locust load, throughput and CPU per request.

    python -m benchmarks.ab --variant "" --variant "WORKERS=4"             # 4 rounds, about 5 minutes
    python -m benchmarks.ab --variant "" --variant "DECODE_THREADS=1" --rounds 6 --name ab-decode-threads

Each variant is a space-separated list of environment settings for `python -m service` ("" = the defaults).
Every round runs each variant once, in an order that alternates from round to round (A B, B A, ...), so a
machine that speeds up or slows down during the run favours neither. Each run: fresh server, uncounted
warm-up, then 8 Locust users; throughput and CPU per answered request come from a steady-state window
(benchmarks/window.py). The summary is the median over rounds of each variant's ratio to the first one,
measured in the same round. Writes results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import machine, payloads, window
from benchmarks.report import save
from benchmarks.run import service_under_load

HERE = Path(__file__).resolve().parent
USERS = 8
ROLES = ("inference", "decode", "event loop", "other", "load generator")


def parse_variant(text: str) -> dict[str, str]:
    env = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{item!r} is not KEY=VALUE")
        env[key] = value
    return env


def label(env: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in env.items()) or "defaults"


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def summarize(variants: list[dict[str, str]], rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for env in variants:
        name = label(env)
        runs = [r["runs"][name] for r in rounds]
        firsts = [r["runs"][label(variants[0])] for r in rounds]
        windows, first_windows = [r["window"] for r in runs], [r["window"] for r in firsts]
        cpu = {role: statistics.median(w["cpu_ms_per_request"][role] for w in windows) for role in ROLES}
        total = [w["cpu_ms_per_request"]["all"] for w in windows]
        first_total = [w["cpu_ms_per_request"]["all"] for w in first_windows]
        throughput = [
            _ratio(w["answered_per_s"], f["answered_per_s"]) for w, f in zip(windows, first_windows, strict=True)
        ]
        cpu_ratio = [_ratio(t, f) for t, f in zip(total, first_total, strict=True)]
        out.append(
            {
                "variant": name,
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
    m = result["machine"]
    first = result["summary"][0]["variant"]
    lines = [
        f"Command: `{result['command']}` ({result['created_at']}); {m['cpu']}, {m['cores_available']} cores "
        f"available, Python {m['python']}. {len(result['rounds'])} rounds; each run: fresh server, {USERS} Locust "
        f"users for {result['seconds']} s on the same cores, 48 distinct JPEGs; throughput and CPU from the "
        "steady-state window counted by the service's /metrics.",
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
    parser.add_argument("--variant", action="append", type=parse_variant, required=True, help='e.g. "WORKERS=4"')
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=30, help="each run's Locust phase")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default="ab")
    args = parser.parse_args(argv)
    variants: list[dict[str, str]] = args.variant
    if len(variants) < 2 or len({label(v) for v in variants}) != len(variants):
        parser.error("give at least two different --variant")
    if args.seconds < window.SETTLE_S + window.TAIL_S + 6:
        parser.error(f"--seconds must be at least {window.SETTLE_S + window.TAIL_S + 6:g}")

    images = payloads.image_bytes()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="ab-") as tmp:
        for i in range(args.rounds):
            order = variants if i % 2 == 0 else variants[::-1]
            runs = {}
            for j, env in enumerate(order):
                runs[label(env)] = service_under_load(env, images, args.seconds, Path(tmp), f"round{i}-{j}", USERS)
                print(f"round {i} {label(env)}: {runs[label(env)]['window']}", flush=True)
            rounds.append({"round": i, "order": [label(v) for v in order], "runs": runs})
    given = sys.argv[1:] if argv is None else argv
    result = {
        "command": " ".join(["python -m benchmarks.ab", *(f'"{a}"' if " " in a or not a else a for a in given)]),
        "created_at": datetime.now(UTC).replace(microsecond=0).isoformat(),
        "machine": machine.describe(),
        "seconds": args.seconds,
        "variants": [label(v) for v in variants],
        "rounds": rounds,
        "summary": summarize(variants, rounds),
    }
    save(args.out, args.name, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
