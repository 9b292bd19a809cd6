"""Settings, read once from the environment into one frozen object."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from service.cpus import available_cpus

N = TypeVar("N", int, float)
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
LOG_FORMATS = ("text", "json")
SWITCH = ("enabled", "disabled")
# auto: a run alone takes every core unless another process holds one of them (service/neighbours.py);
# always: whatever the machine does; never: every run on THREADS // WORKERS threads.
WIDE_RUNS = ("auto", "always", "never")


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


def _choice(env: Mapping[str, str], key: str, choices: tuple[str, ...]) -> str:
    """One of `choices` (the first is the default), in any case."""
    value = env.get(key, "").strip().lower() or choices[0]
    if value not in choices:
        raise SettingsError(f"{key}={value!r} is not one of {', '.join(choices)}")
    return value


def _list(env: Mapping[str, str], key: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in env.get(key, "").split(",") if item.strip())


def _api_keys(env: Mapping[str, str]) -> tuple[str, ...]:
    """API_KEY (one key) and API_KEY_FILE (one key a line, `#` comments): either, both, or neither."""
    keys = [env["API_KEY"].strip()] if env.get("API_KEY", "").strip() else []
    path = env.get("API_KEY_FILE", "").strip()
    if path:
        try:
            lines = Path(path).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"API_KEY_FILE={path!r} cannot be read: {exc.__class__.__name__}") from None
        keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not keys:
            raise SettingsError(f"API_KEY_FILE={path!r} holds no key")
    return tuple(keys)


def default_decode_threads(threads: int) -> int:
    """One decoder per 4 engine cores, at least one.

    Decoding and resizing a photo costs about a tenth of an inference, so one decoder keeps several
    engine workers fed. On 2 cores a second decoder only competes with the engine: one decoder answered
    4.6% and 7.5% more requests in two interleaved A/B runs.
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
    max_decode_bytes: int = 64 * 1024 * 1024
    # Images in one request (several `image` parts, JSON `images`, an OIP tensor of N images): 413 beyond it.
    max_images_per_request: int = 16
    log_level: str = "info"
    # text: lines for a person; json: one JSON object a line, an access line per request (service/logs.py).
    log_format: str = "text"
    # Traces to an OTLP/HTTP collector (service/tracing.py; requirements-tracing.txt): on when it is set.
    otlp_endpoint: str = ""
    # The scheduler (service/scheduler.py). WORKERS engine workers share THREADS cores: each session run
    # gets THREADS // WORKERS intra-op threads (1 by default: one single-threaded run per core).
    workers: int = 1
    max_batch: int = 1
    batch_wait_ms: float = 0.0
    max_queue: int = 64
    request_timeout_s: float = 30.0
    decode_threads: int = 1
    wide_runs: str = "auto"
    # Clients (service/middleware.py). A body must keep arriving: REQUEST_READ_TIMEOUT_S of grace, then at
    # least MIN_UPLOAD_BYTES_PER_S on average; 408 past that. 10 MiB at 128 kbit/s (16 KiB/s) still arrives.
    request_read_timeout_s: float = 10.0
    min_upload_bytes_per_s: int = 16 * 1024
    max_connections: int = 128
    max_discard_bytes: int = 256 * 1024 * 1024
    timeout_keep_alive_s: int = 75
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    cors_origins: tuple[str, ...] = ()
    # POST /v2/repository/models/{name}/load: off unless MODEL_LOAD=enabled (a load doubles the model's memory).
    model_load: bool = False

    @property
    def intra_op_threads(self) -> int:
        return max(1, self.threads // self.workers)

    @property
    def wide_threads(self) -> int:
        """Intra-op threads of a run that is alone: all THREADS, when that is more than a narrow run gets."""
        return self.threads if self.threads > self.intra_op_threads and self.wide_runs != "never" else 0

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
            max_decode_bytes=_int(env, "MAX_DECODE_BYTES", 64 * 1024 * 1024),
            max_images_per_request=_int(env, "MAX_IMAGES_PER_REQUEST", 16),
            log_level=log_level,
            log_format=_choice(env, "LOG_FORMAT", LOG_FORMATS),
            otlp_endpoint=env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip(),
            workers=_int(env, "WORKERS", threads),
            max_batch=_int(env, "MAX_BATCH", 1),
            batch_wait_ms=_float(env, "BATCH_WAIT_MS", 0.0, minimum=0.0),
            max_queue=_int(env, "MAX_QUEUE", 64),
            request_timeout_s=_float(env, "REQUEST_TIMEOUT_S", 30.0, minimum=0.001),
            decode_threads=_int(env, "DECODE_THREADS", default_decode_threads(threads)),
            wide_runs=_choice(env, "WIDE_RUNS", WIDE_RUNS),
            request_read_timeout_s=_float(env, "REQUEST_READ_TIMEOUT_S", 10.0, minimum=0.001),
            min_upload_bytes_per_s=_int(env, "MIN_UPLOAD_BYTES_PER_S", 16 * 1024),
            max_connections=_int(env, "MAX_CONNECTIONS", 128),
            max_discard_bytes=_int(env, "MAX_DISCARD_BYTES", 256 * 1024 * 1024, minimum=0),
            timeout_keep_alive_s=_int(env, "TIMEOUT_KEEP_ALIVE_S", 75),
            api_keys=_api_keys(env),
            cors_origins=_list(env, "CORS_ORIGINS"),
            model_load=_choice(env, "MODEL_LOAD", SWITCH[::-1]) == "enabled",
        )
