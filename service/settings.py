"""Settings, read once from the environment into one frozen object."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from service.cpus import available_cpus

N = TypeVar("N", int, float)
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


class SettingsError(ValueError):
    """An environment variable holds a value the service cannot use."""


def _number(env: Mapping[str, str], key: str, default: N, minimum: N, parse: Callable[[str], N]) -> N:
    raw = env.get(key)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise SettingsError(f"{key}={raw!r} is not {'an integer' if parse is int else 'a number'}") from None
    if value < minimum:
        raise SettingsError(f"{key}={value} must be at least {minimum}")
    return value


def _int(env: Mapping[str, str], key: str, default: int, minimum: int = 1) -> int:
    return _number(env, key, default, minimum, int)


def _float(env: Mapping[str, str], key: str, default: float, minimum: float) -> float:
    return _number(env, key, default, minimum, float)


def default_decode_threads(threads: int) -> int:
    """One decoder per 4 engine cores, at least one.

    Decoding and resizing a photo costs about a tenth of an inference, so one decoder keeps several
    engine workers fed. On 2 cores a second decoder only competes with the engine: one decoder answered
    4.6% and 7.5% more requests in two interleaved A/B runs (benchmarks/results/ab-decode-threads*.md).
    """
    return max(1, math.ceil(threads / 4))


@dataclass(frozen=True)
class Settings:
    model_dir: Path = Path("artifacts")
    host: str = "0.0.0.0"
    port: int = 4000
    threads: int = 1
    max_upload_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    log_level: str = "info"
    # The scheduler (service/scheduler.py). WORKERS engine workers share THREADS cores: each session run
    # gets THREADS // WORKERS intra-op threads (1 by default: one single-threaded run per core).
    workers: int = 1
    max_batch: int = 1
    batch_wait_ms: float = 2.0
    max_queue: int = 64
    request_timeout_s: float = 30.0
    decode_threads: int = 1

    @property
    def intra_op_threads(self) -> int:
        return max(1, self.threads // self.workers)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        log_level = env.get("LOG_LEVEL", "info").strip().lower()
        if log_level not in LOG_LEVELS:
            raise SettingsError(f"LOG_LEVEL={log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        threads = _int(env, "THREADS", available_cpus())
        return cls(
            model_dir=Path(env.get("MODEL_DIR") or "artifacts"),
            host=env.get("HOST") or "0.0.0.0",
            port=_int(env, "PORT", 4000, minimum=0),
            threads=threads,
            max_upload_bytes=_int(env, "MAX_UPLOAD_BYTES", 10 * 1024 * 1024),
            max_image_pixels=_int(env, "MAX_IMAGE_PIXELS", 40_000_000),
            log_level=log_level,
            workers=_int(env, "WORKERS", threads),
            max_batch=_int(env, "MAX_BATCH", 1),
            batch_wait_ms=_float(env, "BATCH_WAIT_MS", 2.0, minimum=0.0),
            max_queue=_int(env, "MAX_QUEUE", 64),
            request_timeout_s=_float(env, "REQUEST_TIMEOUT_S", 30.0, minimum=0.001),
            decode_threads=_int(env, "DECODE_THREADS", default_decode_threads(threads)),
        )
