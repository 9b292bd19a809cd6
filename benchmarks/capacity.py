"""A capacity plan from the committed benchmark results: replicas, cores and memory for a load and a p99 target.

    python -m benchmarks.capacity --rps 1000 --p99-ms 300

Nothing is measured here: the inputs come from `latest.json` (benchmarks.run) and `saturation.json`
(benchmarks.saturation), and every figure names the file and field it came from. A replica is c = cores servers
in an M/M/c queue (p99 wait ln(C / 0.01) / (c*mu - lambda), C the Erlang C probability) plus the measured p99 of
one request alone, run at the highest utilization within the target (at most --max-utilization), plus --spare
replicas. Exponential service times err on the safe side. docs/scaling.md explains the plan.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS, ROOT, command_line, provenance, save

MIB = 1024 * 1024
SYSTEM = "service-int8"
OVERLOAD = "service-int8 at 4x overload"
# The worker shape of the default service (one single-threaded run per core), as benchmarks.run names it.
SERVICE_TIME_MODE = "2 concurrent decode+run x 1 thread, batch 1"


class PlanError(ValueError):
    """The inputs cannot give a plan: a missing result, or a target the measured replica cannot meet."""


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _source(value: float, file: str, field: str) -> dict[str, Any]:
    return {"value": value, "file": file, "field": field}


def _system(result: dict[str, Any], name: str, file: str) -> dict[str, Any]:
    for system in result["systems"]:
        if system["system"] == name:
            return dict(system)
    raise PlanError(f"{file} has no system {name!r} (systems: {', '.join(s['system'] for s in result['systems'])})")


def read_inputs(results: Path) -> dict[str, dict[str, Any]]:
    """The measured figures the plan uses, each with the file and field it came from."""
    try:
        latest = json.loads((results / "latest.json").read_text())
        saturation = json.loads((results / "saturation.json").read_text())
    except FileNotFoundError as exc:
        raise PlanError(f"missing benchmark result {exc.filename}: run python -m benchmarks.run / saturation") from None
    lf, sf = _shown(results / "latest.json"), _shown(results / "saturation.json")
    service = _system(latest, SYSTEM, lf)
    overload = _system(latest, OVERLOAD, lf)
    index = latest["systems"].index(next(s for s in latest["systems"] if s["system"] == SYSTEM))
    overload_index = latest["systems"].index(next(s for s in latest["systems"] if s["system"] == OVERLOAD))
    runs = [r for r in latest["engine"].get("decoding_runs", []) if r["mode"] == SERVICE_TIME_MODE]
    if not runs:
        raise PlanError(f"{lf} has no engine.decoding_runs entry {SERVICE_TIME_MODE!r}")
    run_index = latest["engine"]["decoding_runs"].index(runs[0])
    rounds = [r["service_answered_per_s"] for r in saturation["rounds"]]
    cpu = saturation["median_cpu_ms"]
    return {
        "replica_rps": _source(service["ok_per_s"], lf, f"systems[{index}].ok_per_s ({SYSTEM})"),
        "replica_users": _source(service["users"], lf, f"systems[{index}].users"),
        "replica_p99_ms": _source(service["p99_ms"], lf, f"systems[{index}].p99_ms"),
        "replica_cores": _source(latest["machine"]["cores_available"], lf, "machine.cores_available"),
        "peak_rss_mb_overload": _source(overload["rss"]["peak_mb"], lf, f"systems[{overload_index}].rss.peak_mb"),
        "cold_start_s": _source(service["cold_start_s"], lf, f"systems[{index}].cold_start_s"),
        "service_time_p99_ms": _source(runs[0]["p99"], lf, f"engine.decoding_runs[{run_index}].p99"),
        "saturation_rps_median": _source(
            round(statistics.median(rounds), 2), sf, f"median of rounds[*].service_answered_per_s ({len(rounds)})"
        ),
        "cpu_ms_per_request": _source(
            round(cpu["all"] - cpu["load generator"], 2), sf, "median_cpu_ms.all - median_cpu_ms['load generator']"
        ),
    }


def erlang_c(servers: int, offered: float) -> float:
    """Probability that an arrival waits in an M/M/c queue (offered load in erlangs, below `servers`)."""
    below = sum(offered**k / math.factorial(k) for k in range(servers))
    top = offered**servers / math.factorial(servers) * servers / (servers - offered)
    return top / (below + top)


def p99_ms(utilization: float, replica_rps: float, cores: int, service_p99_ms: float) -> float:
    """Estimated p99 answer time of one replica at this utilization: M/M/c p99 wait + measured service p99."""
    arrival, rate = utilization * replica_rps, replica_rps / cores
    waiting = erlang_c(cores, arrival / rate)
    wait_s = max(0.0, math.log(waiting / 0.01) / (cores * rate - arrival)) if waiting > 0.01 else 0.0
    return wait_s * 1000 + service_p99_ms


def max_utilization(target_ms: float, replica_rps: float, cores: int, service_p99_ms: float, cap: float) -> float:
    """The highest utilization (to 0.001, at most `cap`) whose estimated p99 is within the target."""
    if p99_ms(0.001, replica_rps, cores, service_p99_ms) > target_ms:
        raise PlanError(
            f"a p99 of {target_ms:g} ms is below what one request takes alone here ({service_p99_ms} ms p99 for "
            "decode + inference): more replicas cannot help, a faster engine or smaller images can"
        )
    low, high = 0.001, cap
    if p99_ms(high, replica_rps, cores, service_p99_ms) <= target_ms:
        return high
    while high - low > 0.0005:
        middle = (low + high) / 2
        low, high = (middle, high) if p99_ms(middle, replica_rps, cores, service_p99_ms) <= target_ms else (low, middle)
    return math.floor(low * 1000) / 1000


def round_up_mib(mib: float, step: int = 64) -> int:
    return int(math.ceil(mib / step) * step)


def replica_memory(
    peak_rss_mb: float, max_connections: int, max_upload_bytes: int, max_decode_bytes: int, decodes: int
) -> dict:
    """Memory request (the measured peak + 25%) and limit (the worst case the settings allow), MiB."""
    peak_mib = peak_rss_mb * 1e6 / MIB  # the benchmarks report RSS in MB (10^6 bytes)
    bodies_mib = max_connections * max_upload_bytes / MIB
    decoding_mib = decodes * max_decode_bytes / MIB
    return {
        "peak_rss_mib": round(peak_mib, 1),
        "request_mib": round_up_mib(peak_mib * 1.25),
        "bodies_mib": round(bodies_mib, 1),
        "decoding_mib": round(decoding_mib, 1),
        "limit_mib": round_up_mib(peak_mib + bodies_mib + decoding_mib),
    }


def plan(
    inputs: dict[str, dict[str, Any]],
    rps: float,
    target_ms: float,
    spare: int,
    cap: float,
    memory: dict[str, Any],
    min_replicas: int,
) -> dict[str, Any]:
    replica_rps = min(inputs["replica_rps"]["value"], inputs["saturation_rps_median"]["value"])
    cores = int(inputs["replica_cores"]["value"])
    service_p99 = inputs["service_time_p99_ms"]["value"]
    utilization = max_utilization(target_ms, replica_rps, cores, service_p99, cap)
    per_replica = replica_rps * utilization
    needed = math.ceil(rps / per_replica)
    replicas = max(min_replicas, needed + spare)
    return {
        "rps": rps,
        "p99_target_ms": target_ms,
        "replica_rps_at_saturation": replica_rps,
        "utilization": utilization,
        "hpa_cpu_target_percent": int(utilization * 100) // 5 * 5,
        "replica_rps_planned": round(per_replica, 2),
        "estimated_p99_ms": round(p99_ms(utilization, replica_rps, cores, service_p99), 1),
        "replicas_for_load": needed,
        "replicas": replicas,
        "cores": replicas * cores,
        "cores_by_cpu_time": round(rps * inputs["cpu_ms_per_request"]["value"] / 1000 / utilization, 1),
        "memory_request_gib": round(replicas * memory["request_mib"] / 1024, 2),
        "memory_limit_gib": round(replicas * memory["limit_mib"] / 1024, 2),
    }


def markdown(result: dict[str, Any]) -> list[str]:
    i, m, p = result["inputs"], result["memory_per_replica"], result["plan"]
    lines = [
        f"Command: `{result['command']}` ({result['created_at']}). Nothing measured here: the inputs below are "
        "read from committed benchmark results.",
        "",
        "| input | value | from |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {src['value']} | `{src['file']}` {src['field']} |" for name, src in i.items()]
    lines += [
        "",
        f"Replica: {int(i['replica_cores']['value'])} cores (CPU request = limit), "
        f"{p['replica_rps_at_saturation']} answers/s at saturation (the lower of latest.json and the saturation "
        f"median). Memory per replica: request {m['request_mib']} MiB (peak RSS at 4x overload, "
        f"{m['peak_rss_mib']} MiB, + 25%), limit {m['limit_mib']} MiB (that peak + "
        f"{result['settings']['MAX_CONNECTIONS']} bodies of MAX_UPLOAD_BYTES, {m['bodies_mib']} MiB, + "
        f"{result['settings']['decodes at once']} decodings of MAX_DECODE_BYTES at once, {m['decoding_mib']} MiB).",
        "",
        f"Latency model: M/M/{int(i['replica_cores']['value'])} queue per replica plus the measured p99 of one "
        f"decode + inference ({i['service_time_p99_ms']['value']} ms). Highest utilization within "
        f"{p['p99_target_ms']:g} ms: **{p['utilization']}** (estimated p99 {p['estimated_p99_ms']} ms); "
        f"HPA CPU target {p['hpa_cpu_target_percent']}%. Spare replicas: {result['spare']}.",
        "",
        "| load | p99 target ms | answers/s per replica | replicas (for load + spare) | cores | cores by CPU time "
        "| memory requests GiB | memory limits GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["scales"]:
        lines.append(
            f"| {row['rps']:g} req/s | {row['p99_target_ms']:g} | {row['replica_rps_planned']} | {row['replicas']} "
            f"({row['replicas_for_load']} + {row['replicas'] - row['replicas_for_load']}) | {row['cores']} | "
            f"{row['cores_by_cpu_time']} | {row['memory_request_gib']} | {row['memory_limit_gib']} |"
        )
    lines += [
        "",
        "Cores by CPU time: the load x the service's CPU per request (saturation median, Locust excluded) / the "
        "utilization; it should land near the replica count's cores, and does when the two files agree. "
        "What changes at 10x and 100x: docs/scaling.md.",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.capacity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rps", type=float, required=True, help="requests per second to serve")
    parser.add_argument("--p99-ms", type=float, required=True, help="p99 answer time to stay within")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where latest.json is read from")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="capacity")
    parser.add_argument("--spare", type=int, default=1, help="replicas beyond the load (N+1 by default)")
    parser.add_argument("--min-replicas", type=int, default=3, help="the HPA floor (deploy/k8s/hpa.yaml)")
    parser.add_argument("--max-utilization", type=float, default=0.85, help="never plan a replica busier")
    parser.add_argument("--scales", type=float, nargs="+", default=[1, 10, 100], help="multiples of --rps to plan")
    # The deployment's settings (deploy/k8s/deployment.yaml) and the service's defaults that bound memory.
    parser.add_argument("--max-connections", type=int, default=64)
    parser.add_argument("--max-upload-bytes", type=int, default=10 * MIB)
    parser.add_argument("--max-decode-bytes", type=int, default=64 * MIB)
    # The decode thread (DECODE_THREADS, 1 on 2 cores) and a lone image, which its inference thread decodes.
    parser.add_argument("--decodes", type=int, default=2, help="images decoded at once at most")
    args = parser.parse_args(argv)
    if args.rps <= 0 or args.p99_ms <= 0 or not 0 < args.max_utilization < 1:
        parser.error("--rps and --p99-ms must be positive, --max-utilization between 0 and 1")
    try:
        inputs = read_inputs(args.results)
        memory = replica_memory(
            inputs["peak_rss_mb_overload"]["value"],
            args.max_connections,
            args.max_upload_bytes,
            args.max_decode_bytes,
            args.decodes,
        )
        scales = [
            plan(inputs, args.rps * k, args.p99_ms, args.spare, args.max_utilization, memory, args.min_replicas)
            for k in args.scales
        ]
    except PlanError as exc:
        print(f"benchmarks.capacity: {exc}", file=sys.stderr)
        return 2
    result = {
        **provenance(command_line("python -m benchmarks.capacity", argv)),
        "inputs": inputs,
        "settings": {
            "MAX_CONNECTIONS": args.max_connections,
            "MAX_UPLOAD_BYTES": args.max_upload_bytes,
            "MAX_DECODE_BYTES": args.max_decode_bytes,
            "decodes at once": args.decodes,
        },
        "spare": args.spare,
        "memory_per_replica": memory,
        "plan": plan(inputs, args.rps, args.p99_ms, args.spare, args.max_utilization, memory, args.min_replicas),
        "scales": scales,
    }
    save(args.out, args.name, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
