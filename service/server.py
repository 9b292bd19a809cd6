"""uvicorn, as `python -m service` runs it: graceful drain on SIGTERM, and /ready off the moment it starts."""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

import uvicorn
from starlette.applications import Starlette
from uvicorn.config import STARTUP_FAILURE

from service import logs
from service.app import create_app
from service.connections import Connections, budget_for, raise_descriptor_limit
from service.metrics import Metrics
from service.model import Classifier
from service.protocol import HttpProtocol
from service.settings import Settings


class Server(uvicorn.Server):
    """uvicorn, plus: /ready turns 503 the moment a shutdown starts, and SIGTERM exits 0 once drained.

    uvicorn stops accepting connections and waits for the requests in flight; the lifespan then answers
    whatever is still queued before the workers stop. (Stock uvicorn re-raises the signal at the very end,
    which would make a clean drain look like a kill.)
    """

    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._app.state.data_plane.ready = False
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


log = logging.getLogger("service")

CANNOT_LISTEN = 4  # the exit code when uvicorn cannot start; its own, 3, says a bad artifact here


def _connections(metrics: Metrics) -> Connections:
    limits = raise_descriptor_limit()
    budget = budget_for(limits.soft)
    log.info("descriptor limit %d (hard %d): up to %d open connections", limits.soft, limits.hard, budget)
    closed = metrics.connections_closed
    return Connections(budget, metrics.connections_open.set, lambda reason: closed.labels(reason).inc())


def serve(settings: Settings, classifier: Classifier) -> int:
    """Serve until a signal drains and stops the server; the process's exit code."""
    logs.configure(settings)
    app = create_app(settings, classifier)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # uvicorn's own lines go to the root logger, in LOG_FORMAT; its access line gives way to the service's
        # (service/observe.py), which has the request ID, the status the app answered and the stages' times.
        log_config=None,
        access_log=False,
        # No WebSocket routes; "auto" would import wsproto at start-up (20 ms of the cold start).
        ws="none",
        # A request uvicorn cannot parse is answered in JSON like every other error; headers have a deadline,
        # connections a budget (service/protocol.py).
        http=HttpProtocol.guarded(settings.request_read_timeout_s, _connections(app.state.metrics)),
        # Above the idle timeouts of common load balancers (60 s): uvicorn's 5 s makes a proxy reuse a
        # connection the server has just closed, and the client gets a 502 (kserve/kserve#5446).
        timeout_keep_alive=settings.timeout_keep_alive_s,
        server_header=False,
    )
    try:
        Server(config, app).run()
    except SystemExit as exc:
        if exc.code != STARTUP_FAILURE:
            raise
        # uvicorn has logged why (a port in use, an address it cannot bind) and stopped the lifespan.
        print(f"service: cannot serve on {settings.host}:{settings.port}: see the error above", file=sys.stderr)
        return CANNOT_LISTEN
    return 0
