"""A run alone stays on one core while a neighbour holds one (service/neighbours.py): from /proc/stat written by
hand, from the real /proc with a real busy process beside, and through the scheduler with a real tiny model."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from service import neighbours
from service.deadline import Deadline
from service.neighbours import Neighbours
from service.scheduler import Scheduler
from tests.helpers import GatedClassifier

TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _write_stat(path: Path, busy_ticks: int) -> None:
    # Every CPU of this process's affinity gets the same line: user ticks, then idle, nothing else.
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    lines += [f"cpu{n} {busy_ticks} 0 0 1000 0 0 0 0 0 0" for n in sorted(os.sched_getaffinity(0))]
    path.write_text("\n".join(lines) + "\n")


def test_other_work_on_our_cores_is_seen(tmp_path: Path) -> None:
    stat, seen = tmp_path / "stat", []
    _write_stat(stat, 0)
    watch = Neighbours(stat=stat, cgroup_stat=tmp_path / "none", on_sample=seen.append)
    assert watch.busy() is False  # nothing read yet but the first reading
    time.sleep(0.1)
    # Each of our CPUs busy with others' work for the whole interval: busy.
    _write_stat(stat, int(0.1 * TICKS_PER_S) + 1)
    watch.sample()
    assert watch.busy() is True and seen[-1] > neighbours.BUSY_CORES
    time.sleep(0.1)
    watch.sample()  # nothing more: idle again
    assert watch.busy() is False and seen[-1] == 0


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("usage_usec 10\nthrottled_usec 100\n", "usage_usec 20\nthrottled_usec 5000\n"),  # cgroup v2
        ("nr_throttled 0\nthrottled_time 0\n", "nr_throttled 3\nthrottled_time 45000000\n"),  # v1, nanoseconds
    ],
)
def test_throttling_by_the_cgroup_counts_as_busy(tmp_path: Path, before: str, after: str) -> None:
    stat, cgroup = tmp_path / "stat", tmp_path / "cpu.stat"
    _write_stat(stat, 0)
    cgroup.write_text(before)
    watch = Neighbours(stat=stat, cgroup_stat=cgroup)
    time.sleep(0.05)
    watch.sample()
    assert watch.busy() is False
    cgroup.write_text(after)
    time.sleep(0.05)
    watch.sample()
    assert watch.busy() is True


def test_the_cgroup_stat_read_is_this_process_own_under_v1_and_v2(tmp_path: Path) -> None:
    own = tmp_path / "cgroup"
    pod = "kubepods/pod1/abc"
    for stat in (tmp_path / "cpu,cpuacct" / pod / "cpu.stat", tmp_path / pod / "cpu.stat", tmp_path / "cpu.stat"):
        stat.parent.mkdir(parents=True, exist_ok=True)
        stat.write_text("throttled_usec 0\n")
    # cgroup v1 (hybrid: the unified line is there too, its hierarchy elsewhere), the cpu controller's path.
    own.write_text(f"4:memory:/{pod}\n3:cpu,cpuacct:/{pod}\n0::/\n")
    assert neighbours.find_cgroup_stat(own, tmp_path) == tmp_path / "cpu,cpuacct" / pod / "cpu.stat"
    # cgroup v2.
    own.write_text(f"0::/{pod}\n")
    assert neighbours.find_cgroup_stat(own, tmp_path) == tmp_path / pod / "cpu.stat"
    # Its own cgroup namespace: the path is not there, the hierarchy's root is the process's cgroup.
    own.write_text("0::/elsewhere\n")
    assert neighbours.find_cgroup_stat(own, tmp_path) == tmp_path / "cpu.stat"
    # A line it cannot read is passed over, never an error at start-up.
    own.write_text(f"not a cgroup line\n3:cpu,cpuacct:/{pod}\n")
    assert neighbours.find_cgroup_stat(own, tmp_path) == tmp_path / "cpu,cpuacct" / pod / "cpu.stat"


def test_a_real_busy_process_beside_is_seen_by_the_watching_thread() -> None:
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    watch = Neighbours()
    watch.start()
    try:
        time.sleep(4 * neighbours.INTERVAL_S)
        assert watch.busy() is True
    finally:
        watch.stop()
        hog.kill()
        hog.wait()


class _Verdict(Neighbours):
    """A watcher whose verdict the test sets (and which watches nothing)."""

    def __init__(self, busy: bool) -> None:
        super().__init__()
        self.verdict, self.asked = busy, 0

    def start(self) -> None:
        pass

    def busy(self) -> bool:
        self.asked += 1
        return self.verdict


class _Recording(GatedClassifier):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.wides: list[bool] = []

    def predict(self, batch: np.ndarray, wide: bool = False) -> np.ndarray:  # type: ignore[override]
        self.wides.append(wide)
        return super().predict(batch, wide)


def test_a_run_alone_is_narrow_while_a_neighbour_holds_a_core(tiny_artifact: Path) -> None:
    engine = _Recording.from_dir(tiny_artifact)
    assert isinstance(engine, _Recording)
    engine.add_wide_session(2)
    pixels = np.zeros((*engine.input_shape,), dtype=np.float32)

    async def run_alone(verdict: _Verdict) -> None:
        scheduler = Scheduler(workers=2, max_batch=1, batch_wait_s=0, max_queue=4, decoders=1, neighbours=verdict)
        scheduler.start()
        try:
            await scheduler.infer(engine, [pixels], Deadline.after(20))
        finally:
            await scheduler.close()

    busy, idle = _Verdict(True), _Verdict(False)
    engine.wides.clear()
    asyncio.run(run_alone(busy))
    asyncio.run(run_alone(idle))
    assert engine.wides == [False, True]
    assert busy.asked == idle.asked == 1
