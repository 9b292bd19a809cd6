"""Where the CPU goes: per-thread CPU time of a process from Linux /proc, grouped by what the thread does.

Throughput on these shared machines drifts by 10-20% within minutes; CPU seconds per answered request
drift much less, and they say which part of the service pays for what. The service names its threads
(`inference_0`, `decode_1`: service/threads.py); its main thread runs the event loop.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import psutil

_TICKS = os.sysconf("SC_CLK_TCK")
ROLES = ("inference", "decode", "event loop", "other")


def role(name: str, main: bool) -> str:
    """What a thread does, by its name (service/threads.py names them); `main`: the process's own thread."""
    if main:
        return "event loop"
    prefix = name.rstrip("0123456789").rstrip("_")
    return prefix if prefix in ("inference", "decode") else "other"


def _cpu_s(stat: str) -> float:
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime, fields 14 and 15 of proc(5)


def _machine() -> tuple[int, int]:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    return values[3] + values[4], sum(values)  # (idle + iowait, all) in ticks


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
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    benchmark = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    idle, total = _machine()
    return Snapshot(time.perf_counter(), dict(by_role), idle, total, load, _tree_s(pid), benchmark)


def _tree_s(pid: int) -> float:
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
    return round((busy / _TICKS - ours) / wall, 3) if wall > 0 else 0.0
