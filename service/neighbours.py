"""Whether someone else holds one of this process's cores, so that a run alone should stay on one core.

A wide run (every core, its threads spinning) is the fastest on an idle machine, and the slowest beside a
neighbour: a parallel section waits for its slowest thread, and a spinning thread competes for the core it
shares. Measured on 2 cores with another process in a busy loop on one: a wide run 47.5 ms, a one-thread run
27.7 ms (idle machine: 17.4 and 27.7 ms). So before a wide run the scheduler asks here: over the last quarter of a
second or so, did the cores this process may use do work that was not this process's (other processes, a hypervisor's
steal), or did the cgroup throttle it (a CPU quota below THREADS, which spinning would spend)?

A thread of its own reads /proc/stat (the lines of the CPUs in this process's affinity), the process's own CPU
time and the cgroup's cpu.stat every INTERVAL_S: a run only reads the last verdict, and a neighbour that started
a moment ago is seen as soon as one interval has passed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

# /proc/stat counts in ticks (10 ms a CPU): over a quarter of a second, reading it twice is within 0.16 cores.
INTERVAL_S = 0.25
# Cores of other work beyond which a run stays narrow: a whole neighbour's core is 1.0; what shares the machine
# with a lone request anyway (a load balancer's health checks, the kernel, a load generator) is far below it.
BUSY_CORES = 0.5
_TICK_S = 1 / os.sysconf("SC_CLK_TCK")
_STAT = Path("/proc/stat")
_CGROUP = Path("/sys/fs/cgroup")


def find_cgroup_stat(own: Path = Path("/proc/self/cgroup"), root: Path = _CGROUP) -> Path:
    """This process's cgroup cpu.stat, cgroup v2 (`0::/path`) or v1 (`4:cpu,cpuacct:/path`), as the process
    sees it: at the path, or at the hierarchy's root in a container that has its own cgroup namespace. Only its
    own cgroup: a quota set on a parent shows in the parent's cpu.stat, not here."""
    try:
        for line in own.read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) != 3 or (parts[1] and "cpu" not in parts[1].split(",")):
                continue
            base = root / parts[1] if parts[1] else root  # v1: the cpu controller's hierarchy; v2: the one
            for candidate in (base / parts[2].lstrip("/") / "cpu.stat", base / "cpu.stat"):
                if candidate.exists():
                    return candidate
    except (OSError, ValueError):  # unreadable or denied: no throttling to tell
        pass
    return root / "cpu.stat"


def _busy_ticks(cpus: set[int], text: str) -> int:
    """Ticks the given CPUs spent not idle (user, nice, system, irq, softirq, steal) since boot."""
    total = 0
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            fields = [int(x) for x in rest.split()]
            total += sum(fields[:3]) + sum(fields[5:8])  # leave out idle and iowait
    return total


def throttled_s(path: Path) -> float:
    """Seconds the cgroup of `path` (a cpu.stat, v2 or v1) has been throttled; 0 when it cannot be read."""
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "throttled_usec":  # cgroup v2
                return int(value) / 1e6
            if key == "throttled_time":  # cgroup v1, in nanoseconds
                return int(value) / 1e9
    except (OSError, ValueError):
        pass
    return 0.0


class Neighbours:
    """`busy()`: whether other work held one of our cores, or the quota throttled us, in the last interval."""

    def __init__(
        self,
        stat: Path = _STAT,
        cgroup_stat: Path | None = None,
        on_sample: Callable[[float], None] = lambda cores: None,
    ) -> None:
        self._stat = stat
        self._cgroup_stat = cgroup_stat if cgroup_stat is not None else find_cgroup_stat()
        self._on_sample = on_sample
        self._cpus = os.sched_getaffinity(0)
        self._busy = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last = self._read()

    def busy(self) -> bool:
        return self._busy

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="neighbours", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _read(self) -> tuple[float, float, float, float] | None:
        try:
            machine = _busy_ticks(self._cpus, self._stat.read_text()) * _TICK_S
        except OSError:  # no /proc: nothing to tell
            return None
        return time.monotonic(), machine, time.process_time(), throttled_s(self._cgroup_stat)

    def _watch(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            self.sample()

    def sample(self) -> None:
        """Compare with the previous reading and keep the verdict (the watching thread calls it every interval)."""
        last, now = self._last, self._read()
        self._last = now
        if last is None or now is None or now[0] <= last[0]:
            return
        others = max(0.0, (now[1] - last[1]) - (now[2] - last[2])) / (now[0] - last[0])
        self._busy = others > BUSY_CORES or now[3] > last[3]
        self._on_sample(others)
