"""Candidate designs for adaptive intra-op parallelism, measured at the engine (no HTTP, no decoding).

What a design must do well at both ends: a request that is alone should use every core (latency), and
requests that queue up should each get one core (throughput). Each design is measured the same way:

- lone: one run at a time, its latency (median of the round's runs);
- busy: `cores` threads calling run back to back, images/s;
- RSS after building the sessions (MiB).

Designs, interleaved round by round (the machine is shared and noisy):

- `narrow`: one session with 1 intra-op thread, `cores` concurrent runs (the service before issue 12);
- `shared-wide`: one session with `cores` intra-op threads, `cores` concurrent runs;
- `wide+narrow`: a wide session for a run that is alone, a narrow one for runs side by side (two sessions);
- `spinning-wide+narrow`: the same, with the wide session's idle threads spinning (onnxruntime's default);
- `shared-wide-dbb`: as shared-wide, with `session.intra_op.dynamic_block_base` = 4.

    python -m benchmarks.parallelism --rounds 5 --seconds 4
"""

from __future__ import annotations

import argparse
import gc
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from benchmarks.report import command_line, provenance, save
from benchmarks.run import ROOT
from service.cpus import available_cpus
from service.manifest import Manifest
from service.model import session_options

DESIGNS = ("narrow", "shared-wide", "wide+narrow", "spinning-wide+narrow", "shared-wide-dbb")


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _build(design: str, model: str, cores: int) -> tuple[ort.InferenceSession, ort.InferenceSession]:
    """(the session a lone run uses, the session runs side by side use)."""

    def session(threads: int, block_base: int | None = None, spin: bool = False) -> ort.InferenceSession:
        options = session_options(threads)
        if spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        if block_base is not None:
            options.add_session_config_entry("session.intra_op.dynamic_block_base", str(block_base))
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    if design == "narrow":
        one = session(1)
        return one, one
    if design == "shared-wide":
        wide = session(cores)
        return wide, wide
    if design == "shared-wide-dbb":
        wide = session(cores, block_base=4)
        return wide, wide
    if design == "wide+narrow":
        return session(cores), session(1)
    if design == "spinning-wide+narrow":
        return session(cores, spin=True), session(1)
    raise ValueError(design)


def _lone(session: ort.InferenceSession, name: str, x: np.ndarray, seconds: float) -> float:
    latencies = []
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        started = time.perf_counter()
        session.run(None, {name: x})
        latencies.append((time.perf_counter() - started) * 1000)
    return statistics.median(latencies)


def _busy(session: ort.InferenceSession, name: str, x: np.ndarray, threads: int, seconds: float) -> float:
    counts = [0] * threads
    until = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < until:
            session.run(None, {name: x})
            counts[i] += 1

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts) / seconds


def measure(artifact: Path, rounds: int, seconds: float) -> dict[str, Any]:
    manifest = Manifest.read(artifact)
    model = str(artifact / manifest.model.file)
    cores = available_cpus()
    spec = manifest.preprocessing
    x = np.random.default_rng(0).uniform(0, 255, (1, spec.height, spec.width, 3)).astype(np.float32)
    rows: dict[str, list[dict[str, float]]] = {design: [] for design in DESIGNS}
    for round_ in range(rounds):
        order = DESIGNS if round_ % 2 == 0 else tuple(reversed(DESIGNS))
        for design in order:
            gc.collect()
            before = _rss_mib()
            lone_session, side_session = _build(design, model, cores)
            lone_session.run(None, {manifest.input.name: x})
            side_session.run(None, {manifest.input.name: x})
            rss = _rss_mib() - before
            lone = _lone(lone_session, manifest.input.name, x, seconds)
            busy = _busy(side_session, manifest.input.name, x, cores, seconds)
            rows[design].append(
                {"lone_ms": round(lone, 2), "busy_img_s": round(busy, 2), "sessions_mib": round(rss, 1)}
            )
            del lone_session, side_session
            print(f"round {round_ + 1} {design:>16}: lone {lone:6.2f} ms, busy {busy:6.2f} img/s, +{rss:.0f} MiB")
    summary = {
        design: {
            "lone_ms_median": round(statistics.median(r["lone_ms"] for r in runs), 2),
            "busy_img_s_median": round(statistics.median(r["busy_img_s"] for r in runs), 2),
            "sessions_mib_median": round(statistics.median(r["sessions_mib"] for r in runs), 1),
        }
        for design, runs in rows.items()
    }
    return {"cores": cores, "rounds": rows, "summary": summary, "artifact": manifest.model.sha256[:12]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default="parallelism")
    args = parser.parse_args(argv)
    result = {
        **provenance(command_line("python -m benchmarks.parallelism", argv)),
        **measure(args.artifact, args.rounds, args.seconds),
    }
    base = result["summary"]["narrow"]
    lines = [
        "# Adaptive parallelism: candidate designs at the engine",
        "",
        f"`{result['command']}` on {result['machine']['cpu']} ({result['cores']} cores), {args.rounds} interleaved "
        f"rounds of {args.seconds:g} s each. Batch 1, artifact {result['artifact']}. Medians over rounds; the "
        "ratios are against `narrow` (the service before issue 12). The machine was shared with other jobs.",
        "",
        "| design | lone run, ms | vs narrow | runs side by side, img/s | vs narrow | sessions, MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for design, s in result["summary"].items():
        lines.append(
            f"| {design} | {s['lone_ms_median']} | {s['lone_ms_median'] / base['lone_ms_median']:.3f} "
            f"| {s['busy_img_s_median']} | {s['busy_img_s_median'] / base['busy_img_s_median']:.3f} "
            f"| {s['sessions_mib_median']} |"
        )
    save(args.out, args.name, result, lines)


if __name__ == "__main__":
    main()
