"""What every benchmark here is built from: launch and stop a server, load it with Locust, count where the CPU goes
(by thread name: `inference_0`, `decode_1`, the main thread's event loop), and write the result (JSON, a Markdown
table, a plot) with the command, date and machine that made it.
"""

from __future__ import annotations

import argparse
import ast
import compileall
import contextlib
import csv
import io
import json
import math
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import payloads
from service.cpus import available_cpus

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Where a run not given a --name writes (ignored by git): it checks something, it is not evidence to commit.
SCRATCH = ROOT / "benchmarks" / ".cache" / "results"
# How often a launched server is tried until it answers: the first answer is timed to within this.
POLL_S = 0.005
# Git refuses a repository owned by another user ("dubious ownership": a checkout mounted into a container, a CI
# workspace). The only repository asked is the one this code runs from, which is trusted already.
GIT = ("git", "-c", "safe.directory=*")
T = TypeVar("T")

# --- Results: where they came from, and the files. ---


def machine() -> dict[str, Any]:
    """What machine a benchmark ran on, recorded with every result (figures mean little without it)."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    return {
        "cpu": models[0] if models else platform.processor() or "unknown",
        # Without VNNI, x86 int8 kernels multiply u8 by s8 with instructions that can saturate.
        "vnni": any(f in cpuinfo for f in ("avx512_vnni", "avx_vnni")),
        "cores_available": available_cpus(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
    }


def command_line(prog: str, argv: list[str] | None) -> str:
    """The command as it was typed, quoting the arguments a shell would need quoted (empty variants)."""
    given = sys.argv[1:] if argv is None else argv
    return " ".join([prog, *(f'"{a}"' if " " in a or not a else a for a in given)])


def provenance(command: str) -> dict[str, Any]:
    """What every result file starts with: the command that made it, when, and on which machine."""
    return {
        "command": command,
        "created_at": datetime.now(UTC).replace(microsecond=0).isoformat(),
        "machine": machine(),
    }


def header(result: dict[str, Any]) -> str:
    """The first line of a result's Markdown: its command, date and machine."""
    m = result["machine"]
    return (
        f"Command: `{result['command']}` ({result['created_at']}); {m['cpu']}, {m['cores_available']} cores "
        f"available, Python {m['python']}."
    )


def save(out: Path, name: str, result: dict[str, Any], lines: list[str]) -> None:
    """Write out/<name>.json and out/<name>.md (the table), and print the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def add_output_options(parser: argparse.ArgumentParser, default_name: str) -> None:
    parser.add_argument("--out", type=Path, help=f"results folder (default {RESULTS.relative_to(ROOT)} with --name, "
                        f"else {SCRATCH.relative_to(ROOT)})")  # fmt: skip
    parser.add_argument("--name", help=f"result file name (default {default_name})")


def destination(args: argparse.Namespace) -> Path:
    """--out, else benchmarks/results/ for a named run and the scratch folder for one that is not."""
    out: Path = args.out or (RESULTS if args.name else SCRATCH)
    return out


def pyplot() -> Any:
    """matplotlib's pyplot, drawing to files only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def spread(values: list[float]) -> dict[str, float]:
    return {f"{k}_s": round(f(values), 3) for k, f in (("median", statistics.median), ("min", min), ("max", max))}


# --- Servers: launched, timed to their first answer, stopped. ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def multipart_request(image: bytes) -> tuple[str, dict[str, Any]]:
    """POST /infer with the image as the multipart field `image`, as the original's clients send it."""
    return "/infer", {"files": {"image": ("car.jpg", image, "image/jpeg")}}


@dataclass(frozen=True)
class System:
    name: str
    command: list[str]
    env: dict[str, str]
    cwd: Path = ROOT  # where `python -m service` imports the service from (another revision's, for an A/B)
    # One request for an image, (path, httpx keyword arguments), and the Locust file in benchmarks/ that sends the
    # same kind of request (locustfile_oip.py: the Open Inference Protocol, for Triton).
    request: Callable[[bytes], tuple[str, dict[str, Any]]] = multipart_request
    locustfile: str = "locustfile.py"


def local_env(port: int) -> dict[str, str]:
    """Every server launched here listens on localhost `port`, logs warnings only and serves the committed artifact."""
    return {"HOST": "127.0.0.1", "PORT": str(port), "LOG_LEVEL": "warning", "MODEL_DIR": str(ROOT / "artifacts")}


def service_system(name: str, env: dict[str, str], code: Path, port: int) -> System:
    """`python -m service` from `code` on the committed artifact, on `port`, with `env` added."""
    return System(name, [sys.executable, "-m", "service"], local_env(port) | env, cwd=code)


def naive_system(port: int) -> System:
    """The naive reference server (benchmarks/baselines/naive_server.py) on the committed artifact."""
    command = [sys.executable, "-m", "uvicorn", "benchmarks.baselines.naive_server:app"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    return System("naive", command, local_env(port))


def compile_bytecode(code: Path) -> None:
    """Write the bytecode of the Python a server launched in `code` imports from there, as a deployment has it:
    the image compiles service/ (Dockerfile), a clone writes __pycache__ on its first start. Where
    PYTHONDONTWRITEBYTECODE is set every launch would compile service/ again, and take 5% longer to answer."""
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
        while time.perf_counter() < launched + 180:
            if process.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{system.name} exited with {process.returncode}; {log} ends:\n{tail}")
            path, request = system.request(image)
            with contextlib.suppress(httpx.TransportError):  # not listening yet
                if client.post(f"{url}{path}", **request).status_code == 200:
                    return process, time.perf_counter() - launched
            # Triton listens before its model is loaded and refuses at once until then: no busy loop.
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


@dataclass
class Server:
    """A launched server, stopped when its `with` block ends."""

    system: System
    url: str
    process: subprocess.Popen[bytes]
    cold_start_s: float

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        stop(self.process)


def launch(system_on: Callable[[int], System], image: bytes, log: Path) -> Server:
    """`system_on(port)` on a free port, answering: launched and timed to its first answered request."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    system = system_on(port)
    process, seconds = start(system, url, image, log)
    return Server(system, url, process, seconds)


def cold_start_s(system_on: Callable[[int], System], image: bytes, log: Path) -> float:
    """Seconds from launching `system_on(port)` to its first answered request; the server is stopped after."""
    with launch(system_on, image, log) as server:
        return server.cold_start_s


def launch_rounds(
    launchers: list[tuple[str, Callable[[Path], float]]], launches: int, work: Path
) -> tuple[list[dict[str, float]], list[float]]:
    """Round 0 launches each once uncounted (the page cache then is warm for all); each counted round launches each
    once, in alternating order. `launcher(log)` gives one launch's seconds. The rounds, and the machine's 1-minute
    load average after each: other work on the machine moves a cold start by tens of milliseconds."""
    rounds, loads = [], []
    for i in range(launches + 1):
        seconds = {label: run(work / f"{i}.log") for label, run in alternating(launchers, i)}
        print(f"launch {i}{' (not counted)' if i == 0 else ''}: {seconds}", flush=True)
        if i:
            rounds.append(seconds)
            loads.append(round(os.getloadavg()[0], 2))
    return rounds, loads


def warm_up(
    url: str,
    images: list[bytes],
    users: int,
    seconds: float,
    request: Callable[[bytes], tuple[str, dict[str, Any]]] = multipart_request,
) -> None:
    until = time.perf_counter() + seconds

    def loop(i: int) -> None:
        with httpx.Client(timeout=60) as client:
            k = i
            while time.perf_counter() < until:
                path, kwargs = request(images[k % len(images)])
                client.post(f"{url}{path}", **kwargs)
                k += users

    with ThreadPoolExecutor(users) as pool:
        list(pool.map(loop, range(users)))


class RssSampler(threading.Thread):
    """The RSS of a process and all its descendants, four times a second."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.samples: list[int] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.25):
            with contextlib.suppress(psutil.Error):
                tree = [self.process, *self.process.children(recursive=True)]
                self.samples.append(sum(p.memory_info().rss for p in tree if p.is_running()))

    def stop(self) -> dict[str, float]:
        self._done.set()
        self.join()
        values = [s for s in self.samples if s] or [0]
        return {"peak_mb": round(max(values) / 2**20, 1), "mean_mb": round(statistics.mean(values) / 2**20, 1)}


# --- Variants: the service's settings and code, for an A/B. ---


@dataclass(frozen=True)
class Variant:
    env: dict[str, str] = field(default_factory=dict)
    revision: str | None = None  # a commit, as its short hash; None: the working tree

    @property
    def label(self) -> str:
        parts = ([f"@{self.revision}"] if self.revision else []) + [f"{k}={v}" for k, v in self.env.items()]
        return " ".join(parts) or "defaults"


def parse_variant(text: str) -> Variant:
    """A space-separated list of environment settings ("" = the defaults), optionally with one `@REV`."""
    env, revision = {}, None
    for item in text.split():
        if item.startswith("@"):
            if revision is not None:
                raise argparse.ArgumentTypeError(f"{text!r} names more than one revision")
            found = subprocess.run(
                [*GIT, "rev-parse", "--short", "--verify", f"{item[1:]}^{{commit}}"],
                cwd=ROOT, capture_output=True, text=True,
            )  # fmt: skip
            if found.returncode != 0:
                raise argparse.ArgumentTypeError(f"{item[1:]!r} is not a commit of this repository")
            revision = found.stdout.strip()
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{item!r} is not KEY=VALUE or @REVISION")
        env[key] = value
    return Variant(env, revision)


def add_variant_option(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--variant", action="append", type=parse_variant, required=required, help='e.g. "", "WORKERS=4", "@HEAD~1"'
    )


def checkout_service(revision: str, into: Path) -> Path:
    """`service/` as it was at `revision`, in a folder of its own; the folder to run `python -m service` in."""
    archive = subprocess.run([*GIT, "archive", "--format=tar", revision, "service"], cwd=ROOT, capture_output=True)
    if archive.returncode != 0:
        raise RuntimeError(f"git archive {revision} service: {archive.stderr.decode().strip()}")
    code = into / f"rev-{revision}"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(code, filter="data")
    return code


def service_code(variants: list[Variant], work: Path) -> dict[str, Path]:
    """Each variant's folder to run `python -m service` in: its revision's checkout, or the working tree."""
    return {v.label: checkout_service(v.revision, work) if v.revision else ROOT for v in variants}


def alternating(items: list[T], round_index: int) -> list[T]:
    """A B, B A, A B...: a machine that speeds up or slows down during the run favours none of them."""
    return items if round_index % 2 == 0 else items[::-1]


# --- Locust: headless runs and what they leave behind. ---


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


def statuses(prefix: Path) -> dict[str, int]:
    """Failures by HTTP status, from the locustfile's "status NNN: ..." messages."""
    counts: dict[str, int] = {}
    for message, n in failures(prefix).items():
        status = message.split(":")[0].removeprefix("status ").strip() if message.startswith("status") else "other"
        counts[status] = counts.get(status, 0) + n
    return counts


def locust(
    url: str,
    users: int,
    seconds: int,
    prefix: Path,
    during: Callable[[int], Any] | None = None,
    env: dict[str, str] | None = None,
    locustfile: str = "locustfile.py",
) -> dict[str, Any]:
    """Headless Locust against `url`; `during(locust_pid)`, if given, runs while it does and its result is kept
    as "window". `env` is added to Locust's environment (BENCH_IMAGE_SET: benchmarks/locustfile.py)."""
    command = [
        sys.executable, "-m", "locust", "-f", str(ROOT / "benchmarks" / locustfile), "--headless",
        "-u", str(users), "-r", str(users), "-t", f"{seconds}s",
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
        "errors_by_status": statuses(prefix),
        "requests_per_s": round(float(row["Requests/s"]), 2),
        "p50_ms": p50,
        "p90_ms": latency[90],
        "p95_ms": latency[95],
        "p99_ms": latency[99],
        "p99_over_p50": round(latency[99] / p50, 2) if p50 else None,
        **({"window": observed} if observed is not None else {}),
    }


# --- CPU: per-thread CPU time from Linux /proc, grouped by what the thread does. ---

TICKS = os.sysconf("SC_CLK_TCK")
ROLES = ("inference", "decode", "event loop", "other")


def role(name: str, main: bool) -> str:
    """What a thread does, by its name (service/threads.py names them); `main`: the process's own thread."""
    if main:
        return "event loop"
    prefix = name.rstrip("0123456789").rstrip("_")
    return prefix if prefix in ("inference", "decode") else "other"


def _cpu_s(stat: str) -> float:
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime, fields 14 and 15 of proc(5)


@dataclass(frozen=True)
class Snapshot:
    at: float
    by_role: dict[str, float]
    machine_idle: int
    machine_total: int
    load_generator: float = 0.0  # whole-process CPU s of the load generator, if one is watched
    process_s: float = 0.0  # CPU s of the watched process and its descendants, the ended ones waited for included
    benchmark_s: float = 0.0  # this process's CPU s and its waited-for children's (a Locust run that has ended)


def snapshot(pid: int, load_pid: int | None = None) -> Snapshot:
    by_role: defaultdict[str, float] = defaultdict(float)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            by_role[role(name, task.name == str(pid))] += _cpu_s((task / "stat").read_text())
        except (FileNotFoundError, ProcessLookupError):  # a thread that ended meanwhile
            continue
    load = 0.0
    if load_pid is not None:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # it has exited
            load = _cpu_s(Path(f"/proc/{load_pid}/stat").read_text())
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    benchmark = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    idle, total = ticks[3] + ticks[4], sum(ticks)  # (idle + iowait, all)
    return Snapshot(time.perf_counter(), dict(by_role), idle, total, load, tree_cpu_s(pid), benchmark)


def tree_cpu_s(pid: int) -> float:
    """CPU s of a process tree: a server may run its work in child processes (Triton's under pytriton, uvicorn's
    workers). A child that ended and was waited for counts in its parent's children_* times."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    spent = 0.0
    for process in tree:
        with contextlib.suppress(psutil.Error):  # it ended meanwhile
            t = process.cpu_times()
            spent += t.user + t.system + t.children_user + t.children_system
    return spent


def per_item_ms(before: Snapshot, after: Snapshot, items: int) -> dict[str, float]:
    """CPU milliseconds per item between two snapshots: each role, the service (all roles), the load
    generator, and all of it."""
    if items <= 0:
        return {}
    out = {role: (after.by_role.get(role, 0.0) - before.by_role.get(role, 0.0)) * 1000 / items for role in ROLES}
    out["service"] = sum(out.values())
    out["load generator"] = (after.load_generator - before.load_generator) * 1000 / items
    out["all"] = out["service"] + out["load generator"]
    return {k: round(v, 2) for k, v in out.items()}


def machine_idle(before: Snapshot, after: Snapshot) -> float:
    """The share of the whole machine's CPU time that nobody used between two snapshots."""
    total = after.machine_total - before.machine_total
    return round((after.machine_idle - before.machine_idle) / total, 4) if total else 0.0


def other_work(before: Snapshot, after: Snapshot) -> float:
    """Cores' worth of CPU that neither the watched process tree nor the benchmark (itself and the children it
    has waited for: a Locust run that ended between the snapshots) used: other work on a shared machine, and a
    virtual machine's steal time. Unlike the load average it does not count the benchmark's own load, and it
    does not lag into the next point. Signed: tick sampling of the machine's time against the processes' exact
    times can leave a quiet point a hundredth of a core below zero."""
    wall = after.at - before.at
    busy = (after.machine_total - after.machine_idle) - (before.machine_total - before.machine_idle)
    ours = (after.process_s - before.process_s) + (after.benchmark_s - before.benchmark_s)
    return round((busy / TICKS - ours) / wall, 3) if wall > 0 else 0.0


# --- The steady-state window of a load phase, counted by the service itself. ---

# Locust's own requests/s includes its ramp-up and its last, half-empty second. The window skips both: it starts
# SETTLE_S after the first answers and ends TAIL_S before the load phase does.
SETTLE_S = 2.0
TAIL_S = 4.0


def answered(url: str) -> int:
    """POST /infer answers with status 200 so far, from the service's own counter."""
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        if family.name == "http_requests":
            ok = {"route": "/infer", "status": "200"}
            return int(sum(s.value for s in family.samples if s.name.endswith("_total") and s.labels == ok))
    return 0


def window(url: str, service_pid: int, load_pid: int, duration_s: float) -> dict[str, Any]:
    """Blocks while a load generator (`load_pid`) drives the service for `duration_s`: until its first answers,
    SETTLE_S more, then the window, which ends TAIL_S before the load phase does. The service's answers over the
    window, and the CPU of its threads and of the load generator per answered request."""
    first = answered(url)
    deadline = time.perf_counter() + 60
    while answered(url) == first and time.perf_counter() < deadline:  # the load generator is still starting
        time.sleep(0.2)
    time.sleep(SETTLE_S)
    count0, before = answered(url), snapshot(service_pid, load_pid)
    time.sleep(duration_s - SETTLE_S - TAIL_S)
    count1, after = answered(url), snapshot(service_pid, load_pid)
    requests = count1 - count0
    return {
        "seconds": round(after.at - before.at, 2),
        "answered": requests,
        "answered_per_s": round(requests / (after.at - before.at), 2),
        "cpu_ms_per_request": per_item_ms(before, after, requests),
        "machine_idle": machine_idle(before, after),
    }


# --- A load phase on a launched server. ---


def load_phase(
    server: Server, users: int, seconds: int, prefix: Path, env: dict[str, str] | None = None, steady: bool = False
) -> dict[str, Any]:
    """Locust against a warm server: its summary, the server tree's RSS, and the CPU that other work on the
    machine took meanwhile (a busy machine skews a point); with `steady`, the service's steady-state window."""
    sampler = RssSampler(server.process.pid)
    sampler.start()
    before = snapshot(server.process.pid)
    during = partial(window, server.url, server.process.pid, duration_s=seconds) if steady else None
    try:
        load = locust(server.url, users, seconds, prefix, during, env, server.system.locustfile)
    finally:
        rss = sampler.stop()
    after = snapshot(server.process.pid)
    return {
        **load,
        "rss": rss,
        "machine_idle": machine_idle(before, after),
        "other_work_cores": other_work(before, after),
    }


def under_load(
    system_on: Callable[[int], System],
    seconds: int,
    work: Path,
    tag: str,
    users: int = 8,
    steady: bool = False,
    image_set: str = "large",
) -> dict[str, Any]:
    """A fresh server (`system_on(port)`), warmed up, then `users` Locust users for `seconds` sending `image_set`
    (benchmarks/payloads.py): Locust's summary, with the service's steady-state window ("window") if `steady`."""
    images = payloads.image_set(image_set)
    with launch(system_on, images[0], work / f"{tag}.log") as server:
        warm_up(server.url, images, users, 3, server.system.request)
        during = partial(window, server.url, server.process.pid, duration_s=seconds) if steady else None
        return locust(server.url, users, seconds, work / tag, during=during, env={"BENCH_IMAGE_SET": image_set})


def service_under_load(
    env: dict[str, str],
    seconds: int,
    work: Path,
    tag: str,
    users: int = 8,
    code: Path = ROOT,
    image_set: str = "large",
) -> dict[str, Any]:
    """A fresh `python -m service` from `code` on the committed artifact (plus `env`) under load, with its
    steady-state window."""
    system = partial(service_system, tag, env, code)
    return under_load(system, seconds, work, tag, users, steady=True, image_set=image_set)
