"""A request's deadline: one value, made where the request arrives and carried down to the scheduler's jobs."""

from __future__ import annotations

import time
from dataclasses import dataclass

from service.errors import DeadlineExceeded


@dataclass(frozen=True)
class Deadline:
    """When an answer is due, on time.monotonic()'s clock, and what a client is told once it has passed."""

    at: float
    message: str

    @classmethod
    def after(cls, seconds: float, setting: str = "") -> Deadline:
        named = f" ({setting})" if setting else ""
        return cls(time.monotonic() + seconds, f"no answer within {seconds:g} s{named}")

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def exceeded(self) -> DeadlineExceeded:
        return DeadlineExceeded(self.message)
