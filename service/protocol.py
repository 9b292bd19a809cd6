"""uvicorn's HTTP protocol, with the connection guarded before any request reaches the app.

- A request uvicorn cannot parse is answered in the service's JSON error shape (stock uvicorn writes plain text).
- A header deadline: the request line and headers must have arrived within REQUEST_READ_TIMEOUT_S of the
  connection opening (or, on a kept-alive connection, of the next request's first byte); otherwise the
  connection is closed, after a JSON 408 if part of a request came. uvicorn bounds only the idle time between
  requests (TIMEOUT_KEEP_ALIVE_S): a connection that never sent a request stayed open for ever.
- A descriptor budget (service/connections.py): a connection past it displaces the oldest idle one, or is
  answered 503 at once, instead of `accept` failing for every client.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.connections import Connections
from service.errors import MalformedHTTP, Overloaded, RequestTimeout, ServiceError, render


class HttpProtocol(HttpToolsProtocol):
    """httptools' parser, as uvicorn picks it by default where httptools is installed (requirements-serve.txt)."""

    header_timeout_s: float | None = None
    open_connections: Connections | None = None
    _header_timer: asyncio.TimerHandle | None = None
    _awaiting = False  # waiting for a request's headers: the deadline runs
    _partial = False  # ... and some of them have arrived
    _between = False  # an answer is out, and the next request has not begun

    @classmethod
    def guarded(cls, header_timeout_s: float, connections: Connections) -> type[HttpProtocol]:
        """This protocol with a header deadline and a connection budget (uvicorn takes a class)."""
        return type(
            "GuardedHttpProtocol", (cls,), {"header_timeout_s": header_timeout_s, "open_connections": connections}
        )

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.open_connections is not None and not self.open_connections.opened(self):
            self._answer_and_close(
                Overloaded("too many open connections; retry shortly", headers={"Retry-After": "1"}), None
            )
            return
        self._awaiting = True
        self._start_header_timer()

    def data_received(self, data: bytes) -> None:
        if data and self._between:
            # The first byte of the next request on a kept-alive connection: its headers' deadline starts now.
            self._between, self._awaiting = False, True
            self._start_header_timer()
        self._partial = self._partial or (self._awaiting and bool(data))
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._awaiting = self._partial = False
        self._cancel_header_timer()
        if self.open_connections is not None:
            self.open_connections.busy(self)
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.pipeline and not self.transport.is_closing():
            self._between = True
            if self.open_connections is not None:
                self.open_connections.idle(self)

    def timeout_keep_alive_handler(self) -> None:
        if self.open_connections is not None:
            self.open_connections.closed(self, "idle")
        super().timeout_keep_alive_handler()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        if self.open_connections is not None:
            self.open_connections.closed(self)
        super().connection_lost(exc)

    def close(self) -> None:
        """Displaced for the budget: the connection carries no request."""
        self._cancel_header_timer()
        if not self.transport.is_closing():
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        self._answer_and_close(MalformedHTTP(msg), None)

    def _start_header_timer(self) -> None:
        if self.header_timeout_s is not None and self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request stalls behind one still being answered: close once that answer is out.
            self.cycle.keep_alive = False
            return
        if self._partial:
            limit = f"{self.header_timeout_s:g} s"
            error = RequestTimeout(
                f"the request line and headers did not arrive within {limit} (REQUEST_READ_TIMEOUT_S)"
            )
            self._answer_and_close(error, "header_deadline")
            return
        if self.open_connections is not None:
            self.open_connections.closed(self, "header_deadline")
        self.transport.close()

    def _answer_and_close(self, error: ServiceError, reason: str | None) -> None:
        response = render(error)
        body = bytes(response.body)
        head = [STATUS_LINE[error.status_code]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        for key, text in (error.headers or {}).items():
            head += [key.encode("latin-1"), b": ", text.encode("latin-1"), b"\r\n"]
        head += [b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)]
        if self.open_connections is not None and reason is not None:
            self.open_connections.closed(self, reason)
        self.transport.write(b"".join(head) + body)
        self.transport.close()
