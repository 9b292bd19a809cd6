"""What machine a benchmark ran on, recorded with every result (figures mean little without it)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import psutil

from service.cpus import available_cpus

_CPUINFO = Path("/proc/cpuinfo")


def cpu_model() -> str:
    if _CPUINFO.exists():
        for line in _CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_has_vnni() -> bool:
    # Without VNNI, x86 int8 kernels multiply u8 by s8 with instructions that can saturate.
    return _CPUINFO.exists() and any(f in _CPUINFO.read_text() for f in ("avx512_vnni", "avx_vnni"))


def describe() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "vnni": cpu_has_vnni(),
        "cores_available": available_cpus(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
    }
