"""Open connections, before any request reaches the app: a descriptor budget, and who goes first when it is full.

Every connection holds a file descriptor, whether or not it ever sends a request. When the process runs out of
descriptors, `accept` fails and every new client, the orchestrator's probes included, is reset. So connections
are counted here against a budget below the descriptor limit (a reserve is kept for the files, pipes and sockets
the service itself opens); once it is reached, a new connection first displaces the oldest one that is not
carrying a request (still waiting for its headers, or idle between requests), and only if there is none is it
answered 503 at once.
"""

from __future__ import annotations

import logging
import resource
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("service")

# Descriptors the service keeps for itself: the listening socket, the model and label files, log and pipe
# descriptors, the event loop's own, what onnxruntime and Pillow open.
MIN_RESERVE = 64


class Closable(Protocol):
    def close(self) -> None: ...


@dataclass(frozen=True)
class Limits:
    soft: int
    hard: int


def raise_descriptor_limit() -> Limits:
    """Raise the soft RLIMIT_NOFILE to the hard one (as nginx's worker_rlimit_nofile lets an operator do): the
    soft limit is often 1,024 whatever the hard one allows. Returns the limits in force after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("could not raise the descriptor limit from %d to %d: %s", soft, wanted, exc)
    return Limits(soft, hard)


def budget_for(soft_limit: int) -> int:
    """Connections that may be open at once under a descriptor limit: all but a reserve (a tenth, at least
    MIN_RESERVE), so that the service's own files can always be opened and `accept` never fails."""
    return max(1, soft_limit - max(MIN_RESERVE, soft_limit // 10))


class Connections:
    """The open connections, and in order of when they last became idle, those carrying no request."""

    def __init__(self, budget: int, on_open: Callable[[int], None], on_closed: Callable[[str], None]) -> None:
        self.budget = budget
        self._counted: set[Closable] = set()
        self._idle: OrderedDict[Closable, None] = OrderedDict()
        self._on_open = on_open
        self._on_closed = on_closed

    @property
    def open(self) -> int:
        return len(self._counted)

    def opened(self, connection: Closable) -> bool:
        """Count a new connection, displacing the oldest idle one if the budget is full; False if it must be
        refused instead (the budget is full of requests in progress)."""
        if len(self._counted) >= self.budget and self._idle:
            oldest, _ = self._idle.popitem(last=False)
            self.closed(oldest, "budget")
            oldest.close()
        if len(self._counted) >= self.budget:
            self._on_closed("refused")
            return False
        self._counted.add(connection)
        self._idle[connection] = None
        self._on_open(len(self._counted))
        return True

    def idle(self, connection: Closable) -> None:
        """`connection` carries no request (between two): it may be displaced, oldest first."""
        if connection in self._counted:
            self._idle[connection] = None
            self._idle.move_to_end(connection)

    def busy(self, connection: Closable) -> None:
        """`connection` carries a request now (its headers are in): it is never displaced."""
        self._idle.pop(connection, None)

    def closed(self, connection: Closable, reason: str | None = None) -> None:
        """`connection` is gone (`reason`: why the service closed it). Counted once, however often it is said."""
        if connection not in self._counted:
            return
        self._counted.discard(connection)
        self._idle.pop(connection, None)
        self._on_open(len(self._counted))
        if reason is not None:
            self._on_closed(reason)
