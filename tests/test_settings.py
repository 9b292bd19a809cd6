from __future__ import annotations

from pathlib import Path

import pytest

from service.cpus import _cgroup_quota, available_cpus
from service.settings import Settings, SettingsError


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.model_dir == Path("artifacts")
    assert (s.host, s.port) == ("0.0.0.0", 4000)
    assert s.threads == available_cpus() >= 1
    assert s.max_upload_bytes == 10 * 1024 * 1024
    assert s.max_image_pixels == 40_000_000
    # About 14 MP of colour decoded whole (a PNG): docs/security.md, "What one image costs to decode".
    assert s.max_decode_bytes == 64 * 1024 * 1024
    assert s.log_level == "info"
    # One single-threaded engine worker per core, and no batching, unless configured.
    assert s.workers == s.threads and s.intra_op_threads == 1
    assert (s.max_batch, s.max_queue, s.request_timeout_s) == (1, 64, 30.0)
    # One decoder per 4 engine cores, at least one (measured: 4.6% and 7.5% more answers on 2 cores than two).
    assert s.decode_threads == max(1, -(-s.threads // 4))
    assert [Settings.from_env({"THREADS": str(n)}).decode_threads for n in (1, 2, 4, 5, 8, 16)] == [1, 1, 1, 2, 2, 4]


def test_reads_every_variable() -> None:
    env = {
        "MODEL_DIR": "/models/x",
        "HOST": "127.0.0.1",
        "PORT": "8080",
        "THREADS": "3",
        "MAX_UPLOAD_BYTES": "1000",
        "MAX_IMAGE_PIXELS": "2000",
        "MAX_DECODE_BYTES": "3000",
        "LOG_LEVEL": "WARNING",
        "WORKERS": "1",
        "MAX_BATCH": "8",
        "BATCH_WAIT_MS": "5",
        "MAX_QUEUE": "10",
        "REQUEST_TIMEOUT_S": "2.5",
        "DECODE_THREADS": "4",
    }
    s = Settings.from_env(env)
    expected = {
        "model_dir": Path("/models/x"),
        "host": "127.0.0.1",
        "port": 8080,
        "threads": 3,
        "max_upload_bytes": 1000,
        "max_image_pixels": 2000,
        "max_decode_bytes": 3000,
        "log_level": "warning",
        "workers": 1,
        "max_batch": 8,
        "batch_wait_ms": 5.0,
        "max_queue": 10,
        "request_timeout_s": 2.5,
        "decode_threads": 4,
    }
    assert {key: getattr(s, key) for key in expected} == expected

    assert s.intra_op_threads == 3


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("PORT", "x"),
        ("THREADS", "0"),
        ("MAX_UPLOAD_BYTES", "-5"),
        ("MAX_DECODE_BYTES", "0"),
        ("LOG_LEVEL", "loud"),
        ("WORKERS", "0"),
        ("BATCH_WAIT_MS", "soon"),
        ("REQUEST_TIMEOUT_S", "0"),
    ],
)
def test_bad_values_name_the_variable(key: str, value: str) -> None:
    with pytest.raises(SettingsError, match=key):
        Settings.from_env({key: value})


def test_cgroup_v2_quota_is_read(tmp_path: Path) -> None:
    # Read directly, so a broken reading shows on any machine, however many CPUs it has.
    assert _cgroup_quota(tmp_path) is None  # no cgroup files at all
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert _cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("garbage\n")
    assert _cgroup_quota(tmp_path) is None


def test_cgroup_quota_caps_the_cpu_count(tmp_path: Path) -> None:
    uncapped = available_cpus(tmp_path / "none")
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert available_cpus(tmp_path) == min(2, uncapped)  # 1.5 CPUs round up to 2
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert available_cpus(tmp_path) == 1  # never below one
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path) == uncapped


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("250000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert _cgroup_quota(tmp_path) == 2.5
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # v1's "no limit"
    assert _cgroup_quota(tmp_path) is None
