"""Soak: the service at a steady fraction of its saturation, for minutes, with hostile inputs mixed in.

    python -m benchmarks.soak                  # 10 minutes at 0.7 of saturation (about 11 minutes in all)
    python -m benchmarks.soak --silent 10000   # RSS under 10,000 connections that never send a request

Valid JPEGs at RATE_FRACTION of saturation, every fourth request one of the README's bad inputs and a stalled
upload at a time (each its own 4xx). Checks: RSS growth <= 5% from minute 2, no unexpected status, each minute's
p99 within 1.5x of the first's. Writes results/<name>.*.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from urllib3 import encode_multipart_formdata

from benchmarks import payloads
from benchmarks.harness import (
    RESULTS,
    ROOT,
    command_line,
    launch,
    multipart_request,
    provenance,
    pyplot,
    save,
    service_system,
    service_under_load,
)
from service.settings import Settings

IMAGE_SET = "large"
VALID = "valid JPEG (multipart)"
STALLED = "stalled upload"
# Of every 4 requests, 3 are valid images and 1 is a bad input; the bad inputs take turns.
VALID_PER_BAD = 3
RSS_GROWTH_MAX = 0.05
P99_RATIO_MAX = 1.5


@dataclass(frozen=True)
class Probe:
    """One kind of request: what is sent and the status it must get."""

    name: str
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    expected: int


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels, followed by a tiny IDAT: a decompression bomb's
    signature, without the bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def probes(images: list[bytes], api_key: str, max_upload_bytes: int) -> list[Probe]:
    """Every bad input of the README's error table, plus a wrong API key; then the valid ones (one per image)."""
    auth = {"Authorization": f"Bearer {api_key}"}

    def form(data: bytes, name: str = "image", filename: str = "car.jpg") -> tuple[dict[str, str], bytes]:
        body, content_type = encode_multipart_formdata({name: (filename, data, "image/jpeg")})
        return {**auth, "Content-Type": content_type}, body

    def raw(content_type: str, body: bytes) -> tuple[dict[str, str], bytes]:
        return {**auth, "Content-Type": content_type}, body

    jpeg = images[0]
    no_boundary = b"--x\r\nContent-Disposition: form-data; name=image\r\n\r\nabc\r\n--x--\r\n"
    bad_base64 = json.dumps({"image": "this is *not* base64!"}).encode()
    wrong_key = {**form(jpeg)[0], "Authorization": "Bearer wrong"}
    bad = [
        Probe("not an image", "POST", "/infer", *form(b"this is not an image\n" * 50), 400),
        Probe("truncated JPEG", "POST", "/infer", *form(jpeg[: len(jpeg) // 2]), 400),
        Probe("0 bytes", "POST", "/infer", *raw("image/jpeg", b""), 400),
        Probe("broken multipart", "POST", "/infer", *raw("multipart/form-data", no_boundary), 400),
        Probe("oversized upload", "POST", "/infer", *raw("image/jpeg", b"\xff" * (max_upload_bytes + 1)), 413),
        Probe("decompression bomb header", "POST", "/infer", *form(_png_header(50_000, 50_000), filename="b.png"), 413),
        Probe("text/plain", "POST", "/infer", *raw("text/plain", b"a car, please"), 415),
        Probe("multipart without image part", "POST", "/infer", *form(jpeg, name="picture"), 422),
        Probe("bad base64", "POST", "/infer", *raw("application/json", bad_base64), 422),
        Probe("bad top_k", "POST", "/infer?top_k=0", *form(jpeg), 422),
        Probe("unknown route", "GET", "/no-such-route", auth, b"", 404),
        Probe("wrong method", "GET", "/infer", auth, b"", 405),
        Probe("wrong API key", "POST", "/infer", wrong_key, form(jpeg)[1], 401),
    ]
    valid = [Probe(VALID, "POST", "/infer", *form(image), 200) for image in images]
    return bad + valid


def schedule(all_probes: list[Probe]) -> list[Probe]:
    """One cycle of requests: VALID_PER_BAD valid images, then the next bad input, until each bad one came once."""
    bad = [p for p in all_probes if p.name != VALID]
    valid = [p for p in all_probes if p.name == VALID]
    cycle: list[Probe] = []
    for i, probe in enumerate(bad):
        cycle += [valid[(i * VALID_PER_BAD + k) % len(valid)] for k in range(VALID_PER_BAD)]
        cycle.append(probe)
    return cycle


# --- The load generator: a subprocess that runs Locust as a library (it gevent-patches the process). ---


def generate(spec_path: str) -> None:
    """Run from `python -c "import locust; ..."` so that gevent patches the process first."""
    import itertools
    import random
    import socket

    import gevent
    from locust import FastHttpUser, User, constant, constant_throughput, events, task
    from locust.env import Environment

    spec = json.loads(Path(spec_path).read_text())
    all_probes = probes(payloads.image_set(IMAGE_SET), spec["api_key"], spec["max_upload_bytes"])
    cycle = schedule(all_probes)
    expected = {p.name: p.expected for p in all_probes}
    records: list[tuple[float, str, int, float]] = []
    t0 = time.time() + spec["warmup_s"]

    @events.request.add_listener
    def _record(name: str, response_time: float, response: Any, start_time: float, **kwargs: Any) -> None:
        status = int(getattr(response, "status_code", 0) or 0)
        records.append((round(start_time - t0, 3), name, status, round(response_time, 2)))

    class SoakUser(FastHttpUser):  # type: ignore[misc]
        host = spec["url"]
        wait_time = constant_throughput(spec["per_user_rate"])
        network_timeout = 60.0
        connection_timeout = 60.0

        def on_start(self) -> None:
            self._cycle = itertools.islice(itertools.cycle(cycle), random.randrange(len(cycle)), None)

        @task
        def send(self) -> None:
            probe = next(self._cycle)
            with self.client.request(
                probe.method, probe.path, data=probe.body, headers=probe.headers, name=probe.name, catch_response=True
            ) as response:
                if response.status_code == probe.expected:
                    response.success()
                else:
                    response.failure(f"status {response.status_code}, expected {probe.expected}")

    class StalledUser(User):  # type: ignore[misc]
        """Sends a POST /infer's headers and a few body bytes, then nothing: the service must answer 408."""

        fixed_count = 1
        wait_time = constant(2)

        @task
        def stall(self) -> None:
            host, port = spec["url"].removeprefix("http://").split(":")
            head = (
                f"POST /infer HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {spec['api_key']}\r\n"
                "Content-Type: image/jpeg\r\nContent-Length: 200000\r\n\r\n"
            )
            started, status = time.time(), 0
            try:
                with socket.create_connection((host, int(port)), timeout=120) as conn:
                    conn.sendall(head.encode() + b"\xff\xd8" * 50)
                    answer = conn.recv(4096)
                    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
            except OSError:
                status = 0
            elapsed = (time.time() - started) * 1000
            events.request.fire(
                request_type="POST",
                name=STALLED,
                response_time=elapsed,
                response_length=0,
                response=type("Answer", (), {"status_code": status})(),
                exception=None if status == expected[STALLED] else RuntimeError(f"status {status}"),
                context={},
                start_time=started,
            )

    expected[STALLED] = 408
    environment = Environment(user_classes=[SoakUser, StalledUser], events=events)
    runner = environment.create_local_runner()
    runner.start(spec["users"] + 1, spawn_rate=spec["users"] + 1)
    gevent.spawn_later(spec["warmup_s"] + spec["duration_s"], runner.quit)
    runner.greenlet.join()
    Path(spec["records"]).write_text(json.dumps({"t0": t0, "records": records}))


# --- The driver: service, sampling, analysis. ---


class Sampler(threading.Thread):
    """Once a second: the service's RSS, and the CPU seconds of the service, the load generator and the machine."""

    def __init__(self, service_pid: int, generator_pid: int) -> None:
        super().__init__(daemon=True)
        self.service = psutil.Process(service_pid)
        self.generator = psutil.Process(generator_pid)
        self.me = psutil.Process()
        self.samples: list[dict[str, float]] = []
        self._done = threading.Event()

    @staticmethod
    def _cpu(process: psutil.Process) -> float:
        try:
            times = process.cpu_times()
            return float(times.user + times.system + times.children_user + times.children_system)
        except psutil.Error:
            return math.nan

    def run(self) -> None:
        processes = {"service": self.service, "generator": self.generator, "driver": self.me}
        while not self._done.wait(1.0):
            m = psutil.cpu_times()
            try:
                rss = self.service.memory_info().rss
            except psutil.Error:
                break
            cpu = {f"{name}_cpu_s": self._cpu(process) for name, process in processes.items()}
            busy = m.user + m.nice + m.system + m.irq + m.softirq + m.steal
            self.samples.append({"at": time.time(), "rss_mb": rss / 2**20, **cpu, "machine_busy_s": busy})

    def stop(self) -> list[dict[str, float]]:
        self._done.set()
        self.join()
        return self.samples


def saturation(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    if args.saturation_from:
        result = json.loads(args.saturation_from.read_text())
        rates = [r["service_answered_per_s"] for r in result["rounds"]]
        return {
            "answered_per_s": float(np.median(rates)),
            "source": f"{args.saturation_from.name}: median service_answered_per_s of {len(rates)} rounds "
            f"({result['command']}, {result['created_at']})",
        }
    print(f"saturation: {args.saturation_s} s of 8 closed-loop users on a fresh service...", flush=True)
    load = service_under_load({}, args.saturation_s, work, "saturation", image_set=IMAGE_SET)
    reference = json.loads((RESULTS / "saturation.json").read_text())
    return {
        "answered_per_s": load["window"]["answered_per_s"],
        # For comparison only: another machine, or a calmer spell of this one.
        "committed_saturation_json": {
            "median_answered_per_s": float(np.median([r["service_answered_per_s"] for r in reference["rounds"]])),
            "machine": reference["machine"]["cpu"],
            "created_at": reference["created_at"],
        },
        "source": f"measured here: {args.saturation_s} s, 8 closed-loop Locust users, steady-state window "
        "(benchmarks.harness.window) of a fresh service",
        "locust": {k: load[k] for k in ("ok_per_s", "p50_ms", "p99_ms", "errors")},
    }


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def analyse(
    records: list[list[Any]], samples: list[dict[str, float]], t0: float, minutes: int, expected: dict[str, int]
) -> dict[str, Any]:
    end = minutes * 60
    counted = [r for r in records if 0 <= r[0] < end]
    by_kind: dict[str, dict[str, int]] = {}
    unexpected: dict[str, int] = {}
    for _, name, status, _ in counted:
        by_kind.setdefault(name, {})
        by_kind[name][str(status)] = by_kind[name].get(str(status), 0) + 1
        if status != expected[name]:
            unexpected[f"{name}: {status}"] = unexpected.get(f"{name}: {status}", 0) + 1
    rss = [(s["at"] - t0, s["rss_mb"]) for s in samples]
    per_minute = []
    for m in range(minutes):
        valid = [r[3] for r in counted if r[1] == VALID and r[2] == 200 and m * 60 <= r[0] < (m + 1) * 60]
        statuses: dict[str, int] = {}
        for r in counted:
            if m * 60 <= r[0] < (m + 1) * 60:
                statuses[str(r[2])] = statuses.get(str(r[2]), 0) + 1
        window = [s for s in samples if m * 60 <= s["at"] - t0 < (m + 1) * 60]
        cores: dict[str, float | None] = {}
        if len(window) >= 2:
            a, b = window[0], window[-1]
            seconds = b["at"] - a["at"]
            service = (b["service_cpu_s"] - a["service_cpu_s"]) / seconds
            generator = (b["generator_cpu_s"] - a["generator_cpu_s"]) / seconds
            driver = (b["driver_cpu_s"] - a["driver_cpu_s"]) / seconds
            busy = (b["machine_busy_s"] - a["machine_busy_s"]) / seconds
            cores = {
                "service": round(service, 2),
                "load generator": round(generator, 2),
                "others": round(max(0.0, busy - service - generator - driver), 2),
            }
        per_minute.append(
            {
                "minute": m + 1,
                "valid_answered": len(valid),
                "valid_per_s": round(len(valid) / 60, 2),
                "sent_per_s": round(sum(1 for r in counted if m * 60 <= r[0] < (m + 1) * 60) / 60, 2),
                "p50_ms": _percentile(valid, 50),
                "p99_ms": _percentile(valid, 99),
                "statuses": dict(sorted(statuses.items())),
                "rss_mb_median": round(float(np.median([s["rss_mb"] for s in window])), 1) if window else None,
                "cpu_cores": cores,
            }
        )
    return {
        "requests": len(counted),
        "by_kind": {k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())},
        "unexpected": unexpected,
        "per_minute": per_minute,
        "rss_mb": {
            "samples": [[round(t, 1), round(v, 1)] for t, v in rss],
            "peak": round(max(v for _, v in rss), 1) if rss else None,
        },
    }


def checks(analysis: dict[str, Any], minutes: int) -> dict[str, Any]:
    per_minute = analysis["per_minute"]
    out: dict[str, Any] = {}
    if minutes >= 3:
        second, last = per_minute[1]["rss_mb_median"], per_minute[-1]["rss_mb_median"]
        growth = last / second - 1
        out["rss_growth"] = {
            "minute_2_mb": second,
            f"minute_{minutes}_mb": last,
            "growth": round(growth, 4),
            "limit": RSS_GROWTH_MAX,
            "passed": growth <= RSS_GROWTH_MAX,
        }
    else:
        out["rss_growth"] = {"passed": None, "why": "needs at least 3 minutes (minute 2 against the last)"}
    unexpected = sum(analysis["unexpected"].values())
    out["only_expected_statuses"] = {"unexpected": unexpected, "passed": unexpected == 0}
    first = per_minute[0]["p99_ms"]
    ratios = [round(m["p99_ms"] / first, 2) if first and m["p99_ms"] else None for m in per_minute]
    worst = max((r for r in ratios if r is not None), default=None)
    out["p99_within_first_minute"] = {
        "first_minute_p99_ms": first,
        "ratio_by_minute": ratios,
        "worst": worst,
        "limit": P99_RATIO_MAX,
        "passed": worst is not None and worst <= P99_RATIO_MAX and None not in ratios,
    }
    out["all_passed"] = all(c["passed"] is not False for c in out.values() if isinstance(c, dict))
    return out


def markdown(result: dict[str, Any]) -> list[str]:
    m, load, a, c = result["machine"], result["load"], result["analysis"], result["checks"]

    def verdict(check: dict[str, Any]) -> str:
        return {True: "**pass**", False: "**FAIL**", None: "n/a"}[check["passed"]]

    rss = c["rss_growth"]
    last_mb = rss.get(f"minute_{load['minutes']}_mb")
    lines = [
        f"Command: `{result['command']}` ({result['created_at']}); {m['cpu']}, {m['cores_available']} cores "
        f"available, {m['memory_gb']} GB, Python {m['python']}. The service: `python -m service` on the committed "
        "artifacts/ (default settings, an API key set), Locust on the same cores.",
        "",
        f"Saturation: {result['saturation']['answered_per_s']} answered/s ({result['saturation']['source']}"
        + (
            f"; results/saturation.json, {ref['machine']} at {ref['created_at']}: {ref['median_answered_per_s']}). "
            if (ref := result["saturation"].get("committed_saturation_json"))
            else "). "
        )
        + 
        f"Load: {load['users']} Locust users paced with `constant_throughput`, valid JPEGs at "
        f"{load['rate_fraction']} of saturation = {load['valid_per_s']} req/s, plus one bad input per "
        f"{VALID_PER_BAD} valid ones ({load['total_per_s']} req/s in all), plus one user that keeps a stalled "
        f"upload open; {load['warmup_s']} s uncounted warm-up, then {load['minutes']} minutes counted.",
        "",
        "| check | result | verdict |",
        "|---|---|---|",
        f"| RSS growth, minute 2 to the last minute (median of 1 s samples) <= {RSS_GROWTH_MAX:.0%} | "
        + (f"{rss['minute_2_mb']} -> {last_mb} MB ({rss['growth']:+.1%})" if "growth" in rss
           else rss["why"])
        + f" | {verdict(rss)} |",
        f"| answers other than 200 and each bad input's expected status | "
        f"{c['only_expected_statuses']['unexpected']} | {verdict(c['only_expected_statuses'])} |",
        f"| worst minute's p99 / first minute's p99 (valid requests) <= {P99_RATIO_MAX} | "
        f"{c['p99_within_first_minute']['worst']} | {verdict(c['p99_within_first_minute'])} |",
        "",
        f"Per minute (target: {load['total_per_s']} answered/s in all, {load['valid_per_s']} valid; latency of the "
        "valid requests answered 200; CPU in cores, from /proc: the service, the load "
        "generator, and everything else on the machine, i.e. other people's jobs):",
        "",
        "| minute | answered/s (all) | valid answered/s | p50 ms | p99 ms | p99 / minute 1 | RSS MB | statuses "
        "| service | Locust | others |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    ratios = c["p99_within_first_minute"]["ratio_by_minute"]
    for row, ratio in zip(a["per_minute"], ratios, strict=True):
        cores = row["cpu_cores"]
        statuses = ", ".join(f"{k}: {v}" for k, v in row["statuses"].items())
        lines.append(
            f"| {row['minute']} | {row.get('sent_per_s')} | {row['valid_per_s']} | {row['p50_ms']} | {row['p99_ms']} | "
            f"{ratio} | "
            f"{row['rss_mb_median']} | {statuses} | {cores.get('service')} | {cores.get('load generator')} | "
            f"{cores.get('others')} |"
        )
    lines += [
        "",
        "Answers by kind of request (status: count):",
        "",
        "| request | expected | answers |",
        "|---|---|---|",
    ]
    for kind, statuses in a["by_kind"].items():
        answers = ", ".join(f"{k}: {v}" for k, v in statuses.items())
        lines.append(f"| {kind} | {result['expected'][kind]} | {answers} |")
    if a["unexpected"]:
        lines += ["", "Unexpected answers: " + ", ".join(f"{k} x {v}" for k, v in a["unexpected"].items())]
    for note in result.get("notes", []):
        lines += ["", note]
    return lines


def write_plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    samples = result["analysis"]["rss_mb"]["samples"]
    per_minute = result["analysis"]["per_minute"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    top.plot([t / 60 for t, _ in samples], [v for _, v in samples], color="tab:blue", linewidth=1)
    top.set_ylabel("service RSS MB (1 s samples)")
    top.set_ylim(bottom=0)
    top.grid(alpha=0.3)
    minutes = [row["minute"] - 0.5 for row in per_minute]
    bottom.plot(minutes, [row["p50_ms"] for row in per_minute], "o-", label="p50 valid")
    bottom.plot(minutes, [row["p99_ms"] for row in per_minute], "o-", label="p99 valid")
    first = per_minute[0]["p99_ms"]
    if first:
        bottom.axhline(first * P99_RATIO_MAX, color="tab:red", linestyle="--", label=f"{P99_RATIO_MAX}x first p99")
    bottom.set_ylabel("latency ms")
    bottom.set_ylim(bottom=0)
    others = bottom.twinx()
    others.plot(
        minutes, [row["cpu_cores"].get("others") for row in per_minute], "s:", color="grey", label="others' CPU"
    )
    others.set_ylabel("other jobs on the machine, cores")
    others.set_ylim(bottom=0)
    bottom.set_xlabel("minutes of load")
    bottom.legend(loc="upper left")
    others.legend(loc="upper right")
    bottom.grid(alpha=0.3)
    load = result["load"]
    fig.suptitle(
        f"python -m benchmarks.soak: {load['total_per_s']} req/s for {load['minutes']} min ({result['created_at']}), "
        f"{result['machine']['cpu']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def silent(count: int, deadline_s: float, argv: list[str] | None) -> tuple[dict[str, Any], list[str]]:
    """The service's RSS before, with `count` connections that never send a byte, and past the header deadline."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard := resource.getrlimit(resource.RLIMIT_NOFILE)[1], hard))
    system_on = partial(service_system, "silent", {"REQUEST_READ_TIMEOUT_S": str(deadline_s)}, ROOT)
    with (
        tempfile.TemporaryDirectory() as tmp,
        launch(system_on, payloads.image_set(IMAGE_SET)[0], Path(tmp) / "log") as s,
    ):

        def state() -> tuple[float, float]:  # RSS in MB, and the connections the service counts open
            text = urllib.request.urlopen(f"{s.url}/metrics", timeout=10).read().decode()
            counted = next(
                float(line.split()[-1]) for line in text.splitlines() if line.startswith("http_connections_open ")
            )
            return round(psutil.Process(s.process.pid).memory_info().rss / 2**20, 1), counted

        before = state()
        sockets = [socket.create_connection(("127.0.0.1", int(s.url.rsplit(":", 1)[1]))) for _ in range(count)]
        opened_at = time.monotonic()
        time.sleep(0.5)  # every connection accepted
        during = state()
        while (after := state())[1] > 1 and time.monotonic() - opened_at < 3 * deadline_s:
            time.sleep(0.25)
        closed_s = round(time.monotonic() - opened_at, 1)  # from the last one opened until all are closed
        for sock in sockets:
            sock.close()
    each = round((during[0] - before[0]) * 1024 / count, 2)
    result = {"name": f"silent-{count}", **provenance(command_line("python -m benchmarks.soak", argv))}
    result |= {"before": before, "open": during, "closed": after, "closed_after_s": closed_s, "kb_each": each}
    line = f"RSS MB and connections open: {before} before; {during} with {count} silent ones ({each} KB each); "
    return result, [line + f"{after} {closed_s} s after the last opened (header deadline {deadline_s:g} s)."]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--silent", type=int, help="instead: RSS under this many connections that send nothing")
    parser.add_argument("--minutes", type=int, default=10, help="minutes of counted load (default 10)")
    parser.add_argument("--rate-fraction", type=float, default=0.7, help="valid images/s as a share of saturation")
    parser.add_argument("--saturation-s", type=int, default=20, help="seconds of the saturation measurement")
    parser.add_argument("--saturation-from", type=Path, help="read saturation from a benchmarks.saturation result")
    parser.add_argument("--warmup-s", type=float, default=10, help="uncounted seconds of load before minute 1")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--name", default="soak", help="result file name (default: soak)")
    parser.add_argument("--note", action="append", default=[], help="a line added to the Markdown (repeatable)")
    args = parser.parse_args(argv)
    if args.silent:
        save(args.out, f"silent-{args.silent}", *silent(args.silent, 5.0, argv))
        return 0

    max_upload = Settings.from_env({}).max_upload_bytes
    api_key = "soak-" + os.urandom(8).hex()
    images = payloads.image_set(IMAGE_SET)
    all_probes = probes(images, api_key, max_upload)
    expected = {p.name: p.expected for p in all_probes} | {STALLED: 408}
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        work = Path(tmp)
        sat = saturation(args, work)
        valid_rate = args.rate_fraction * sat["answered_per_s"]
        total_rate = valid_rate * (VALID_PER_BAD + 1) / VALID_PER_BAD
        # A user is closed-loop: it sends again only once answered. Enough users that each waits between requests
        # even when a request takes twice the saturation run's p99, so the rate holds when the machine is slow.
        p99_s = sat.get("locust", {}).get("p99_ms", 1000) / 1000
        users = min(200, max(4, math.ceil(total_rate * max(0.5, 2 * p99_s))))
        load = {
            "minutes": args.minutes,
            "warmup_s": args.warmup_s,
            "rate_fraction": args.rate_fraction,
            "valid_per_s": round(valid_rate, 2),
            "total_per_s": round(total_rate, 2),
            "users": users,
        }
        print(f"soak: {json.dumps(load)}", flush=True)
        auth = {"headers": {"Authorization": f"Bearer {api_key}"}}
        system_on = partial(service_system, "soak", {"API_KEY": api_key}, ROOT)
        with launch(
            lambda port: replace(system_on(port), request=lambda image: ("/infer", multipart_request(image)[1] | auth)),
            images[0],
            work / "service.log",
        ) as service:
            spec = {
                "url": service.url,
                "api_key": api_key,
                "max_upload_bytes": max_upload,
                "users": users,
                "per_user_rate": total_rate / users,
                "warmup_s": args.warmup_s,
                "duration_s": args.minutes * 60,
                "records": str(work / "records.json"),
            }
            (work / "spec.json").write_text(json.dumps(spec))
            # Locust gevent-patches the process, which must happen before ssl (httpx, urllib3) is imported.
            code = f"import locust; from benchmarks.soak import generate; generate({str(work / 'spec.json')!r})"
            generator = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
            sampler = Sampler(service.process.pid, generator.pid)
            sampler.start()
            if generator.wait() != 0:
                raise RuntimeError(f"the load generator exited with {generator.returncode}")
            samples = sampler.stop()
            alive = service.process.poll() is None
        generated = json.loads((work / "records.json").read_text())
        log_tail = (work / "service.log").read_text(errors="replace")[-3000:]

    analysis = analyse(generated["records"], samples, generated["t0"], args.minutes, expected)
    result: dict[str, Any] = {
        "name": args.name,
        **provenance(command_line("python -m benchmarks.soak", argv)),
        "saturation": sat,
        "load": load,
        "probes": [
            {k: v for k, v in asdict(p).items() if k not in ("body", "headers")} for p in all_probes if p.name != VALID
        ],
        "expected": expected,
        "service_alive_at_end": alive,
        "analysis": analysis,
        "checks": checks(analysis, args.minutes),
        "notes": args.note,
        "service_log_tail": log_tail,
    }
    save(args.out, args.name, result, markdown(result))
    write_plot(result, args.out / f"{args.name}.png")
    print(json.dumps(result["checks"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
