"""The images, measured: each image's own layers (above the base), what each package costs in the serve image,
the serve container's cold start next to the venv's, and, with --quota, the serve image under a CPU quota.

    python -m benchmarks.container                                  # about 2 minutes with the images cached
    python -m benchmarks.container --baseline-rev b95e470 --launches 8
    python -m benchmarks.container --quota 1.5 --users 1 8          # under `podman run --cpus 1.5`, ~6 minutes

Builds the Dockerfiles with podman as tests/test_container.py does (docs/containers.md); `--baseline-rev REV`
also builds that revision's Dockerfile and reports its sizes beside. Cold start: `podman run --rm --read-only`
of the serve image against `python -m service`, interleaved. `--quota CPUS`: the service and the naive server
(mounted into the same image) under `--cpus CPUS`, alternating, fresh per point; Locust at each `--users` level;
answered/s, p50, p99 and the container cgroup's throttled time per answered request. Writes <name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks import payloads
from benchmarks.harness import (
    RESULTS,
    ROOT,
    SCRATCH,
    System,
    alternating,
    cold_start_s,
    command_line,
    launch,
    launch_rounds,
    locust,
    provenance,
    save,
    service_system,
    spread,
    warm_up,
)
from service.neighbours import find_cgroup_stat, throttled_s

PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
BASE = "docker.io/library/python:3.11-slim-bookworm"
SERVE, EXPORT, BASELINE = (
    "localhost/car-classifier:bench",
    "localhost/car-classifier-export:bench",
    "localhost/car-classifier:bench-baseline",
)
SITE_PACKAGES = "/opt/venv/lib/python3.11/site-packages"
MB = 1e6

# Run inside an image: disk usage (du's blocks) of site-packages per installed distribution, from each one's
# RECORD (top-level names); what no distribution claims is reported under its own name.
PACKAGE_SIZES = r"""
import importlib.metadata, json, os, sys
root = sys.argv[1]
def usage(path):
    total = os.lstat(path).st_blocks * 512
    if os.path.isdir(path) and not os.path.islink(path):
        for folder, dirs, files in os.walk(path):
            total += sum(os.lstat(os.path.join(folder, n)).st_blocks * 512 for n in dirs + files)
    return total
owner = {}
for dist in importlib.metadata.distributions(path=[root]):
    for file in dist.files or []:
        top = file.parts[0]
        if top.endswith(".py"):
            owner.setdefault(top, dist.metadata["Name"])
            owner.setdefault("__pycache__/" + top[:-3], dist.metadata["Name"])
        elif top != "..":
            owner.setdefault(top, dist.metadata["Name"])
sizes = {}
for entry in os.listdir(root):
    name = owner.get(entry, entry)
    sizes[name] = sizes.get(name, 0) + usage(os.path.join(root, entry))
print(json.dumps(sizes))
"""


def podman(*args: str, timeout: float = 120) -> str:
    done = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} exited {done.returncode}: {done.stderr[-3000:]}")
    return done.stdout


def prepare() -> None:
    """The system setting and the stand-in base, as the container test makes them (both do nothing when done)."""
    for script in ("podman-setup", "container-base"):
        subprocess.run(["bash", str(ROOT / "scripts" / script)], check=True, timeout=900)


def build(dockerfile: Path, tag: str) -> None:
    mounts = [f"-v={p}:{p}:ro" for p in ("/etc/ssl/certs", "/etc/pip.conf") if Path(p).exists()]
    podman("build", "--format", "docker", "--pull=never", "--network", "host", *mounts,
           "-f", str(dockerfile), "-t", tag, str(ROOT), timeout=1800)  # fmt: skip


def layers(tag: str) -> dict[str, Any]:
    """The image's size and its own layers: those above the base's (podman history lists the newest first)."""
    history = json.loads(podman("history", "--format", "json", tag))
    own = history[: len(history) - len(json.loads(podman("history", "--format", "json", BASE)))]
    size = int(podman("image", "inspect", "--format", "{{.Size}}", tag))
    base = int(podman("image", "inspect", "--format", "{{.Size}}", BASE))
    return {
        "image_mb": round(size / MB, 1),
        "own_layers_mb": round((size - base) / MB, 1),
        "layers": [
            {"mb": round(h["size"] / MB, 1), "step": " ".join(h["CreatedBy"].replace("/bin/sh -c #(nop) ", "").split())}
            for h in reversed(own)
            if h["size"]
        ],
    }


def package_sizes(tag: str) -> dict[str, float]:
    raw = json.loads(
        podman("run", "--rm", "--network", "none", "--entrypoint", "python", tag, "-c", PACKAGE_SIZES, SITE_PACKAGES)
    )
    return {name: round(size / MB, 1) for name, size in sorted(raw.items(), key=lambda kv: -kv[1])}


def container(tag: str, port: int) -> System:
    """`podman run` of an image: its cold start ends at the container's first answered /infer, and podman forwards
    the SIGTERM that stops it."""
    command = [*PODMAN, "run", "--rm", "--read-only", "--network", "host",
               "-e", f"PORT={port}", "-e", "HOST=127.0.0.1", "-e", "LOG_LEVEL=warning", tag]  # fmt: skip
    return System("container", command, {})


QUOTA_CONTAINER = "car-classifier-quota"
QUOTA_FIGURES = ("ok_per_s", "p50_ms", "p99_ms", "errors", "throttled_periods", "throttled_ms_per_request")


def quota_system(cpus: float, naive: bool, port: int) -> System:
    """The serve image under `podman run --cpus`: the service, or the naive server on the image's Python."""
    command = [*PODMAN, "run", "--rm", "--read-only", "--network", "host", "--cpus", str(cpus),
               "--replace", "--name", QUOTA_CONTAINER, "-e", f"PORT={port}", "-e", "HOST=127.0.0.1",
               "-e", "LOG_LEVEL=warning"]  # fmt: skip
    if not naive:
        return System("service", [*command, SERVE], {})
    command += ["-v", f"{ROOT / 'benchmarks'}:/app/benchmarks:ro", "-e", "MODEL_DIR=/app/artifacts", SERVE,
                "python", "-m", "uvicorn", "benchmarks.baselines.naive_server:app",
                "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]  # fmt: skip
    return System("naive", command, {})


def throttled() -> tuple[int, float]:
    """The quota container's cgroup so far: periods throttled, seconds throttled (found and read as the service's
    own neighbour watch does: service/neighbours.py)."""
    pid = podman("inspect", "--format", "{{.State.Pid}}", QUOTA_CONTAINER).strip()
    stat = find_cgroup_stat(Path(f"/proc/{pid}/cgroup"))
    counts = dict(row.split() for row in stat.read_text().splitlines())
    return int(counts["nr_throttled"]), throttled_s(stat)


def quota_point(
    cpus: float, naive: bool, users: int, seconds: int, images: list[bytes], prefix: Path
) -> dict[str, Any]:
    with launch(partial(quota_system, cpus, naive), images[0], prefix.with_suffix(".log")) as server:
        warm_up(server.url, images, users, 3)
        periods_before, spent_before = throttled()
        load = locust(server.url, users, seconds, prefix)
        periods_after, spent_after = throttled()
    periods, spent = periods_after - periods_before, spent_after - spent_before
    answered = max(1, load["requests"] - load["errors"])
    return {
        **{k: load[k] for k in ("ok_per_s", "p50_ms", "p99_ms", "errors")},
        "throttled_periods": periods,
        "throttled_ms_per_request": round(spent * 1000 / answered, 2),
    }


def quota_runs(cpus: float, levels: list[int], rounds: int, seconds: int, work: Path) -> dict[str, Any]:
    images, points = payloads.image_bytes(), []
    for r in range(rounds):
        for users in levels:
            for system in alternating(["service", "naive"], r):
                point = quota_point(cpus, system == "naive", users, seconds, images, work / f"{r}-{users}-{system}")
                points.append({"round": r, "users": users, "system": system, **point})
                print(points[-1], flush=True)
    summary = []
    for users in levels:
        for system in ("service", "naive"):
            mine = [p for p in points if p["users"] == users and p["system"] == system]
            medians = {k: statistics.median(p[k] for p in mine) for k in QUOTA_FIGURES}
            summary.append({"users": users, "system": system, **medians})
    return {"cpus": cpus, "seconds": seconds, "rounds": rounds, "points": points, "summary": summary}


def quota_markdown(result: dict[str, Any]) -> list[str]:
    q = result["quota"]
    lines = [
        f"Command: `{result['command']}` ({result['created_at']}); {result['machine']['cpu']}, podman "
        f"{result['podman']}. The serve image under `--cpus {q['cpus']}`, a fresh container per point, 3 s warm-up, "
        f"{q['seconds']} s of Locust (large set); medians of {q['rounds']} rounds; throttled: the container "
        "cgroup's cpu.stat over the Locust phase.",
        "",
        "| clients | system | answered/s | p50 ms | p99 ms | errors | throttled periods | throttled ms per request |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in q["summary"]:
        cells = [f"{r['ok_per_s']:.2f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['errors']:g}"]
        cells += [f"{r['throttled_periods']:g}", f"{r['throttled_ms_per_request']:.2f}"]
        lines.append(f"| {r['users']} | {r['system']} | {' | '.join(cells)} |")
    return lines


def cold_starts(launches: int, image: bytes, work: Path) -> dict[str, Any]:
    rounds, _ = launch_rounds(
        [
            ("container", partial(cold_start_s, partial(container, SERVE), image)),
            ("venv", partial(cold_start_s, partial(service_system, "defaults", {}, ROOT), image)),
        ],
        launches,
        work,
    )
    summary = {name: spread([r[name] for r in rounds]) for name in ("container", "venv")}
    ratio = statistics.median(r["container"] / r["venv"] for r in rounds)
    return {"rounds": rounds, "summary": summary, "container / venv (median of rounds)": round(ratio, 3)}


def markdown(result: dict[str, Any]) -> list[str]:
    m, images = result["machine"], result["images"]
    serve = images["serve"]
    lines = [
        f"Command: `{result['command']}` ({result['created_at']}); {m['cpu']}, {m['cores_available']} cores "
        f"available, podman {result['podman']}, base `{BASE}` = scripts/container-base's stand-in "
        f"({result['base_mb']} MB, Debian's Python 3.11.2).",
        "",
        "| image | whole image MB | own layers MB (above the base) |",
        "|---|---|---|",
    ]
    for name, image in images.items():
        lines.append(f"| {name} | {image['image_mb']} | **{image['own_layers_mb']}** |")
    lines += [
        "",
        f"Own layers, serve / export: **{result['serve / export own layers']}**.",
        "",
        "Serve image, its own layers:",
        "",
        "| MB | step |",
        "|---|---|",
    ]
    lines += [f"| {layer['mb']} | `{layer['step'][:110]}` |" for layer in serve["layers"]]
    baseline = images.get("serve at baseline")
    title = f"| package | MB | MB at {result['baseline_rev']} |" if baseline else "| package | MB |"
    lines += [
        "",
        f"Serve image, `{SITE_PACKAGES}` by distribution (du):",
        "",
        title,
        "|---|---|" + ("---|" if baseline else ""),
    ]
    names = list(serve["packages"]) + [n for n in (baseline or {}).get("packages", {}) if n not in serve["packages"]]
    for name in names:
        row = f"| {name} | {serve['packages'].get(name, 0)} |"
        lines.append(row + (f" {baseline['packages'].get(name, 0)} |" if baseline else ""))
    total = f"| **total** | **{round(sum(serve['packages'].values()), 1)}** |"
    lines.append(total + (f" **{round(sum(baseline['packages'].values()), 1)}** |" if baseline else ""))
    starts = result.get("cold_start")
    if starts:
        lines += [
            "",
            f"Cold start, launch to the first answered `/infer` (one 640x480 JPEG, committed artifact), "
            f"{len(starts['rounds'])} counted launches each, interleaved after one uncounted; 1-minute load "
            f"average {starts['load_average_1min'][0]} before and {starts['load_average_1min'][1]} after, "
            f"on {m['cores_available']} cores:",
            "",
            "| launched | median s | min s | max s |",
            "|---|---|---|---|",
        ]
        for name, launched in (
            ("container", "`podman run --rm --read-only --network host` of the serve image"),
            ("venv", "`python -m service` in the venv"),
        ):
            row = starts["summary"][name]
            lines.append(f"| {launched} | **{row['median_s']}** | {row['min_s']} | {row['max_s']} |")
        lines += [
            "",
            f"Container / venv (median of rounds): **{starts['container / venv (median of rounds)']}**.",
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.container", description=__doc__.split("\n\n")[0])
    parser.add_argument("--launches", type=int, default=8, help="counted cold starts of each (0: sizes only)")
    parser.add_argument("--baseline-rev", help="also build the serve image from this revision's Dockerfile")
    parser.add_argument("--quota", type=float, metavar="CPUS", help="only the serve image under podman --cpus CPUS")
    parser.add_argument("--users", type=int, nargs="+", default=[1, 8], help="with --quota: Locust users per point")
    parser.add_argument("--rounds", type=int, default=3, help="with --quota")
    parser.add_argument("--seconds", type=int, default=20, help="with --quota: each point's Locust phase")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", help="default: container, or quota-CPUS with --quota")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("podman runs as root here (docs/containers.md)")

    prepare()
    build(ROOT / "Dockerfile", SERVE)
    if args.quota is not None:
        if args.quota <= 0:
            parser.error("--quota takes a positive number of CPUs")
        with tempfile.TemporaryDirectory(prefix="quota-bench-") as tmp:
            quota = quota_runs(args.quota, args.users, args.rounds, args.seconds, Path(tmp))
        measured = {
            **provenance(command_line("python -m benchmarks.container", argv)),
            "podman": podman("version", "--format", "{{.Client.Version}}").strip(),
            "quota": quota,
        }
        out = args.out if args.name or args.out != RESULTS else SCRATCH  # an unnamed quota run is scratch
        save(out, args.name or f"quota-{args.quota:g}", measured, quota_markdown(measured))
        return 0
    build(ROOT / "Dockerfile.export", EXPORT)
    images = {"serve": {**layers(SERVE), "packages": package_sizes(SERVE)}, "export": layers(EXPORT)}
    with tempfile.TemporaryDirectory(prefix="container-bench-") as tmp:
        work = Path(tmp)
        if args.baseline_rev:
            dockerfile = work / "Dockerfile.baseline"
            shown = subprocess.run(
                ["git", "show", f"{args.baseline_rev}:Dockerfile"], cwd=ROOT, capture_output=True, text=True, check=True
            )
            dockerfile.write_text(shown.stdout)
            build(dockerfile, BASELINE)
            images["serve at baseline"] = {**layers(BASELINE), "packages": package_sizes(BASELINE)}
        result: dict[str, Any] = {
            **provenance(command_line("python -m benchmarks.container", argv)),
            "podman": podman("version", "--format", "{{.Client.Version}}").strip(),
            "base_mb": round(int(podman("image", "inspect", "--format", "{{.Size}}", BASE)) / MB, 1),
            "baseline_rev": args.baseline_rev,
            "images": images,
            "serve / export own layers": round(images["serve"]["own_layers_mb"] / images["export"]["own_layers_mb"], 3),
        }
        if args.launches:
            # Other work on the machine moves a cold start by seconds: the load average says how busy it was.
            before = os.getloadavg()[0]
            result["cold_start"] = cold_starts(args.launches, payloads.image_bytes()[0], work)
            result["cold_start"]["load_average_1min"] = [round(before, 1), round(os.getloadavg()[0], 1)]
    save(args.out, args.name or "container", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
