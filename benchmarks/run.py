"""Side-by-side benchmark, one run: the bare engine, our service (INT8 and FP32), and the seed's TensorFlow way.

    python -m benchmarks.run                 # full run (about 12 minutes on 2 cores)
    python -m benchmarks.run --quick         # every system, short phases (about 3 minutes): proves the harness

Every HTTP system gets the same load (headless Locust, fixed users and spawn rate, fixed duration, after an
uncounted warm-up) with the same JPEG bytes. Writes results/<name>.json, results/<name>.md, results/<name>.png.
"""

from __future__ import annotations

import argparse
import ast
import compileall
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from benchmarks import engine, payloads, window
from benchmarks.report import command_line, markdown, provenance, save, write_plot
from service.imaging import preprocess
from service.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"


@dataclass(frozen=True)
class Profile:
    users: int
    duration_s: int
    warmup_s: float
    engine_s: float


# How often a launched server is tried until it answers: the first answer is timed to within this (it was 20 ms).
POLL_S = 0.005

FULL = Profile(users=8, duration_s=60, warmup_s=10, engine_s=8)
QUICK = Profile(users=8, duration_s=8, warmup_s=2, engine_s=1.5)


@dataclass(frozen=True)
class System:
    name: str
    command: list[str]
    env: dict[str, str]
    users_factor: int = 1  # 4: the overload run
    # Measure the engine ceiling again right before and right after this system's load phase: the machine's
    # speed drifts over a long run, and the saturation ratio must compare like with like.
    bracketed: bool = False
    cwd: Path = ROOT  # where `python -m service` imports the service from (benchmarks.ab: another revision's)
    # One request for an image, (path, httpx keyword arguments); None: multipart_request (POST /infer). The Locust
    # file in benchmarks/ that sends the same kind of request (locustfile_oip.py: the OIP server, Triton).
    request: Callable[[bytes], tuple[str, dict[str, Any]]] | None = None
    locustfile: str = "locustfile.py"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def systems(fp32: Path, port: int) -> list[System]:
    service = [sys.executable, "-m", "service"]
    seed = [sys.executable, "-m", "uvicorn", "benchmarks.baselines.seed_server:app", "--host", "127.0.0.1"]
    seed += ["--port", str(port), "--workers", "1", "--log-level", "warning"]
    common = {"HOST": "127.0.0.1", "PORT": str(port), "LOG_LEVEL": "warning"}
    int8 = common | {"MODEL_DIR": str(ROOT / "artifacts")}
    return [
        System("service-int8", service, int8, bracketed=True),
        # The alternatives the defaults were chosen against, measured in the same run.
        System("service-int8 1 worker x 2 threads", service, int8 | {"WORKERS": "1"}),
        System("service-int8 batch<=4", service, int8 | {"MAX_BATCH": "4", "BATCH_WAIT_MS": "5"}),
        System("service-int8 at 4x overload", service, int8, users_factor=4),
        System("service-fp32", service, common | {"MODEL_DIR": str(fp32)}),
        System("seed-tf-predict", seed, {"SEED_MODE": "predict", "TF_CPP_MIN_LOG_LEVEL": "2"}),
        System("seed-tf-function", seed, {"SEED_MODE": "tf_function", "TF_CPP_MIN_LOG_LEVEL": "2"}),
    ]


def _multipart(body: bytes) -> dict[str, Any]:
    return {"files": {"image": ("car.jpg", body, "image/jpeg")}}


def multipart_request(image: bytes) -> tuple[str, dict[str, Any]]:
    """POST /infer with the image as the multipart field `image`, as the original's clients send it."""
    return "/infer", _multipart(image)


def _tree_rss(process: psutil.Process) -> int:
    try:
        procs = [process, *process.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs if p.is_running())
    except psutil.Error:
        return 0


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.samples: list[int] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.25):
            self.samples.append(_tree_rss(self.process))

    def stop(self) -> dict[str, float]:
        self._done.set()
        self.join()
        values = [s for s in self.samples if s] or [0]
        return {"peak_mb": round(max(values) / 2**20, 1), "mean_mb": round(float(np.mean(values)) / 2**20, 1)}


def compile_bytecode(code: Path) -> None:
    """Write the bytecode of the Python a server launched in `code` imports from there, as a deployment has it:
    the image compiles service/ (Dockerfile), a clone writes __pycache__ on its first start. Where
    PYTHONDONTWRITEBYTECODE is set, as on the machines these benchmarks ran on, every launch would compile
    service/ again: launch to first answer 1.049x (benchmarks/results/cold-start-bytecode-2.md)."""
    for package in ("service", "benchmarks/baselines"):
        if (code / package).is_dir():
            compileall.compile_dir(code / package, quiet=1)


def start(system: System, url: str, image: bytes, log: Path) -> tuple[subprocess.Popen[bytes], float]:
    """Launch, then time until the first successful /infer: the cold start a user waits through."""
    compile_bytecode(system.cwd)
    env = {**os.environ, **system.env}
    # The client is made before the launch: its set-up (an SSL context) would take CPU from the start it times.
    with httpx.Client(timeout=30) as client:
        launched = time.perf_counter()
        with log.open("wb") as sink:
            process = subprocess.Popen(system.command, cwd=system.cwd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        deadline = launched + 180
        while time.perf_counter() < deadline:
            if process.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{system.name} exited with {process.returncode}; {log} ends:\n{tail}")
            path, request = (system.request or multipart_request)(image)
            try:
                if client.post(f"{url}{path}", **request).status_code == 200:
                    return process, time.perf_counter() - launched
                # Triton listens before its model is loaded and refuses at once until then: no busy loop. The
                # other systems bind only once loaded, so they never take this path.
                time.sleep(POLL_S)
            except httpx.TransportError:
                time.sleep(POLL_S)
    process.kill()
    raise RuntimeError(f"{system.name} did not answer /infer within 180 s; see {log}")


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the service drains and exits), then a kill if it does not exit within 30 s."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def warm_up(
    url: str,
    images: list[bytes],
    users: int,
    seconds: float,
    request: Callable[[bytes], tuple[str, dict[str, Any]]] = multipart_request,
) -> None:
    stop = time.perf_counter() + seconds

    def loop(i: int) -> None:
        with httpx.Client(timeout=60) as client:
            k = i
            while time.perf_counter() < stop:
                path, kwargs = request(images[k % len(images)])
                client.post(f"{url}{path}", **kwargs)
                k += users

    with ThreadPoolExecutor(users) as pool:
        list(pool.map(loop, range(users)))


def response_time_percentiles(prefix: Path) -> dict[int, float]:
    """p50/p90/p95/p99 in ms (nearest rank) of every request's own time, as the locustfile wrote them when Locust
    quit (PREFIX_times.json); {} without that file (another locustfile). Locust's own percentiles are whole
    milliseconds below 100 ms, 7% of a 14 ms request."""
    path = Path(f"{prefix}_times.json")
    times: list[float] = sorted(json.loads(path.read_text())) if path.exists() else []
    if not times:
        return {}
    return {q: round(times[max(0, math.ceil(q / 100 * len(times)) - 1)], 2) for q in (50, 90, 95, 99)}


def failures(prefix: Path) -> dict[str, int]:
    """Occurrences by failure message, as the locustfile wrote them when Locust quit (PREFIX_failures.json),
    else from Locust's PREFIX_failures.csv (its "Error" column holds the repr of a CatchResponseError)."""
    final = Path(f"{prefix}_failures.json")
    if final.exists():
        loaded: dict[str, int] = json.loads(final.read_text())
        return loaded
    counts: dict[str, int] = {}
    with open(f"{prefix}_failures.csv", newline="") as f:
        for row in csv.DictReader(f):
            message = row["Error"]
            if message.startswith("CatchResponseError(") and message.endswith(")"):
                message = str(ast.literal_eval(message.removeprefix("CatchResponseError(").removesuffix(")")))
            counts[message] = counts.get(message, 0) + int(row["Occurrences"])
    return counts


def _statuses(prefix: Path) -> dict[str, int]:
    """Failures by HTTP status, from the locustfile's "status NNN: ..." messages."""
    counts: dict[str, int] = {}
    for message, n in failures(prefix).items():
        status = message.split(":")[0].removeprefix("status ").strip() if message.startswith("status") else "other"
        counts[status] = counts.get(status, 0) + n
    return counts


def locust(
    url: str,
    profile: Profile,
    users: int,
    prefix: Path,
    during: Callable[[int], Any] | None = None,
    env: dict[str, str] | None = None,
    locustfile: str = "locustfile.py",
) -> dict[str, Any]:
    """Headless Locust against `url`; `during(locust_pid)`, if given, runs while it does and its result is kept.
    `env` is added to Locust's environment (BENCH_IMAGE_SET: benchmarks/locustfile.py). `locustfile`: a file in
    benchmarks/ (locustfile_oip.py: Open Inference Protocol requests, for Triton)."""
    command = [
        sys.executable, "-m", "locust", "-f", str(HERE / locustfile), "--headless",
        "-u", str(users), "-r", str(users), "-t", f"{profile.duration_s}s",
        "--host", url, "--csv", str(prefix), "--only-summary", "--stop-timeout", "10", "--loglevel", "WARNING",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        observed = during(process.pid) if during is not None else None
    finally:
        process.wait()
    with open(f"{prefix}_stats.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["Name"] == "/infer")
    requests, errors = int(row["Request Count"]), int(row["Failure Count"])
    latency = response_time_percentiles(prefix) or {q: float(row[f"{q}%"]) for q in (50, 90, 95, 99)}
    p50 = latency[50]
    return {
        "ok_per_s": round(float(row["Requests/s"]) * (requests - errors) / requests, 2) if requests else 0.0,
        "users": users,
        "requests": requests,
        "errors": errors,
        "errors_by_status": _statuses(prefix),
        "requests_per_s": round(float(row["Requests/s"]), 2),
        "p50_ms": p50,
        "p90_ms": latency[90],
        "p95_ms": latency[95],
        "p99_ms": latency[99],
        "p99_over_p50": round(latency[99] / p50, 2) if p50 else None,
        **({"window": observed} if observed is not None else {}),
    }


def measure_system(
    system: System,
    url: str,
    images: list[bytes],
    profile: Profile,
    work: Path,
    ceiling: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    print(f"{system.name}: starting", flush=True)
    process, cold_start = start(system, url, images[0], work / f"{system.name}.log")
    bracket: dict[str, Any] = {}
    try:
        warm_up(url, images, profile.users, profile.warmup_s)
        if ceiling is not None:  # the server is up but idle (its threads do not spin): the engine has the cores
            bracket["before"] = ceiling()
        sampler = RssSampler(process.pid)
        sampler.start()
        # The bracketed system is our own service: its /metrics gives a steady-state window and CPU by thread.
        during = partial(window.measure, url, process.pid, duration_s=profile.duration_s) if ceiling else None
        users = profile.users * system.users_factor
        load = locust(url, profile, users, work / system.name.replace(" ", "_"), during=during)
        rss = sampler.stop()
        if ceiling is not None:
            bracket["after"] = ceiling()
    finally:
        stop(process)
    result = {"system": system.name, "cold_start_s": round(cold_start, 2), **load, "rss": rss}
    if bracket:
        result["ceiling_next_to_it"] = {
            "before": bracket["before"]["images_per_s"],
            "after": bracket["after"]["images_per_s"],
            "mean": round((bracket["before"]["images_per_s"] + bracket["after"]["images_per_s"]) / 2, 2),
            "mode": bracket["before"]["mode"],
        }
    print(f"{system.name}: {json.dumps(result)}", flush=True)
    return result


def local_env(port: int) -> dict[str, str]:
    """What every server launched here is told: listen on localhost `port`, log warnings only, serve the
    committed artifact."""
    return {"HOST": "127.0.0.1", "PORT": str(port), "LOG_LEVEL": "warning", "MODEL_DIR": str(ROOT / "artifacts")}


def under_load(
    system_on: Callable[[int], System],
    images: list[bytes],
    seconds: int,
    work: Path,
    tag: str,
    users: int = 8,
    during: Callable[[str, int, int], Any] | None = None,
) -> dict[str, Any]:
    """A fresh server (`system_on(port)`), warmed up, then `users` Locust users for `seconds`: Locust's summary,
    plus what `during(url, server_pid, locust_pid)` returns while Locust runs, if given."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process, _ = start(system_on(port), url, images[0], work / f"{tag}.log")
    try:
        warm_up(url, images, users, 3)
        profile = Profile(users=users, duration_s=seconds, warmup_s=0, engine_s=0)
        observe = (lambda pid: during(url, process.pid, pid)) if during is not None else None
        return locust(url, profile, users, work / tag, during=observe)
    finally:
        stop(process)


def service_under_load(
    env: dict[str, str], images: list[bytes], seconds: int, work: Path, tag: str, users: int = 8, code: Path = ROOT
) -> dict[str, Any]:
    """A fresh `python -m service` from `code` on the committed artifact (plus `env`), warmed up, then `users`
    Locust users for `seconds`, with its steady-state window (benchmarks/window.py). Locust's summary + "window"."""

    system_on = partial(service_system, tag, env, code)
    return under_load(system_on, images, seconds, work, tag, users, during=partial(window.measure, duration_s=seconds))


def service_system(tag: str, env: dict[str, str], code: Path, port: int) -> System:
    """`python -m service` from `code` on the committed artifact, on `port`, with `env` added."""
    return System(tag, [sys.executable, "-m", "service"], local_env(port) | env, cwd=code)


def venv_size_mb(requirements: Path, work: Path) -> float:
    venv = work / f"venv-{requirements.stem}"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "-r", str(requirements)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    size = sum(p.stat().st_size for p in venv.rglob("*") if p.is_file() and not p.is_symlink())
    shutil.rmtree(venv)
    return round(size / 2**20, 1)


def ratios(result: dict[str, Any]) -> dict[str, float | None]:
    by = {s["system"]: s for s in result["systems"]}

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    int8, fp32 = by.get("service-int8", {}), by.get("service-fp32", {})
    seed = by.get("seed-tf-predict", {})
    footprint = result.get("footprint") or {}
    next_to_it = (int8.get("ceiling_next_to_it") or {}).get("mean")
    return {
        "service_int8 / engine ceiling measured next to it": ratio(int8.get("ok_per_s"), next_to_it),
        "service_int8 steady-state window / engine ceiling measured next to it": ratio(
            (int8.get("window") or {}).get("answered_per_s"), next_to_it
        ),
        "service_int8 / engine ceiling at start of run": ratio(
            int8.get("ok_per_s"), result["engine"]["best"]["images_per_s"]
        ),
        "service_int8 / engine with decoding (no HTTP)": ratio(
            int8.get("ok_per_s"), (result["engine"].get("with_decoding") or {}).get("images_per_s")
        ),
        "service_int8 / service_int8 1 worker x 2 threads": ratio(
            int8.get("ok_per_s"), by.get("service-int8 1 worker x 2 threads", {}).get("ok_per_s")
        ),
        "service_int8 batch<=4 / service_int8": ratio(
            by.get("service-int8 batch<=4", {}).get("ok_per_s"), int8.get("ok_per_s")
        ),
        "service_int8 / seed_tf_predict": ratio(int8.get("ok_per_s"), seed.get("ok_per_s")),
        "service_int8 / seed_tf_function": ratio(int8.get("ok_per_s"), by.get("seed-tf-function", {}).get("ok_per_s")),
        "service_int8 / service_fp32": ratio(int8.get("ok_per_s"), fp32.get("ok_per_s")),
        "service_int8 p99 / p50": int8.get("p99_over_p50"),
        "serve_venv / export_venv": ratio(footprint.get("serve_venv_mb"), footprint.get("export_venv_mb")),
        "service_int8 cold start / seed_tf_predict cold start": ratio(
            int8.get("cold_start_s"), seed.get("cold_start_s")
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short phases, no footprint: proves the harness")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    parser.add_argument("--name", help="result file name (default: latest, or quick with --quick)")
    parser.add_argument("--only", nargs="+", help="run only these systems")
    args = parser.parse_args(argv)
    profile = QUICK if args.quick else FULL
    name = args.name or ("quick" if args.quick else "latest")

    images = payloads.image_bytes()
    fp32 = fp32_artifact(args.quick)
    manifest = Manifest.read(ROOT / "artifacts")
    inputs = np.stack([preprocess(b, manifest.preprocessing, 10**9) for b in images[:16]])
    print("engine ceiling...", flush=True)
    result: dict[str, Any] = {
        "name": name,
        "quick": args.quick,
        **provenance(command_line("python -m benchmarks.run", argv)),
        "profile": vars(profile),
        "images": {"count": len(images), "sizes": [f"{w}x{h}" for w, h in payloads.SIZES]},
        "artifact": {"sha256": manifest.model.sha256, "quantization": manifest.model.quantization},
        "engine": engine.ceiling(ROOT / "artifacts", inputs, profile.engine_s, images=images),
        "systems": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        port = _free_port()
        best = result["engine"]["best"]

        def ceiling_again() -> dict[str, Any]:
            return engine.rerun(ROOT / "artifacts", inputs, best, profile.engine_s)

        for system in systems(fp32, port):
            if args.only and system.name not in args.only:
                continue
            bracket = ceiling_again if system.bracketed else None
            result["systems"].append(
                measure_system(system, f"http://127.0.0.1:{port}", images, profile, work, ceiling=bracket)
            )
        if not args.quick:
            print("footprint: fresh venvs...", flush=True)
            result["footprint"] = {
                "serve_venv_mb": venv_size_mb(ROOT / "requirements-serve.txt", work),
                "export_venv_mb": venv_size_mb(ROOT / "requirements-export.txt", work),
            }
    result["ratios"] = ratios(result)
    save(args.out, name, result, markdown(result))
    write_plot(result, args.out / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
