"""Where each thread's CPU goes, by library: Linux perf samples of the service under the benchmarks.ab load.

    python -m benchmarks.libraries --variant @eacc010 --variant ""            # 2 rounds, about 3 minutes
    python -m benchmarks.libraries --variant "" --variant @exp-combo --rounds 3 --name libraries-heap

benchmarks.ab says how much CPU each thread role spends per answered request; when two versions differ there,
this says in which library: onnxruntime itself, the C library (malloc), the kernel (page faults, futexes),
Python, numpy, libjpeg. Each run: a fresh server per variant (settings and/or `@REV`, as in benchmarks.ab),
warmed up, 8 Locust users (--users); meanwhile `perf record -e cpu-clock` samples the server's threads at FREQUENCY_HZ
(a software clock: no hardware counters needed, so it works in a VM), and the answers the service counted over
the same span turn samples into milliseconds per answered request. Needs `perf` (Debian's linux-perf) and
kernel.perf_event_paranoid <= 2 (the default), enough to sample one's own processes. Writes
results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import time
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks import payloads, window
from benchmarks.ab import USERS, Variant, add_run_options, check_seconds, interleaved, save_rounds
from benchmarks.cpu import ROLES, role
from benchmarks.run import service_system, under_load

FREQUENCY_HZ = 999  # not 1000: sampling in step with the kernel's 1000 Hz timer would see the same instants
# Library file name prefixes, in the order they are tried, and the group each is counted in.
GROUPS = (
    ("onnxruntime", "onnxruntime"),
    ("libc.so", "libc (malloc, memcpy)"),
    ("[kernel", "kernel"),
    ("libpython", "python"),
    ("_multiarray", "numpy"),
    ("libjpeg", "libjpeg"),
    ("_imaging", "pillow"),
)
OTHER = "other"


def group(library: str) -> str:
    """The group a library (perf's dso column) is counted in."""
    return next((name for prefix, name in GROUPS if library.startswith(prefix)), OTHER)


def samples(report: str, pid: int) -> dict[tuple[str, str], int]:
    """Samples per (thread role, library) of process `pid`, from `perf report --stdio --sort pid,dso -F
    sample,pid,dso` (lines `N  TID:NAME  LIBRARY`; the thread whose id is the process's runs the event loop)."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for line in report.splitlines():
        fields = line.split()
        if len(fields) < 3 or line.startswith("#") or not fields[0].isdigit():
            continue
        tid, _, name = fields[1].partition(":")
        counts[(role(name, tid == str(pid)), " ".join(fields[2:]))] += int(fields[0])
    return dict(counts)


def record(pid: int, out: Path, seconds: float) -> dict[tuple[str, str], int]:
    """Sample process `pid`'s threads for `seconds`; samples per (thread role, library)."""
    perf = subprocess.Popen(
        ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(FREQUENCY_HZ), "-p", str(pid), "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(seconds)
    perf.send_signal(signal.SIGINT)  # perf writes its file on SIGINT
    _, err = perf.communicate(timeout=60)
    if perf.returncode not in (0, -signal.SIGINT) or not out.exists():
        raise RuntimeError(f"perf record failed ({perf.returncode}): {err.decode().strip()}")
    report = subprocess.run(
        ["perf", "report", "-i", str(out), "--stdio", "--no-children", "-g", "none", "--sort", "pid,dso",
         "-F", "sample,pid,dso"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return samples(report.stdout, pid)


def per_request_ms(counts: dict[tuple[str, str], int], answered: int) -> dict[str, dict[str, float]]:
    """CPU ms per answered request, by thread role and library group."""
    table: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for (thread_role, library), n in counts.items():
        table[thread_role][group(library)] += n * 1000 / FREQUENCY_HZ / answered
    return {r: {g: round(ms, 3) for g, ms in groups.items()} for r, groups in table.items()}


def profiled(url: str, service_pid: int, load_pid: int, seconds: float, out: Path) -> dict[str, Any]:
    """While Locust runs: perf over the same steady-state window as benchmarks/window.py measures."""
    window.settle(url)
    before = window.answered(url)
    span = window.span_s(seconds)
    counts = record(service_pid, out, span)
    answered = window.answered(url) - before
    return {"seconds": round(span, 1), "answered": answered, "ms_per_request": per_request_ms(counts, answered)}


def summarize(variants: list[Variant], rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for variant in variants:
        runs = [r["runs"][variant.label]["window"] for r in rounds]
        cells: dict[str, dict[str, float]] = {}
        for r in ROLES:
            groups = {g for run in runs for g in run["ms_per_request"].get(r, {})}
            cells[r] = {
                g: round(statistics.median(run["ms_per_request"].get(r, {}).get(g, 0.0) for run in runs), 2)
                for g in sorted(groups)
            }
        out.append({"variant": variant.label, "answered_per_s": [round(x["answered"] / x["seconds"], 1) for x in runs],
                    "ms_per_request": cells})  # fmt: skip
    return out


def markdown(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    groups = [name for _, name in GROUPS] + [OTHER]
    lines = [
        f"Command: `{result['command']}` ({result['created_at']}); {m['cpu']}, {m['cores_available']} cores "
        f"available, Python {m['python']}. {len(result['rounds'])} rounds; each run: fresh server, "
        f"{result.get('users', USERS)} Locust users for {result['seconds']} s, 48 distinct JPEGs, "
        f"`perf record -e cpu-clock -F {FREQUENCY_HZ}` on the server over the middle of the phase. CPU ms per "
        "answered request (median of rounds), by thread and library.",
        "",
        f"| variant | thread | {' | '.join(groups)} | all |",
        "|---|---|" + "---|" * (len(groups) + 1),
    ]
    for s in result["summary"]:
        for r, cells in s["ms_per_request"].items():
            if not cells:
                continue
            values = [cells.get(g, 0.0) for g in groups]
            lines.append(f"| {s['variant']} | {r} | {' | '.join(f'{v:.2f}' for v in values)} | {sum(values):.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.libraries", description=__doc__.split("\n\n")[0])
    add_run_options(parser, rounds=2, seconds=25, name="libraries")
    args = parser.parse_args(argv)
    variants: list[Variant] = args.variant
    check_seconds(parser, args.seconds)

    images = payloads.image_bytes()

    def run(variant: Variant, code: Path, work: Path, tag: str) -> dict[str, Any]:
        system_on = partial(service_system, tag, variant.env, code)
        during = partial(profiled, seconds=args.seconds, out=work / f"{tag}.perf")
        return under_load(system_on, images, args.seconds, work, tag, args.users, during=during)

    rounds = interleaved(variants, args.rounds, run)
    summary = summarize(variants, rounds)
    save_rounds(
        args,
        "python -m benchmarks.libraries",
        argv,
        rounds,
        summary,
        markdown,
        frequency_hz=FREQUENCY_HZ,
        users=args.users,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
