"""Concurrency sweep, side by side: our service and the naive server at 1 to 32 clients, on two image sets.

    python -m benchmarks.sweep                                  # 6 levels x 2 sets x 2 systems, about 15 minutes
    python -m benchmarks.sweep --variant "" --variant "@HEAD~1" --sets large --levels 1 8
    python -m benchmarks.sweep --quick                          # 2 levels, short phases: proves the harness
    python -m benchmarks.sweep --triton .venv-triton/bin/python # Triton as a third system (docs/benchmarks.md)

Each point (set, level, system): a fresh server (its launch to first answer is a cold-start sample), a warm-up,
then `--duration` s of headless Locust with that many users while the server tree's peak RSS is sampled; the
systems' order alternates from one point to the next. Ours is `python -m service` (or each `--variant`, settings
and/or `@REV` as in benchmarks.ab); the naive server is benchmarks/baselines/naive_server.py; with --triton,
Triton (benchmarks/baselines/triton_server.py, loaded through the Open Inference Protocol). Per point:
answered/s, p50/p90/p99 of every request's own time, errors by kind, peak RSS. Writes
benchmarks/results/<name>.{json,md,png} with --name, else under benchmarks/.cache/results/ (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import payloads
from benchmarks.baselines import triton_server
from benchmarks.baselines.triton_server import INFER_PATH, oip_request
from benchmarks.harness import (
    ROOT,
    System,
    Variant,
    add_output_options,
    add_variant_option,
    alternating,
    command_line,
    destination,
    failures,
    header,
    launch,
    load_phase,
    local_env,
    naive_system,
    provenance,
    pyplot,
    save,
    service_code,
    service_system,
    warm_up,
)

LEVELS = (1, 2, 4, 8, 16, 32)
QUICK_LEVELS = (1, 4)
NAIVE = "naive"
TRITON = "triton"
KINDS = ("503 with Retry-After", "other 5xx", "no answer", "other")


@dataclass(frozen=True)
class Contender:
    """A system in the sweep; `system(port)` launches it on a given port."""

    name: str
    variant: Variant | None = None  # ours: the service settings/revision; None: the naive server
    code: Path = ROOT
    triton_python: str | None = None  # Triton: the python of its own venv (benchmarks/requirements-triton.txt)

    def system(self, port: int) -> System:
        if self.triton_python is not None:
            command = [self.triton_python, "-m", "benchmarks.baselines.triton_server", "--port", str(port)]
            return System(self.name, command, local_env(port), request=triton_request, locustfile="locustfile_oip.py")
        if self.variant is None:
            return naive_system(port)
        return service_system(self.name, self.variant.env, self.code, port)


def triton_request(image: bytes) -> tuple[str, dict[str, Any]]:
    """The harness's request hook for Triton: the OIP request benchmarks/locustfile_oip.py sends."""
    body, headers = oip_request(image)
    return INFER_PATH, {"content": body, "headers": headers}


def contenders(variants: list[Variant], code: dict[str, Path], triton_python: str | None = None) -> list[Contender]:
    ours = [Contender("service" if v.label == "defaults" else f"service {v.label}", v, code[v.label]) for v in variants]
    triton = [Contender(TRITON, triton_python=triton_python)] if triton_python else []
    return [*ours, Contender(NAIVE), *triton]


def triton_version(python: str) -> str:
    """The pytriton version in that venv; a clear error before the sweep starts if it cannot run pytriton."""
    done = subprocess.run(
        [python, "-c", "import importlib.metadata as m, pytriton; print(m.version('nvidia-pytriton'))"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(
            f"--triton {python}: cannot import pytriton there (docs/benchmarks.md):\n{done.stderr[-1500:]}"
        )
    return done.stdout.strip()


def triton_info(python: str, pytriton: str) -> dict[str, Any]:
    values = triton_server.settings(os.environ)  # the launcher inherits this environment
    return {"python": python, "pytriton": pytriton, "settings": values, "setup": triton_server.describe(values)}


def error_kinds(prefix: Path) -> dict[str, int]:
    """Failures by kind, from the locustfile's "status NNN: [Retry-After N] ..." messages."""
    counts = dict.fromkeys(KINDS, 0)
    for message, n in failures(prefix).items():
        status = message.split(":")[0].removeprefix("status ").strip() if message.startswith("status ") else ""
        if status == "503" and message.startswith("status 503: [Retry-After"):
            counts["503 with Retry-After"] += n
        elif status.startswith("5"):
            counts["other 5xx"] += n
        elif status == "0":
            counts["no answer"] += n
        else:
            counts["other"] += n
    return counts


def measure(
    system: Contender, image_set: str, images: list[bytes], users: int, args: argparse.Namespace, work: Path, tag: str
) -> dict[str, Any]:
    """One point: a fresh server, its cold start, warm-up at `users`, then Locust with `users` for --duration."""
    tag = f"{tag}-{image_set}-{users}-{system.name}".replace(" ", "_").replace("/", "_").replace("@", "")
    launch_failures: list[str] = []
    while True:
        try:
            server = launch(system.system, images[0], work / f"{tag}.log")
            break
        except RuntimeError as exc:
            # pytriton's start sometimes loses the race with its own Python backend's handshake ("Connection
            # refused" in model.py's initialize) and exits: launched once more, and the point says so. Ours and
            # the naive server never get a second launch: one that fails to start stops the sweep.
            if system.triton_python is None or launch_failures:
                raise
            launch_failures.append(str(exc).splitlines()[0])
    with server:
        warm_up(server.url, images, users, args.warmup, request=server.system.request)
        load = load_phase(server, users, args.duration, work / tag, env={"BENCH_IMAGE_SET": image_set})
    return {
        "answered_per_s": load["ok_per_s"],
        "requests": load["requests"],
        "errors": load["errors"],
        "errors_by_status": load["errors_by_status"],
        "errors_by_kind": error_kinds(work / tag),
        "p50_ms": load["p50_ms"],
        "p90_ms": load["p90_ms"],
        "p99_ms": load["p99_ms"],
        "p99_over_p50": load["p99_over_p50"],
        "peak_rss_mb": load["rss"]["peak_mb"],
        "cold_start_s": round(server.cold_start_s, 3),
        **({"launch_failures": launch_failures} if launch_failures else {}),
        # How busy the shared machine was: other work on these cores skews a point (and a spinning engine more).
        "machine_idle": load["machine_idle"],
        "load_average_1min": round(os.getloadavg()[0], 2),
        "other_work_cores": load["other_work_cores"],
    }


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


METRICS: tuple[str, ...] = ("answered_per_s", "p50_ms", "p90_ms", "p99_ms", "p99_over_p50", "peak_rss_mb")
METRICS += ("cold_start_s", "load_average_1min", "other_work_cores")
RATIO_METRICS = ("answered_per_s", "p50_ms", "p99_ms", "peak_rss_mb")


def _same_round(group: list[dict[str, Any]], name: str, reference: str) -> dict[str, float | None]:
    """`name` over `reference`, metric by metric: the median of the ratios of points measured in the same round."""
    theirs = {p["round"]: p for p in group if p["system"] == reference}
    paired = [(p, theirs[p["round"]]) for p in group if p["system"] == name and p["round"] in theirs]
    return {f"{m} / {reference}": _median(_ratio(a[m], b[m]) for a, b in paired) for m in RATIO_METRICS}


def summarize(points: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Medians over rounds per (set, users, system); ours/naive ratios as medians of same-round ratios."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault((p["set"], p["users"]), []).append(p)
    summary, ratios, to_triton = [], [], []
    for (image_set, users), group in groups.items():
        for name in names:
            mine = [p for p in group if p["system"] == name]
            row = {"set": image_set, "users": users, "system": name, "rounds": len(mine)}
            row |= {m: _median(p.get(m) for p in mine) for m in METRICS}
            row["errors_by_kind"] = {k: sum(p["errors_by_kind"][k] for p in mine) for k in KINDS}
            row["requests"] = sum(p["requests"] for p in mine)
            summary.append(row)
        point = {"set": image_set, "users": users}
        ratios += [point | {"system": n} | _same_round(group, n, NAIVE) for n in names if n != NAIVE]
        if any(p["system"] == TRITON for p in group):
            ours = [n for n in names if n not in (NAIVE, TRITON)]
            to_triton += [point | {"system": n} | _same_round(group, n, TRITON) for n in ours]
    cold = []
    for name in names:
        values = [p["cold_start_s"] for p in points if p["system"] == name]
        by_group = {(p["set"], p["users"], p["round"]): p["cold_start_s"] for p in points if p["system"] == NAIVE}
        paired = [
            _ratio(p["cold_start_s"], by_group.get((p["set"], p["users"], p["round"])))
            for p in points
            if p["system"] == name
        ]
        cold.append(
            {
                "system": name,
                "launches": len(values),
                "median_s": _median(values),
                "min_s": min(values),
                "max_s": max(values),
                "cold start / naive (median of paired launches)": _median(paired),
            }
        )
    return {"summary": summary, "ratios": ratios, "cold_start": cold} | (
        {"ratios_to_triton": to_triton} if to_triton else {}
    )


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


BUSY_CORES = 0.25  # other work beyond this, on a median point, is enough to move a ratio by several percent


def _at_least_0(value: float | None) -> float | None:
    return None if value is None else max(0.0, value)  # the JSON keeps the signed reading (harness.other_work)


def _busy_machine_warning(result: dict[str, Any]) -> list[str]:
    others = [p["other_work_cores"] for p in result["points"] if p.get("other_work_cores") is not None]
    if not others or statistics.median(others) <= BUSY_CORES:
        return []
    cores = result["machine"]["cores_available"]
    median = statistics.median(others)
    warning = f"{min(others):g} to {max(others):g} cores (median {median:g}) of the {cores}; rerun on a quiet machine."
    return ["", f"**Warning: a busy machine.** Other work than the server and its load generator used {warning}"]


def markdown(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    sets = ", ".join(f"{s}: {len(v['sizes'])} sizes {'/'.join(v['sizes'])}" for s, v in result["sets"].items())
    lines = [
        header(result),
        f"Each point: a fresh server, launch to first answer (its cold start), {result['warmup_s']} s uncounted "
        f"warm-up at that concurrency, then {result['duration_s']} s of headless Locust (FastHttpUser, closed loop, "
        f"no think time) on the same cores; {result['rounds']} round(s); the two systems alternate order at each "
        f"(set, level). Image sets ({payloads.COUNT} distinct JPEGs each, multipart `image`): {sets}. Latencies are "
        "each request's own time (benchmarks/locustfile.py records them; nearest-rank percentiles, not Locust's whole "
        "milliseconds) and include failed requests. Other work: cores' "
        "worth of CPU used during the point by anything but the server and Locust (other processes, a virtual "
        f"machine's steal time), of the {m['cores_available']}; the JSON keeps the 1-minute load average too, "
        "which counts the point's own load and lags into the next one.",
        *_busy_machine_warning(result),
        *[
            f"Launched twice: {p['system']}, {p['set']} set, {p['users']} clients, round {p['round']} (the first "
            f"launch: {'; '.join(p['launch_failures'])})."
            for p in result["points"]
            if p.get("launch_failures")
        ],
        "",
        *_ratio_table(result["ratios"], NAIVE, "naive"),
    ]
    lines += _triton_lines(result)
    for image_set in result["sets"]:
        lines += [
            "",
            f"Image set **{image_set}** (medians over rounds):",
            "",
            "| clients | system | answered/s | p50 ms | p90 ms | p99 ms | p99/p50 | requests | 503 with Retry-After "
            "| other 5xx | no answer | other errors | peak RSS MB | cold start s | other work, cores |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["summary"]:
            if r["set"] != image_set:
                continue
            e = r["errors_by_kind"]
            lines.append(
                f"| {r['users']} | {r['system']} | {_f(r['answered_per_s'])} | {_f(r['p50_ms'], 1)} | "
                f"{_f(r['p90_ms'], 1)} | {_f(r['p99_ms'], 1)} | {_f(r['p99_over_p50'])} | {r['requests']} | "
                f"{e['503 with Retry-After']} | {e['other 5xx']} | {e['no answer']} | {e['other']} | "
                f"{_f(r['peak_rss_mb'], 1)} | {_f(r['cold_start_s'], 3)} | {_f(_at_least_0(r['other_work_cores']))} |"
            )
    lines += [
        "",
        "Cold start, launch to the first answered `/infer` (one 640x480 JPEG), every launch of the sweep; the ratio "
        "pairs each launch of ours with the naive server's at the same (set, level, round):",
        "",
        "| system | launches | median s | min s | max s | ours / naive (median of pairs) |",
        "|---|---|---|---|---|---|",
    ]
    for c in result["cold_start"]:
        lines.append(
            f"| {c['system']} | {c['launches']} | {_f(c['median_s'], 3)} | {_f(c['min_s'], 3)} | "
            f"{_f(c['max_s'], 3)} | {_f(c['cold start / naive (median of paired launches)'], 3)} |"
        )
    return lines


def _triton_lines(result: dict[str, Any]) -> list[str]:
    """With --triton: what Triton ran, how its RSS is counted, and ours over Triton in the same round."""
    if "triton" not in result:
        return []
    t = result["triton"]
    return [
        "",
        f"**Triton** (the `triton` rows; in the table above, Triton / naive): nvidia-pytriton {t['pytriton']} "
        f"({t['python']}), benchmarks/baselines/triton_server.py: {t['setup']}. The three systems alternate "
        "order from one (set, level) to the next (A B C, then C B A). Triton's clients send the Open Inference "
        "Protocol request (benchmarks/locustfile_oip.py: the JPEG as a BYTES input, binary tensor data; the "
        "probabilities back as a binary output); ours and naive get the multipart `/infer`. Its peak RSS, like "
        "every system's here, sums the RSS of the launched process and all its descendants: the pytriton "
        "launcher (our callables and their onnxruntime sessions), tritonserver, and its Python-backend stub "
        "processes. Pages shared between them (libraries, the shared-memory tensor pools) count once per process.",
        "",
        *_ratio_table(result.get("ratios_to_triton", []), TRITON, "Triton"),
    ]


def _ratio_table(rows: list[dict[str, Any]], reference: str, title: str) -> list[str]:
    lines = [
        f"**Ours / {title}, same round** (throughput > 1 and latency < 1 favour ours):",
        "",
        "| image set | clients | system | answered/s ratio | p50 ratio | p99 ratio | peak RSS ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, p50, p99, rss = (_f(r[f"{m} / {reference}"], 3) for m in RATIO_METRICS)
        lines.append(f"| {r['set']} | {r['users']} | {r['system']} | **{a}** | **{p50}** | {p99} | {rss} |")
    return lines


TICKS_MS = [m * 10**e for e in range(0, 6) for m in (1, 2, 5)]


def write_plot(result: dict[str, Any], path: Path) -> None:
    """p50 (solid) and p99 (dashed) latency against throughput, one curve per system, one panel per image set."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    plt = pyplot()
    sets = list(result["sets"])
    fig, axes = plt.subplots(1, len(sets), figsize=(6.5 * len(sets), 5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, image_set in zip(axes[0], sets, strict=True):
        for i, name in enumerate(result["systems"]):
            rows = sorted(
                (r for r in result["summary"] if r["set"] == image_set and r["system"] == name),
                key=lambda r: r["users"],
            )
            x = [r["answered_per_s"] for r in rows]
            color = colors[i % len(colors)]
            ax.plot(x, [r["p50_ms"] for r in rows], "o-", color=color, label=f"{name} p50")
            ax.plot(x, [r["p99_ms"] for r in rows], "s--", color=color, label=f"{name} p99", alpha=0.8)
            for r in rows:
                ax.annotate(str(r["users"]), (r["answered_per_s"], r["p50_ms"]), textcoords="offset points",
                            xytext=(4, -10), fontsize=7, color=color)  # fmt: skip
        ax.set_yscale("log")
        low, high = ax.get_ylim()
        ax.set_yticks([t for t in TICKS_MS if low <= t <= high])
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("answered requests/s")
        ax.set_ylabel("latency ms (log scale)")
        ax.set_title(f"{image_set} images (labels: concurrent clients)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['command']}\n{result['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--levels", type=int, nargs="+", help=f"concurrent clients (default {' '.join(map(str, LEVELS))})"
    )
    parser.add_argument("--duration", type=int, help="measured Locust seconds per point (default 20)")
    parser.add_argument("--warmup", type=float, help="uncounted warm-up seconds per point (default 10)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole sweep; medians over rounds")
    parser.add_argument("--sets", nargs="+", choices=list(payloads.SETS), default=list(payloads.SETS))
    add_variant_option(parser, required=False)
    parser.add_argument("--quick", action="store_true", help="levels 1 and 4, 5 s points: proves the harness")
    parser.add_argument(
        "--triton",
        metavar="PYTHON",
        help="add Triton (benchmarks/baselines/triton_server.py) run by this python, e.g. .venv-triton/bin/python "
        "(built as benchmarks/requirements-triton.txt says)",
    )
    add_output_options(parser, "sweep, or sweep-quick with --quick")
    args = parser.parse_args(argv)
    args.levels = args.levels or list(QUICK_LEVELS if args.quick else LEVELS)
    args.duration = args.duration or (5 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 10.0)
    variants: list[Variant] = args.variant or [Variant()]
    if len({v.label for v in variants}) != len(variants):
        parser.error("the variants must differ")
    if min(args.levels) < 1 or args.rounds < 1 or args.duration < 2:
        parser.error("levels and rounds must be at least 1, --duration at least 2")
    name = args.name or ("sweep-quick" if args.quick else "sweep")
    pytriton = triton_version(args.triton) if args.triton else None

    images = {s: payloads.image_set(s) for s in args.sets}
    points: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
        work = Path(tmp)
        systems = contenders(variants, service_code(variants, work), args.triton)
        group = 0
        for round_index in range(args.rounds):
            for image_set in args.sets:
                for users in args.levels:
                    # A B, B A, ...: alternating at every (set, level), so drift favours neither system.
                    order = alternating(systems, group)
                    group += 1
                    for position, contender in enumerate(order):
                        point = measure(contender, image_set, images[image_set], users, args, work, f"r{round_index}")
                        point = {"set": image_set, "users": users, "round": round_index, "system": contender.name,
                                 "position": position, **point}  # fmt: skip
                        print(f"{image_set} {users} clients {contender.name}: {point}", flush=True)
                        points.append(point)
    names = [c.name for c in systems]
    result: dict[str, Any] = {
        **provenance(command_line("python -m benchmarks.sweep", argv)),
        "levels": args.levels,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "rounds": args.rounds,
        "servers": "restarted for every point (fresh launch, warm-up at that level), order alternating per level",
        "sets": {
            s: {"count": len(images[s]), "sizes": [f"{w}x{h}" for w, h in payloads.SETS[s][0]]} for s in args.sets
        },
        "systems": names,
        **({"triton": triton_info(args.triton, pytriton)} if args.triton and pytriton else {}),
        "points": points,
        **summarize(points, names),
    }
    out = destination(args)
    save(out, name, result, markdown(result))
    write_plot(result, out / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
