"""Memory of a hot model swap: peak RSS of `python -m service` while it loads the committed artifact again.

A swap verifies and warms the new artifact beside the one serving (two models in memory briefly), switches,
and frees the old one when its last request is answered; the new model's wide session is then built in the
background. This starts the service on artifacts/, lets its wide session finish, then for each swap resets
the kernel's peak-RSS mark (/proc/PID/clear_refs), posts /v2/repository/models/{name}/load while clients keep
sending /infer, waits for the new wide session, and reads the peak (VmHWM) and the settled RSS.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.report import command_line, provenance, save
from service.manifest import Manifest
from tests.helpers import start_service, stop_service

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def _metric(url: str, name: str, **labels: str) -> float | None:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def _wait(condition: Any, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"still waiting for {what} after {timeout} s")
        time.sleep(0.05)


def _photo() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    buffer = BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class Clients:
    def __init__(self, url: str, count: int, photo: bytes) -> None:
        self.stop = threading.Event()
        self.statuses: list[int] = []
        self.threads = [threading.Thread(target=self._run, args=(url, photo)) for _ in range(count)]

    def _run(self, url: str, photo: bytes) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                self.statuses.append(client.post(f"{url}/infer", files={"image": photo}).status_code)

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def measure(artifact: Path, swaps: int, clients: int, log: Path) -> dict[str, Any]:
    name = Manifest.read(artifact).name
    server = start_service(artifact, log)
    pid = server.process.pid
    try:
        photo = _photo()
        for _ in range(5):  # the wide session is built once an answer has gone out
            httpx.post(f"{server.url}/infer", files={"image": photo}, timeout=60).raise_for_status()
        _wait(lambda: _metric(server.url, "inference_session_threads", session="wide") is not None, "the wide session")
        wide = _metric(server.url, "inference_session_threads", session="wide")
        result: dict[str, Any] = {
            "start_peak_mb": _status_mb(pid, "VmHWM"),
            "serving_rss_mb": _status_mb(pid, "VmRSS"),
            "wide_threads": wide,
            "swaps": [],
        }
        with Clients(server.url, clients, photo) as load:
            for i in range(1, swaps + 1):
                before = _status_mb(pid, "VmRSS")
                Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak RSS mark := current RSS
                started = time.perf_counter()
                answer = httpx.post(f"{server.url}/v2/repository/models/{name}/load", timeout=120)
                answer.raise_for_status()
                load_s = time.perf_counter() - started
                _wait(lambda i=i: _metric(server.url, "model_loads_total", outcome="loaded") == i, "the load counted")
                _wait(
                    lambda: _metric(server.url, "inference_session_threads", session="wide") == wide,
                    "the new wide session",
                )
                time.sleep(1.0)  # requests on the old model answered, its sessions freed
                result["swaps"].append(
                    {
                        "rss_before_mb": before,
                        "peak_mb": _status_mb(pid, "VmHWM"),
                        "rss_after_mb": _status_mb(pid, "VmRSS"),
                        "load_s": round(load_s, 2),
                    }
                )
        result["requests"] = len(load.statuses)
        result["failed_requests"] = sum(status != 200 for status in load.statuses)
        return result
    finally:
        stop_service(server)


def markdown(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    lines = [
        f"Command: `{result['command']}` ({result['created_at']}); {m['cpu']}, {m['cores_available']} cores "
        f"available, {m['memory_gb']} GB, Python {m['python']}.",
        f"Artifact: {result['artifact']} ({result['model_mb']} MB model file); {result['clients']} clients sending "
        f"/infer throughout; wide session {result['wide_threads']:g} threads.",
        "",
        f"Serving before any swap: RSS {result['serving_rss_mb']} MB (peak since start {result['start_peak_mb']} MB).",
        "",
        "| swap | RSS before MB | peak during swap MB | RSS after MB | load answered in s |",
        "|---|---|---|---|---|",
    ]
    for i, swap in enumerate(result["swaps"], 1):
        lines.append(
            f"| {i} | {swap['rss_before_mb']} | {swap['peak_mb']} | {swap['rss_after_mb']} | {swap['load_s']} |"
        )
    lines += ["", f"Requests during the swaps: {result['requests']}, failed: {result['failed_requests']}."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.swap_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--swaps", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default="swap_memory")
    args = parser.parse_args(argv)
    log = args.out / f".{args.name}-server.log"
    args.out.mkdir(parents=True, exist_ok=True)
    measured = measure(args.artifact, args.swaps, args.clients, log)
    manifest = Manifest.read(args.artifact)
    result = {
        **provenance(command_line("python -m benchmarks.swap_memory", argv)),
        "artifact": str(args.artifact.relative_to(ROOT) if args.artifact.is_relative_to(ROOT) else args.artifact),
        "model_mb": round(manifest.model.bytes / 1e6, 1),
        "clients": args.clients,
        **measured,
    }
    save(args.out, args.name, result, markdown(result))
    log.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
