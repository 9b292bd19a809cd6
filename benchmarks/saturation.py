"""How close the service gets to the engine, and where the rest goes: repeated, interleaved rounds.

    python -m benchmarks.saturation              # 5 rounds, about 6 minutes
    python -m benchmarks.saturation --rounds 2 --seconds 5

The machines are shared and their speed drifts by 10-20% within minutes, so one ceiling at the start of a
long run is a weak yardstick. Each round here measures, back to back on the same cores:

1. the engine ceiling (onnxruntime alone on preprocessed arrays; the better of one and two single-threaded
   runs per core, the modes that win in benchmarks/engine.py),
2. the engine with decoding: the same runs, each first decoding and resizing a JPEG with the service's
   own code (no HTTP), i.e. the most the service could reach if HTTP and the load generator were free,
3. the service under Locust (same JPEGs, multipart, 8 users), with Locust on the same cores,
4. the engine ceiling again.

Ratios in a round are against the mean of 1 and 4; the result is the median over rounds. An uncounted engine
phase comes first, so round 0 does not pay for cold caches.
Writes results/saturation.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import engine, machine, payloads
from benchmarks.report import save
from benchmarks.run import ROOT, Profile, System, _free_port, locust, start, stop, warm_up
from service.cpus import available_cpus
from service.imaging import preprocess
from service.manifest import Manifest

HERE = Path(__file__).resolve().parent


def _ceiling(artifact: Path, inputs: np.ndarray, cores: int, seconds: float) -> float:
    return max(float(engine.concurrent(artifact, inputs, n, seconds)["images_per_s"]) for n in (cores, 2 * cores))


def _round(
    index: int, inputs: np.ndarray, images: list[bytes], seconds: float, load_s: int, work: Path
) -> dict[str, Any]:
    artifact = ROOT / "artifacts"
    cores = available_cpus()
    before = _ceiling(artifact, inputs, cores, seconds)
    decoding = engine.with_decoding(artifact, images, cores, seconds)["images_per_s"]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"HOST": "127.0.0.1", "PORT": str(port), "LOG_LEVEL": "warning", "MODEL_DIR": str(artifact)}
    system = System("service-int8", [sys.executable, "-m", "service"], env)
    process, _ = start(system, url, images[0], work / f"round-{index}.log")
    try:
        warm_up(url, images, 8, 3)
        load = locust(url, Profile(users=8, duration_s=load_s, warmup_s=0, engine_s=0), 8, work / f"round-{index}")
    finally:
        stop(process)
    after = _ceiling(artifact, inputs, cores, seconds)
    ceiling = (before + after) / 2
    row = {
        "round": index,
        "engine_before": before,
        "engine_after": after,
        "engine_with_decoding": decoding,
        "service_ok_per_s": load["ok_per_s"],
        "service_errors": load["errors"],
        "service_p99_over_p50": load["p99_over_p50"],
        "decoding / engine": round(decoding / ceiling, 3),
        "service / engine": round(load["ok_per_s"] / ceiling, 3),
        "service / engine with decoding": round(load["ok_per_s"] / decoding, 3),
    }
    print(json.dumps(row), flush=True)
    return row


RATIOS = ("decoding / engine", "service / engine", "service / engine with decoding")


def markdown(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    lines = [
        f"Command: `{result['command']}` ({result['created_at']}); {m['cpu']}, {m['cores_available']} cores "
        f"available, Python {m['python']}. Engine phases {result['seconds']} s, load phases {result['load_s']} s "
        "(8 Locust users on the same cores as the server, 48 distinct JPEGs, multipart `image`).",
        "",
        "| round | engine before img/s | engine with decoding img/s | service answered/s | engine after img/s "
        "| decoding / engine | service / engine | service / engine with decoding |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rounds"]:
        lines.append(
            f"| {r['round']} | {r['engine_before']} | {r['engine_with_decoding']} | {r['service_ok_per_s']} | "
            f"{r['engine_after']} | {r['decoding / engine']} | {r['service / engine']} | "
            f"{r['service / engine with decoding']} |"
        )
    median = result["median"]
    lines.append("| **median** | | | | | " + " | ".join(f"**{median[k]}**" for k in RATIOS) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.saturation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=8.0, help="each engine phase")
    parser.add_argument("--load-seconds", type=int, default=20, help="each service phase")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default="saturation")
    args = parser.parse_args(argv)

    images = payloads.image_bytes()
    spec = Manifest.read(ROOT / "artifacts").preprocessing
    inputs = np.stack([preprocess(b, spec, 10**9) for b in images[:16]])
    engine.concurrent(ROOT / "artifacts", inputs, available_cpus(), args.seconds)  # uncounted: warms the caches
    with tempfile.TemporaryDirectory(prefix="saturation-") as tmp:
        rounds = [_round(i, inputs, images, args.seconds, args.load_seconds, Path(tmp)) for i in range(args.rounds)]
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m benchmarks.saturation", *given])
    result = {
        "command": command,
        "created_at": datetime.now(UTC).replace(microsecond=0).isoformat(),
        "machine": machine.describe(),
        "seconds": args.seconds,
        "load_s": args.load_seconds,
        "rounds": rounds,
        "median": {k: round(statistics.median(r[k] for r in rounds), 3) for k in RATIOS},
    }
    save(args.out, args.name, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
