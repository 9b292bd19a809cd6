"""The benchmark harness works end to end (--quick). It asserts that every system answered and the
result files were written; never a speed: speed is what the harness reports, not what a test asserts."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from benchmarks import harness
from benchmarks.harness import GIT, System, checkout_service, local_env, parse_variant, start, stop
from benchmarks.payloads import image_set
from benchmarks.sweep import error_kinds
from tests.helpers import ROOT, free_port, image_bytes
from tests.system import IN_CI


def _missing(module: str) -> bool:
    # Looked up, not imported: importing locust monkey-patches threading and socket with gevent for the whole
    # pytest process (every test collected after it), and TensorFlow is only needed by the subprocesses.
    return importlib.util.find_spec(module) is None


pytestmark = [
    pytest.mark.skipif(_missing("locust"), reason="needs benchmarks/requirements.txt"),
    pytest.mark.skipif(_missing("tensorflow"), reason="the seed-way baseline needs TensorFlow"),
    pytest.mark.export,
    pytest.mark.slow,
]

SYSTEMS = {
    "service-int8",
    "service-int8 1 worker x 2 threads",
    "service-int8 batch<=4",
    "service-int8 at 4x overload",
    "service-fp32",
    "seed-tf-predict",
    "seed-tf-function",
}


def _run_benchmark(module: str, *args: str, out: Path, result: str, timeout: int = 300) -> dict[str, Any]:
    """`python -m benchmarks.<module> ARGS --out OUT`, which must succeed; the JSON it wrote as `result`."""
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args, "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data: dict[str, Any] = json.loads((out / f"{result}.json").read_text())
    return data


def test_quick_benchmark_runs_every_system(tmp_path: Path) -> None:
    data = _run_benchmark("run", "--quick", out=tmp_path, result="quick", timeout=900)
    assert data["command"] == f"python -m benchmarks.run --quick --out {tmp_path}"  # as typed, every argument
    assert {s["system"] for s in data["systems"]} == SYSTEMS
    for system in data["systems"]:
        assert system["requests"] > system["errors"] >= 0, system
        assert system["cold_start_s"] > 0 and system["rss"]["peak_mb"] > 0
        # Load shedding answers 503 (or 504); anything else is a failure, at any load.
        assert set(system["errors_by_status"]) <= {"503", "504"}, system
        if system["users"] == data["profile"]["users"]:
            assert system["errors"] == 0, system
    assert data["engine"]["best"]["images_per_s"] > 0
    assert data["engine"]["with_decoding"]["images_per_s"] > 0
    bracket = next(s for s in data["systems"] if s["system"] == "service-int8")["ceiling_next_to_it"]
    assert bracket["before"] > 0 and bracket["after"] > 0
    for key in (
        "service_int8 / engine ceiling measured next to it",
        "service_int8 / engine ceiling at start of run",
        "service_int8 / engine with decoding (no HTTP)",
    ):
        assert data["ratios"][key] is not None, key
    table = (tmp_path / "quick.md").read_text()
    assert all(name in table for name in SYSTEMS)
    assert (tmp_path / "quick.png").read_bytes().startswith(b"\x89PNG")


def test_saturation_rounds_run(tmp_path: Path) -> None:
    data = _run_benchmark(
        "saturation", "--rounds", "1", "--seconds", "1", "--load-seconds", "11", "--naive",
        out=tmp_path, result="saturation",
    )  # fmt: skip
    (row,) = data["rounds"]
    assert row["service_answered_per_s"] > 0 and row["service_locust_ok_per_s"] > 0, row
    assert row["service_errors"] == 0, row
    assert row["engine_before"] > 0 and row["engine_after"] > 0 and row["engine_with_decoding"] > 0, row
    assert set(data["median"]) == {
        "decoding / engine",
        "service / engine",
        "service / engine with decoding",
        "service (Locust's count) / engine",
        "engine CPU per image / service CPU per request",
        "naive / engine with decoding",
        "1.2 x naive / engine with decoding",
        "service (Locust's count) / naive",
    }
    # --naive: the naive reference server under the same load, against the engine-with-decoding bound.
    assert row["naive_locust_ok_per_s"] > 0 and row["naive_errors"] == 0, row
    bound = row["naive_locust_ok_per_s"] / row["engine_with_decoding"]
    assert row["1.2 x naive / engine with decoding"] == pytest.approx(1.2 * bound, abs=0.002), row
    cpu = row["cpu_ms"]
    assert cpu["engine per image"] > 0 and cpu["engine with decoding per image"] > cpu["engine per image"] * 0.5
    # The service's CPU is found by thread: the engine's work is on the inference threads, the JPEGs on decode.
    service = cpu["service per request"]
    assert service["inference"] > service["decode"] > 0, service
    assert service["event loop"] > 0 and service["load generator"] > 0, service
    page = (tmp_path / "saturation.md").read_text()
    assert "**median**" in page and "naive answered/s (Locust)" in page


@pytest.fixture
def git_checkout() -> None:
    """The A/B of revisions needs the repository these tests run from. Git's refusal of a checkout owned by
    another user is not a reason to skip (benchmarks.ab passes safe.directory); only a tree with no repository
    at all is, and in CI, which always runs in a clone, not even that."""
    found = subprocess.run([*GIT, "rev-parse", "--verify", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if found.returncode == 0:
        return
    if "not a git repository" in found.stderr:
        message = f"{ROOT} is not in a git repository (an unpacked source archive?): A/B of revisions needs one"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    pytest.fail(f"git rev-parse HEAD in {ROOT} failed: {found.stderr.strip()}")


@pytest.mark.usefixtures("git_checkout")
def test_ab_reads_a_repository_that_git_calls_of_dubious_ownership(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Git's own switch for testing its ownership check: as if the checkout belonged to another user, which is
    # what a CI workspace or a mounted volume often is.
    monkeypatch.setenv("GIT_TEST_ASSUME_DIFFERENT_OWNER", "1")
    refused = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode != 0 and "dubious ownership" in refused.stderr, refused
    revision = parse_variant("@HEAD").revision
    assert revision is not None
    assert (checkout_service(revision, tmp_path) / "service" / "__main__.py").is_file()


@pytest.mark.usefixtures("git_checkout")
def test_ab_compares_service_configurations_and_revisions(tmp_path: Path) -> None:
    variants = ("--variant", "", "--variant", "@HEAD WORKERS=1")
    data = _run_benchmark(
        "ab", *variants, "--rounds", "1", "--seconds", "12", "--users", "3", "--name", "ab", out=tmp_path, result="ab"
    )
    assert data["users"] == 3
    assert all(run["users"] == 3 for run in data["rounds"][0]["runs"].values())
    defaults, other = data["summary"]
    head = subprocess.run([*GIT, "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert (defaults["variant"], other["variant"]) == ("defaults", f"@{head.stdout.strip()} WORKERS=1")
    assert defaults["throughput / first"] == 1.0 and other["throughput / first"] > 0
    for summary in data["summary"]:
        assert summary["errors"] == 0 and summary["answered_per_s"] > 0, summary
        assert summary["cpu_ms_per_request"]["inference"] > summary["cpu_ms_per_request"]["decode"] > 0, summary
    assert "WORKERS=1" in (tmp_path / "ab.md").read_text() and "3 Locust users" in (tmp_path / "ab.md").read_text()


@pytest.mark.usefixtures("git_checkout")
def test_ab_runs_a_revision_from_its_own_copy_of_the_service(tmp_path: Path) -> None:
    code = checkout_service(parse_variant("@HEAD").revision or "", tmp_path)
    committed = subprocess.run([*GIT, "show", "HEAD:service/app.py"], cwd=ROOT, capture_output=True, text=True)
    assert (code / "service" / "app.py").read_text() == committed.stdout
    assert not (code / "benchmarks").exists() and not (code / "artifacts").exists()


def test_ab_variants_parse_settings_and_refuse_junk() -> None:
    assert parse_variant("WORKERS=4 MAX_BATCH=2").label == "WORKERS=4 MAX_BATCH=2"
    assert parse_variant("").label == "defaults"
    for junk in ("WORKERS", "=4", "@not-a-revision-here", "@HEAD @HEAD"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_variant(junk)


@pytest.mark.usefixtures("git_checkout")
def test_cold_start_launches_each_variant_and_the_naive_server(tmp_path: Path) -> None:
    variants = ("--variant", "", "--variant", "@HEAD WORKERS=1", "--naive", "--imports")
    data = _run_benchmark("cold_start", *variants, "--launches", "1", out=tmp_path, result="cold_start")
    (counted,) = data["rounds"]  # launch 0 warms the page cache and is not counted
    defaults, other, naive, imports = data["summary"]
    assert defaults["variant"] == "defaults" and other["variant"].endswith("WORKERS=1") and naive["variant"] == "naive"
    assert imports["variant"] == "imports only"
    assert set(counted) == {"defaults", other["variant"], "naive", "imports only"}
    assert 0 < defaults["min_s"] <= defaults["median_s"] <= defaults["max_s"] < 180
    assert defaults["cold start / first (median of rounds)"] == 1.0
    assert other["median_s"] > 0 and naive["median_s"] > 0 and imports["median_s"] > 0
    table = (tmp_path / "cold_start.md").read_text()
    assert "WORKERS=1" in table and "| naive |" in table and "| imports only |" in table and "onnxruntime" in table


def test_a_launched_service_runs_from_bytecode_even_where_python_may_not_write_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As the image (compiled at build) and a clone (written on its first start) run it; not compiled again
    # at every launch, as PYTHONDONTWRITEBYTECODE would have it (5% longer to the first answer).
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")  # the launched server inherits it: it writes nothing
    shutil.copytree(ROOT / "service", tmp_path / "service", ignore=shutil.ignore_patterns("__pycache__"))
    port = free_port()
    system = System("service", [sys.executable, "-m", "service"], local_env(port), cwd=tmp_path)
    process, _ = start(system, f"http://127.0.0.1:{port}", image_bytes((0, 0, 250)), tmp_path / "service.log")
    stop(process)
    compiled = {p.name.split(".")[0] for p in (tmp_path / "service" / "__pycache__").glob("*.pyc")}
    assert compiled == {p.stem for p in (tmp_path / "service").glob("*.py")}


def test_sweep_quick_writes_every_point_both_sets_and_the_plot(tmp_path: Path) -> None:
    data = _run_benchmark("sweep", "--quick", out=tmp_path, result="sweep-quick", timeout=600)
    assert data["systems"] == ["service", "naive"] and data["levels"] == [1, 4]
    assert set(data["sets"]) == {"large", "small"}
    points = {(p["set"], p["users"], p["system"]): p for p in data["points"]}
    assert len(points) == len(data["points"]) == 2 * 2 * 2
    for point in data["points"]:
        assert point["requests"] > 0 and point["answered_per_s"] > 0, point
        assert 0 < point["p50_ms"] <= point["p90_ms"] <= point["p99_ms"], point
        assert point["peak_rss_mb"] > 0 and point["cold_start_s"] > 0, point
        assert -0.1 <= point["other_work_cores"] <= data["machine"]["cores_available"], point
        # Neither server sheds or fails at 4 clients: every request is answered.
        assert point["errors"] == 0 and sum(point["errors_by_kind"].values()) == 0, point
    # Each (set, level) ran both systems, in the order that alternates from one (set, level) to the next.
    firsts = [p["system"] for p in data["points"] if p["position"] == 0]
    assert firsts == ["service", "naive", "service", "naive"]
    assert {(r["set"], r["users"]) for r in data["ratios"]} == {(s, u) for s in ("large", "small") for u in (1, 4)}
    for ratio in data["ratios"]:
        assert ratio["system"] == "service" and ratio["answered_per_s / naive"] > 0 and ratio["p50_ms / naive"] > 0
    assert {c["system"]: c["launches"] for c in data["cold_start"]} == {"service": 4, "naive": 4}
    # Each request's own time (the locustfile's PREFIX_times.json), not Locust's whole milliseconds.
    assert any(p["p50_ms"] != int(p["p50_ms"]) for p in data["points"]), data["points"]
    table = (tmp_path / "sweep-quick.md").read_text()
    assert "Ours / naive" in table and "Image set **small**" in table and "Image set **large**" in table
    assert (tmp_path / "sweep-quick.png").read_bytes().startswith(b"\x89PNG")


# Burns `sys.argv[1]` s of its own CPU time, however busy the machine (a wall-clock burn reads less there).
_BURN = "import sys, time\nwhile time.process_time() < float(sys.argv[1]): pass"


def test_other_work_is_the_machines_busy_time_less_the_servers_and_the_benchmarks() -> None:
    ticks = harness.TICKS
    before = harness.Snapshot(10.0, {}, machine_idle=0, machine_total=0, process_s=5.0, benchmark_s=1.0)
    # 2 s of wall, 4 s of busy machine (1 idle s of 5): the server spent 1.5 s, the benchmark 0.5 s.
    after = harness.Snapshot(12.0, {}, machine_idle=1 * ticks, machine_total=5 * ticks, process_s=6.5, benchmark_s=1.5)
    assert harness.other_work(before, after) == 1.0


def test_the_server_tree_and_the_benchmark_children_are_counted_as_theirs() -> None:
    """What other_work subtracts: CPU of the server's process tree (a child it waited for, a child still
    running: Triton's processes under pytriton), and of a load generator the benchmark ran and waited for.
    Counted in CPU time, which a busy machine does not change."""
    server_script = (
        "import subprocess, sys\n"
        "sys.stdin.readline()\n"
        f"subprocess.run([sys.executable, '-c', {_BURN!r}, '0.3'], check=True)\n"  # ended, waited for
        f"living = subprocess.Popen([sys.executable, '-c', {_BURN!r} + '\\nprint(flush=True)\\ninput()', '0.3'])\n"
        "living.wait()\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", server_script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as server:
        assert server.stdin is not None and server.stdout is not None
        before = harness.snapshot(server.pid)
        server.stdin.write("go\n")
        server.stdin.flush()
        server.stdout.readline()  # the living child has burnt its 0.3 s and waits
        subprocess.run([sys.executable, "-c", _BURN, "0.3"], check=True)  # the load generator
        after = harness.snapshot(server.pid)
        server.stdin.write("\n")  # the living child's input(): it ends, then the server
        server.stdin.flush()
    assert server.returncode == 0
    # 0.6 s burnt in the tree, read in whole ticks: one child missed would leave about 0.3.
    assert after.process_s - before.process_s >= 0.5, "the server's children went uncounted"
    assert after.benchmark_s - before.benchmark_s >= 0.25, "the load generator went uncounted"


def test_other_work_sees_a_neighbour() -> None:
    neighbour = subprocess.Popen([sys.executable, "-c", _BURN, "30"])  # killed below
    idle_server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)  # both interpreters started
        before = harness.snapshot(idle_server.pid)
        time.sleep(1.0)
        after = harness.snapshot(idle_server.pid)
    finally:
        for process in (neighbour, idle_server):
            process.kill()
            process.wait()
    # A busier machine only reads more: the neighbour alone is one core.
    assert harness.other_work(before, after) > 0.5, "a neighbour burning a core went unseen"


def test_latency_percentiles_come_from_every_request_time(tmp_path: Path) -> None:
    from benchmarks.harness import response_time_percentiles

    prefix = tmp_path / "point"
    assert response_time_percentiles(prefix) == {}  # another locustfile: Locust's own percentiles then
    (tmp_path / "point_times.json").write_text(json.dumps([float(t) for t in range(100, 0, -1)]))
    assert response_time_percentiles(prefix) == {50: 50.0, 90: 90.0, 95: 95.0, 99: 99.0}
    (tmp_path / "point_times.json").write_text(json.dumps([14.21, 13.87, 14.02]))
    assert response_time_percentiles(prefix)[50] == 14.02


def test_sweep_sorts_failures_by_kind(tmp_path: Path) -> None:
    # The messages benchmarks/locustfile.py gives response.failure(), in Locust's failures file as Locust writes
    # them (the repr of a CatchResponseError), then in the locustfile's own final count, which wins.
    messages = {
        'status 503: [Retry-After 1] {"error": "overloaded"}': 7,
        "status 503: upstream gone": 2,
        "status 500: Internal Server Error": 3,
        "status 0: ConnectionResetError(104, 'Connection reset by peer')": 4,
        "status 413: too large": 1,
        "answer is not JSON": 5,
    }
    with (tmp_path / "x_failures.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Method", "Name", "Error", "Occurrences", "First Seen", "Last Seen"])
        writer.writerows(("POST", "/infer", f"CatchResponseError({m!r})", n, "", "") for m, n in messages.items())
    assert error_kinds(tmp_path / "x") == {"503 with Retry-After": 7, "other 5xx": 5, "no answer": 4, "other": 6}
    (tmp_path / "x_failures.json").write_text(json.dumps({"status 503: [Retry-After 2] {}": 9}))
    assert error_kinds(tmp_path / "x") == {"503 with Retry-After": 9, "other 5xx": 0, "no answer": 0, "other": 0}


def test_the_small_image_set_is_deterministic_and_small() -> None:
    small, large = image_set("small"), image_set("large")
    assert len(small) == len(large) == 48 and len(set(small)) == 48 and not set(small) & set(large)
    sizes = {Image.open(io.BytesIO(b)).size for b in small}
    assert sizes == {(640, 480), (560, 310)}
    assert image_set("small") == small


def test_collecting_this_module_leaves_the_test_process_unpatched() -> None:
    # The benchmarks run Locust in subprocesses; in the pytest process, gevent's patches would turn every
    # later test's threads into greenlets.
    assert "locust" not in sys.modules


def test_a_run_writes_into_the_results_only_when_named(tmp_path: Path) -> None:
    # An unnamed run checks something; it is not evidence to commit, so it stays out of benchmarks/results/.
    named, unnamed = argparse.Namespace(out=None, name="x"), argparse.Namespace(out=None, name=None)
    assert harness.destination(named) == harness.RESULTS and harness.destination(unnamed) == harness.SCRATCH
    assert harness.destination(argparse.Namespace(out=tmp_path, name=None)) == tmp_path
    assert subprocess.run(["git", "check-ignore", "-q", str(harness.SCRATCH)], cwd=ROOT).returncode == 0
