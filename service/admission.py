"""Admission: a cap on the images inside the service (decoding, queued or in the engine); beyond it, 503 at once."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from service.errors import Overloaded


class Admission:
    """Counts the images of the requests being served; a request counts once per image it carries."""

    def __init__(self, limit: int, retry_after_s: int = 1) -> None:
        self.limit = limit
        self.pending = 0
        self._retry_after = str(retry_after_s)

    @contextlib.contextmanager
    def admit(self, images: int = 1) -> Iterator[None]:
        """Room for `images` more images, or 503 at once."""
        if self.pending + images > self.limit:
            raise Overloaded(
                f"{self.pending} images are already being served (the limit is {self.limit}: MAX_QUEUE and what "
                "the inference threads hold); retry shortly",
                headers={"Retry-After": self._retry_after},
            )
        self.pending += images
        try:
            yield
        finally:
            self.pending -= images
