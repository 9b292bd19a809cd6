"""Settings, read once from the environment into one frozen object."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from service.cpus import available_cpus

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


class SettingsError(ValueError):
    """An environment variable holds a value the service cannot use."""


def _int(env: Mapping[str, str], key: str, default: int, minimum: int = 1) -> int:
    raw = env.get(key)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{key}={raw!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"{key}={value} must be at least {minimum}")
    return value


@dataclass(frozen=True)
class Settings:
    model_dir: Path = Path("artifacts")
    host: str = "0.0.0.0"
    port: int = 4000
    threads: int = 1
    max_upload_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    log_level: str = "info"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        log_level = env.get("LOG_LEVEL", "info").strip().lower()
        if log_level not in LOG_LEVELS:
            raise SettingsError(f"LOG_LEVEL={log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        return cls(
            model_dir=Path(env.get("MODEL_DIR") or "artifacts"),
            host=env.get("HOST") or "0.0.0.0",
            port=_int(env, "PORT", 4000, minimum=0),
            threads=_int(env, "THREADS", available_cpus()),
            max_upload_bytes=_int(env, "MAX_UPLOAD_BYTES", 10 * 1024 * 1024),
            max_image_pixels=_int(env, "MAX_IMAGE_PIXELS", 40_000_000),
            log_level=log_level,
        )
