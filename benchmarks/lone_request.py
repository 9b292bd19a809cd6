"""One client, side by side: our service and the naive server up together, their requests alternated in blocks.

    python -m benchmarks.lone_request                                   # small set, 8 rounds of 25 requests each
    python -m benchmarks.lone_request --set large --rounds 12
    python -m benchmarks.lone_request --variant "" --variant @HEAD~1    # two revisions of ours, and the naive server

The sweep's 1-client point measures each server alone for 20 s, one after the other: a difference of a
millisecond or two in 30 is then at the edge of what one run resolves, since the machine drifts between the
two. Here every system is launched once and kept warm, and one client sends a block of requests to each in
turn (the order reversed every round), so each round's ratio compares like with like. The client is a plain
keep-alive HTTP client, sequential, no think time: nothing else runs on the cores.

Beside the client's latencies, each system's CPU per request by what its threads do (benchmarks/cpu.py: the
event loop, our decode and inference threads, and the others: onnxruntime's intra-op pool, the naive
server's thread pool), and for ours where the time goes inside the server (its /metrics: decoding,
the engine run, the whole request). Writes results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import cpu, payloads
from benchmarks.ab import Variant, alternating, parse_variant, service_code
from benchmarks.report import command_line, provenance, save
from benchmarks.run import _free_port, multipart_request, start, stop
from benchmarks.sweep import Contender, contenders

HERE = Path(__file__).resolve().parent
# Our service's histograms whose mean is where a request's time goes inside the server.
INSIDE = {
    "decode_ms": ("image_decode_seconds", {}),
    "engine_run_ms": ("inference_seconds", {}),
    "request_ms": ("http_request_duration_seconds", {"route": "/infer"}),
}


@dataclass
class Running:
    contender: Contender
    process: subprocess.Popen[bytes]
    url: str
    client: httpx.Client
    latencies_ms: list[float]


def histogram_sums(text: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of each INSIDE histogram in a /metrics page."""
    found: dict[str, tuple[float, float]] = {}
    for family in text_string_to_metric_families(text):
        for key, (name, labels) in INSIDE.items():
            if family.name != name:
                continue
            samples = [s for s in family.samples if all(s.labels.get(k) == v for k, v in labels.items())]
            total = sum(s.value for s in samples if s.name == f"{name}_sum")
            count = sum(s.value for s in samples if s.name == f"{name}_count")
            found[key] = (total, count)
    return found


def inside_ms(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    means = {}
    for key, (total, count) in after.items():
        total0, count0 = before.get(key, (0.0, 0.0))
        if count > count0:
            means[key] = round((total - total0) / (count - count0) * 1000, 2)
    return means


def post(running: Running, image: bytes) -> float:
    path, request = multipart_request(image)
    started = time.perf_counter()
    response = running.client.post(f"{running.url}{path}", **request)
    elapsed = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise RuntimeError(f"{running.contender.name} answered {response.status_code}: {response.text[:300]}")
    return elapsed


def _cpu_ms(before: cpu.Snapshot, after: cpu.Snapshot, requests: int) -> dict[str, float]:
    """CPU per request by what the threads do (benchmarks/cpu.py: "other" is onnxruntime's intra-op pool and
    the naive server's thread pool), and the server's total; no load generator is watched here."""
    used = cpu.per_item_ms(before, after, requests)
    return {k: v for k, v in used.items() if k not in ("load generator", "all") and v > 0}


def _p50(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def median_interval(values: list[float], draws: int = 4000, level: float = 0.95) -> tuple[float, float]:
    """A percentile-bootstrap interval for the median of `values` (the rounds' ratios), seeded: whether a run
    resolves a difference of 1%, or the rounds' spread (0.93-1.08 on a small image) hides it."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    tail = (1 - level) / 2
    return round(medians[int(tail * draws)], 3), round(medians[min(draws - 1, int((1 - tail) * draws))], 3)


def measure(systems: list[Running], images: list[bytes], rounds: int, block: int, warmup: int) -> dict[str, Any]:
    for running in systems:
        for i in range(warmup):
            post(running, images[i % len(images)])
    ours = [r for r in systems if r.contender.variant is not None]
    cpu_before = {r.contender.name: cpu.snapshot(r.process.pid) for r in systems}
    metrics_before = {r.contender.name: histogram_sums(r.client.get(f"{r.url}/metrics").text) for r in ours}
    per_round: list[dict[str, float]] = []
    for round_index in range(rounds):
        p50s = {}
        for running in alternating(systems, round_index):
            latencies = [post(running, images[(round_index * block + i) % len(images)]) for i in range(block)]
            running.latencies_ms += latencies
            p50s[running.contender.name] = _p50(latencies)
        per_round.append(p50s)
    requests = rounds * block
    results = []
    for running in systems:
        name = running.contender.name
        row: dict[str, Any] = {
            "system": name,
            "requests": requests,
            "p50_ms": _p50(running.latencies_ms),
            "mean_ms": round(statistics.fmean(running.latencies_ms), 2),
            "p90_ms": round(statistics.quantiles(running.latencies_ms, n=10)[-1], 2),
            "cpu_ms_per_request": _cpu_ms(cpu_before[name], cpu.snapshot(running.process.pid), requests),
        }
        if running in ours:
            after = histogram_sums(running.client.get(f"{running.url}/metrics").text)
            row["inside_ms"] = inside_ms(metrics_before[name], after)
        results.append(row)
    naive = next(r for r in systems if r.contender.variant is None)
    ratios = []
    for running in ours:
        name = running.contender.name
        each = [round(r[name] / r[naive.contender.name], 3) for r in per_round]
        ratios.append({
            "system": name,
            "p50 / naive, median of rounds": round(statistics.median(each), 3),
            "95% interval of that median (bootstrap over rounds)": median_interval(each),
            "p50 / naive, pooled": round(_p50(running.latencies_ms) / _p50(naive.latencies_ms), 3),
            "rounds": each,
        })  # fmt: skip
    return {"systems": results, "rounds": per_round, "ratios": ratios}


def markdown(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    lines = [
        f"Command: `{result['command']}` ({result['created_at']}); {m['cpu']}, {m['cores_available']} cores "
        f"available, Python {m['python']}.",
        f"All systems up at once and warmed ({result['warmup']} requests each); then {result['rounds_run']} rounds, "
        f"each sending {result['block']} requests in turn to every system (order reversed every round), one "
        f"sequential keep-alive client, image set **{result['set']}** ({', '.join(result['sizes'])}; 48 JPEGs). "
        "Latency is the client's, from sending the request to reading the whole answer.",
        "",
        "| system | requests | p50 ms | mean ms | p90 ms | CPU ms per request, by role "
        "| inside the server (ours: /metrics means) |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for s in result["systems"]:
        cpu = ", ".join(f"{k} {v}" for k, v in s["cpu_ms_per_request"].items())
        inside = ", ".join(f"{k.removesuffix('_ms').replace('_', ' ')} {v}" for k, v in s.get("inside_ms", {}).items())
        lines.append(
            f"| {s['system']} | {s['requests']} | {s['p50_ms']} | {s['mean_ms']} | {s['p90_ms']} | {cpu} | {inside} |"
        )
    lines += ["", "**Ours / naive**, p50 (below 1 favours ours):", ""]
    lines += [
        "| system | median of the rounds' ratios | its 95% interval (bootstrap over rounds) | min | max "
        "| all requests pooled |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in result["ratios"]:
        each = r["rounds"]
        low, high = r["95% interval of that median (bootstrap over rounds)"]
        lines.append(
            f"| {r['system']} | **{r['p50 / naive, median of rounds']}** | {low}-{high} | {min(each)} | {max(each)} | "
            f"{r['p50 / naive, pooled']} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lone_request", description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", choices=list(payloads.SETS), default="small", help="image set (default small)")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of one block per system (default 8)")
    parser.add_argument("--block", type=int, default=25, help="requests per system per round (default 25)")
    parser.add_argument("--warmup", type=int, default=40, help="uncounted requests per system first (default 40)")
    parser.add_argument(
        "--variant", action="append", type=parse_variant, help='ours, as in benchmarks.ab: "", "THREADS=1", "@HEAD~1"'
    )
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default="lone-request", help="result file name (default lone-request)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.block < 2 or args.warmup < 0:
        parser.error("--rounds must be at least 1, --block at least 2, --warmup at least 0")
    variants: list[Variant] = args.variant or [Variant()]
    if len({v.label for v in variants}) != len(variants):
        parser.error("the variants must differ")
    images = payloads.image_set(args.set)
    with tempfile.TemporaryDirectory(prefix="lone-request-") as tmp:
        work = Path(tmp)
        systems: list[Running] = []
        try:
            for contender in contenders(variants, service_code(variants, work)):  # the naive server last
                port = _free_port()
                url = f"http://127.0.0.1:{port}"
                log = work / f"{contender.name.replace(' ', '_').replace('/', '_')}.log"
                process, _ = start(contender.system(port), url, images[0], log)
                systems.append(Running(contender, process, url, httpx.Client(timeout=60), []))
            measured = measure(systems, images, args.rounds, args.block, args.warmup)
        finally:
            for running in systems:
                running.client.close()
                stop(running.process)
    result: dict[str, Any] = {
        **provenance(command_line("python -m benchmarks.lone_request", argv)),
        "set": args.set,
        "sizes": [f"{w}x{h}" for w, h in payloads.SETS[args.set][0]],
        "rounds_run": args.rounds,
        "block": args.block,
        "warmup": args.warmup,
        **measured,
    }
    lines = markdown(result)
    save(args.out, args.name, result, lines)
    print("\n".join(lines[-len(result["ratios"]) - 2 :]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
