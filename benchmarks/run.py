"""Side-by-side benchmark, one run: the bare engine, our service (INT8 and FP32), and the seed's TensorFlow way.

    python -m benchmarks.run                 # full run (about 12 minutes on 2 cores)
    python -m benchmarks.run --quick         # every system, short phases (about 3 minutes): proves the harness
    python -m benchmarks.run --only service-int8 seed-tf-predict --name seed-side-by-side

Every HTTP system gets the same load (headless Locust, fixed users and spawn rate, fixed duration, after an
uncounted warm-up) with the same JPEG bytes. Writes results/<name>.json, results/<name>.md, results/<name>.png
(benchmarks.capacity reads latest.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import engine, payloads
from benchmarks.harness import (
    RESULTS,
    ROOT,
    SCRATCH,
    System,
    command_line,
    launch,
    load_phase,
    local_env,
    provenance,
    pyplot,
    save,
    warm_up,
)
from service.imaging import preprocess
from service.manifest import Manifest

CACHE = ROOT / "benchmarks" / ".cache"


@dataclass(frozen=True)
class Profile:
    users: int
    duration_s: int
    warmup_s: float
    engine_s: float


FULL = Profile(users=8, duration_s=60, warmup_s=10, engine_s=8)
QUICK = Profile(users=8, duration_s=8, warmup_s=2, engine_s=1.5)


@dataclass(frozen=True)
class Contender:
    name: str
    env: dict[str, str] = field(default_factory=dict)
    seed: bool = False  # the seed's TensorFlow server (benchmarks/baselines/seed_server.py), not `python -m service`
    users_factor: int = 1  # 4: the overload run
    # Measure the engine ceiling again right before and right after this system's load phase: the machine's
    # speed drifts over a long run, and the saturation ratio must compare like with like.
    bracketed: bool = False

    def system(self, port: int) -> System:
        if self.seed:
            command = [sys.executable, "-m", "uvicorn", "benchmarks.baselines.seed_server:app", "--host", "127.0.0.1"]
            command += ["--port", str(port), "--workers", "1", "--log-level", "warning"]
            return System(self.name, command, self.env)
        return System(self.name, [sys.executable, "-m", "service"], local_env(port) | self.env)


def contenders(fp32: Path) -> list[Contender]:
    return [
        Contender("service-int8", bracketed=True),
        # The alternatives the defaults were chosen against, measured in the same run.
        Contender("service-int8 1 worker x 2 threads", {"WORKERS": "1"}),
        Contender("service-int8 batch<=4", {"MAX_BATCH": "4", "BATCH_WAIT_MS": "5"}),
        Contender("service-int8 at 4x overload", users_factor=4),
        Contender("service-fp32", {"MODEL_DIR": str(fp32)}),
        Contender("seed-tf-predict", {"SEED_MODE": "predict", "TF_CPP_MIN_LOG_LEVEL": "2"}, seed=True),
        Contender("seed-tf-function", {"SEED_MODE": "tf_function", "TF_CPP_MIN_LOG_LEVEL": "2"}, seed=True),
    ]


def fp32_artifact(quick: bool) -> Path:
    """The FP32 variant of the shipped reference model (not committed: the repo keeps INT8 only)."""
    out = CACHE / ("fp32-reference-quick" if quick else "fp32-reference")
    if (out / "manifest.json").exists():
        return out
    command = [sys.executable, "-m", "export", "--reference", "--variants", "fp32", "--out", str(out)]
    if quick:  # same graph, same cost; less BatchNorm re-estimation and parity work
        command += ["--bn-batches", "2", "--calibration-count", "4", "--validation-count", "4"]
    print(f"exporting the FP32 variant: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return out


def measure(
    contender: Contender,
    images: list[bytes],
    profile: Profile,
    work: Path,
    ceiling: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A fresh server, warmed up, under Locust; `ceiling()`, if given, measures the engine right before and after."""
    print(f"{contender.name}: starting", flush=True)
    tag = contender.name.replace(" ", "_")
    bracket: dict[str, Any] = {}
    with launch(contender.system, images[0], work / f"{contender.name}.log") as server:
        warm_up(server.url, images, profile.users, profile.warmup_s)
        if ceiling is not None:  # the server is up but idle (its threads do not spin): the engine has the cores
            bracket["before"] = ceiling()
        # The bracketed system is our own service: its /metrics gives a steady-state window and CPU by thread.
        users = profile.users * contender.users_factor
        load = load_phase(server, users, profile.duration_s, work / tag, steady=ceiling is not None)
        if ceiling is not None:
            bracket["after"] = ceiling()
    result = {"system": contender.name, "cold_start_s": round(server.cold_start_s, 2), **load}
    if bracket:
        before, after = bracket["before"]["images_per_s"], bracket["after"]["images_per_s"]
        result["ceiling_next_to_it"] = {
            "before": before,
            "after": after,
            "mean": round((before + after) / 2, 2),
            "mode": bracket["before"]["mode"],
        }
    print(f"{contender.name}: {json.dumps(result)}", flush=True)
    return result


def ratios(result: dict[str, Any]) -> dict[str, float | None]:
    by = {s["system"]: s for s in result["systems"]}

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    def ok(name: str) -> float | None:
        return by.get(name, {}).get("ok_per_s")  # type: ignore[no-any-return]

    int8, seed, engine_runs = by.get("service-int8", {}), by.get("seed-tf-predict", {}), result["engine"]
    next_to_it = (int8.get("ceiling_next_to_it") or {}).get("mean")
    return {
        "service_int8 / engine ceiling measured next to it": ratio(int8.get("ok_per_s"), next_to_it),
        "service_int8 steady-state window / engine ceiling measured next to it": ratio(
            (int8.get("window") or {}).get("answered_per_s"), next_to_it
        ),
        "service_int8 / engine ceiling at start of run": ratio(ok("service-int8"), engine_runs["best"]["images_per_s"]),
        "service_int8 / engine with decoding (no HTTP)": ratio(
            ok("service-int8"), (engine_runs.get("with_decoding") or {}).get("images_per_s")
        ),
        "service_int8 / service_int8 1 worker x 2 threads": ratio(
            ok("service-int8"), ok("service-int8 1 worker x 2 threads")
        ),
        "service_int8 batch<=4 / service_int8": ratio(ok("service-int8 batch<=4"), ok("service-int8")),
        "service_int8 / seed_tf_predict": ratio(ok("service-int8"), ok("seed-tf-predict")),
        "service_int8 / seed_tf_function": ratio(ok("service-int8"), ok("seed-tf-function")),
        "service_int8 / service_fp32": ratio(ok("service-int8"), ok("service-fp32")),
        "service_int8 p99 / p50": int8.get("p99_over_p50"),
        "service_int8 cold start / seed_tf_predict cold start": ratio(
            int8.get("cold_start_s"), seed.get("cold_start_s")
        ),
    }


def _fmt(value: Any, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value}{suffix}"


def _engine_table(title: str, runs: list[dict[str, Any]]) -> list[str]:
    lines = ["", title, "", "| mode | img/s | p50 ms | p99 ms |", "|---|---|---|---|"]
    return lines + [f"| {r['mode']} | {r['images_per_s']} | {r['p50']} | {r['p99']} |" for r in runs]


def markdown(result: dict[str, Any]) -> list[str]:
    m, p = result["machine"], result["profile"]
    best = result["engine"]["best"]
    lines = [
        f"Command: `{result['command']}` ({result['created_at']}); {m['cpu']}, {m['cores_available']} cores "
        f"available, {m['memory_gb']} GB, Python {m['python']}.",
        f"Load: headless Locust, {p['users']} users (closed loop, no think time), {p['duration_s']} s after a "
        f"{p['warmup_s']} s uncounted warm-up; {result['images']['count']} distinct JPEGs from "
        f"{result['images']['sizes'][0]} to {result['images']['sizes'][-1]}, multipart field `image`. "
        "Locust runs on the same 2 cores as the server.",
        "",
        "| system | users | answered/s | p50 ms | p95 ms | p99 ms | p99/p50 | errors | cold start s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| engine ceiling (onnxruntime alone, {best['mode']}) | | {best['images_per_s']} img/s | {best['p50']} | "
        f"{best['p95']} | {best['p99']} | | | | |",
    ]
    for s in result["systems"]:
        errors = ", ".join(f"{n} x {k}" for k, n in sorted(s["errors_by_status"].items())) or "0"
        lines.append(
            f"| {s['system']} | {s['users']} | {s['ok_per_s']} | {s['p50_ms']:.0f} | {s['p95_ms']:.0f} | "
            f"{s['p99_ms']:.0f} | {_fmt(s['p99_over_p50'])} | {errors} | {s['cold_start_s']} | {s['rss']['peak_mb']} |"
        )
    lines += _engine_table("Engine runs (no HTTP, no decoding):", result["engine"]["runs"])
    if result["engine"].get("decoding_runs"):
        title = "Engine runs that first decode and resize each JPEG with the service's code (no HTTP):"
        lines += _engine_table(title, result["engine"]["decoding_runs"])
    bracketed = [s for s in result["systems"] if s.get("ceiling_next_to_it")]
    if bracketed:
        lines += [
            "",
            "The engine ceiling measured again right before and right after a system's load phase (same mode as "
            "the best one above, the server up but idle):",
            "",
            "| system | ceiling before img/s | ceiling after img/s | mean | system answered/s | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for s in bracketed:
            c = s["ceiling_next_to_it"]
            ratio = round(s["ok_per_s"] / c["mean"], 3) if c["mean"] else "n/a"
            lines.append(f"| {s['system']} | {c['before']} | {c['after']} | {c['mean']} | {s['ok_per_s']} | {ratio} |")
        windows = [s for s in bracketed if s.get("window")]
        if windows:
            lines += [
                "",
                "Steady-state window of the same load phase (answers counted by the service's /metrics), and CPU "
                "milliseconds per answered request by thread (and the Locust process):",
                "",
                "| system | window s | answered/s | inference | decode | event loop | Locust | machine idle |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for s in windows:
                w, c = s["window"], s["window"]["cpu_ms_per_request"]
                lines.append(
                    f"| {s['system']} | {w['seconds']} | {w['answered_per_s']} | {c.get('inference')} | "
                    f"{c.get('decode')} | {c.get('event loop')} | {c.get('load generator')} | {w['machine_idle']:.1%} |"
                )
    lines += ["", "Ratios:", "", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in result["ratios"].items()]
    return lines


def write_plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    systems = result["systems"]
    names = [s["system"] for s in systems]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    throughput = [s["ok_per_s"] for s in systems]
    left.barh(names, throughput, color="tab:blue")
    ceiling = result["engine"]["best"]["images_per_s"]
    left.axvline(ceiling, color="tab:red", linestyle="--", label=f"engine ceiling {ceiling} img/s")
    left.set_xlabel("answered requests/s (higher is better)")
    left.legend(loc="lower right")
    left.invert_yaxis()
    width = 0.27
    for i, (key, label) in enumerate((("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99"))):
        right.barh([y + (i - 1) * width for y in range(len(systems))], [s[key] for s in systems], width, label=label)
    right.set_yticks(range(len(systems)), names)
    right.set_xscale("log")
    right.set_xlabel("latency ms, log scale (lower is better)")
    right.legend(loc="lower right")
    right.invert_yaxis()
    fig.suptitle(f"{result['command']}: {result['profile']['users']} concurrent clients, {result['machine']['cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short phases: proves the harness")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results; with --quick and no "
                        "--name, benchmarks/.cache/results)")  # fmt: skip
    parser.add_argument("--name", help="result file name (default: latest, or quick with --quick)")
    parser.add_argument("--only", nargs="+", help="run only these systems")
    args = parser.parse_args(argv)
    profile = QUICK if args.quick else FULL
    name = args.name or ("quick" if args.quick else "latest")

    images = payloads.image_bytes()
    fp32 = fp32_artifact(args.quick)
    artifact = ROOT / "artifacts"
    manifest = Manifest.read(artifact)
    inputs = np.stack([preprocess(b, manifest.preprocessing, 10**9) for b in images[:16]])
    print("engine ceiling...", flush=True)
    result: dict[str, Any] = {
        "name": name,
        "quick": args.quick,
        **provenance(command_line("python -m benchmarks.run", argv)),
        "profile": vars(profile),
        "images": {"count": len(images), "sizes": [f"{w}x{h}" for w, h in payloads.SIZES]},
        "artifact": {"sha256": manifest.model.sha256, "quantization": manifest.model.quantization},
        "engine": engine.ceiling(artifact, inputs, profile.engine_s, images=images),
        "systems": [],
    }
    best = result["engine"]["best"]

    def ceiling_again() -> dict[str, Any]:
        return engine.rerun(artifact, inputs, best, profile.engine_s)

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        for contender in contenders(fp32):
            if args.only and contender.name not in args.only:
                continue
            bracket = ceiling_again if contender.bracketed else None
            result["systems"].append(measure(contender, images, profile, work, ceiling=bracket))
    result["ratios"] = ratios(result)
    out = args.out or (SCRATCH if args.quick and not args.name else RESULTS)
    save(out, name, result, markdown(result))
    write_plot(result, out / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
