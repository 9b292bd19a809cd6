"""ASGI middleware that protects the service from its clients: slow or oversized bodies, too many requests, keys.

uvicorn has no deadline for receiving a request body (Kludex/uvicorn#157), and when a response goes out
before the body was read and the client asked to close (urllib always does), uvicorn closes the socket
with the body unread, so the kernel resets the connection before the client reads the answer.
"""

from __future__ import annotations

import asyncio
import hmac
import time

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import record
from service.errors import CorsRefused, Overloaded, RequestTimeout, Unauthorized, render
from service.payload import decimal

_CLOSE = (b"connection", b"close")


class _Body:
    """One request's body as it arrives: counted, held to a deadline that grows with the bytes received."""

    def __init__(self, scope: Scope, receive: Receive, grace_s: float, min_rate: int) -> None:
        headers = Headers(scope=scope)
        self._receive = receive
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.time()
        self._grace_s = grace_s
        self._min_rate = min_rate
        self.declared = decimal(headers.get("content-length", ""))
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self.complete = not chunked and not self.declared
        # With `Expect: 100-continue` the client sends nothing until the server reads; uvicorn answers
        # "100 Continue" on the first receive(), so reading after an early answer would corrupt the stream.
        self._awaiting_continue = headers.get("expect", "").lower() == "100-continue"
        self.received = 0
        self.record = record.current.get()  # the body's bytes and read time go in its access line

    def _time_left(self) -> float:
        # REQUEST_READ_TIMEOUT_S of grace, then one more second per MIN_UPLOAD_BYTES_PER_S received; and never
        # more than REQUEST_READ_TIMEOUT_S of silence (a fast start must not buy a long stall later).
        deadline = self._started + self._grace_s + self.received / self._min_rate
        return min(deadline - self._loop.time(), self._grace_s)

    async def receive(self) -> Message:
        if self.complete:  # after the body only http.disconnect can come: no deadline for waiting on it
            return await self._receive()
        self._awaiting_continue = False
        if self.record is not None and not self.record.read_start:
            self.record.read_start = time.perf_counter()
        left = self._time_left()
        try:
            if left <= 0:
                raise TimeoutError
            message = await asyncio.wait_for(self._receive(), left)
        except TimeoutError:
            raise RequestTimeout(
                f"the request body did not arrive in time (REQUEST_READ_TIMEOUT_S={self._grace_s:g} s of grace, "
                f"then at least {self._min_rate:,} bytes/s)"
            ) from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.complete = not message.get("more_body", False)
        else:
            self.complete = True
        if self.complete and self.record is not None:
            self.record.read_end = time.perf_counter()
        return message

    async def discard_rest(self, limit: int) -> bool:
        """Read and drop what is left of the body, within the deadline and up to `limit` bytes in all."""
        if self._awaiting_continue or (self.declared is not None and self.declared > limit):
            return False
        try:
            while not self.complete:
                message = await self.receive()
                if message["type"] != "http.request" or self.received > limit:
                    return False
        except RequestTimeout:
            return False
        return True


class ClientGuard:
    """Bounds the requests in progress and holds each body to a deadline; reads an unread body before answering.

    A request still receiving its body is counted here (MAX_CONNECTIONS), never by the inference admission.
    An answer sent before the body was read (413, 415, 401, 408, 404) first reads and discards the rest,
    up to MAX_DISCARD_BYTES and within the read deadline, so that every client reads it; beyond that the
    answer carries `connection: close` and the socket is closed.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        read_timeout_s: float,
        min_upload_bytes_per_s: int,
        max_requests: int,
        max_discard_bytes: int,
        retry_after_s: int = 1,
    ) -> None:
        self.app = app
        self.read_timeout_s = read_timeout_s
        self.min_rate = min_upload_bytes_per_s
        self.max_requests = max_requests
        self.max_discard_bytes = max_discard_bytes
        self.retry_after = str(retry_after_s)
        self.open = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.open >= self.max_requests:
            response = render(
                Overloaded(
                    f"{self.open} requests are open (MAX_CONNECTIONS={self.max_requests}); retry shortly",
                    headers={"Retry-After": self.retry_after, "Connection": "close"},
                )
            )
            await response(scope, receive, send)
            return
        self.open += 1
        body = _Body(scope, receive, self.read_timeout_s, self.min_rate)

        async def send_after_body(message: Message) -> None:
            answering = message["type"] == "http.response.start"
            if answering and not body.complete and not await body.discard_rest(self.max_discard_bytes):
                message = {**message, "headers": [*message.get("headers", []), _CLOSE]}
            await send(message)

        try:
            await self.app(scope, body.receive, send_after_body)
        finally:
            self.open -= 1
            if body.record is not None:
                body.record.bytes_in = body.received


class ApiKey:
    """With API keys configured, every path but the public ones needs `Authorization: Bearer <key>`."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...], public: frozenset[str]) -> None:
        self.app = app
        self.keys = [key.encode() for key in keys]
        self.public = public

    def _authorized(self, header: str | None) -> bool:
        scheme, _, token = (header or "").partition(" ")
        given = token.strip().encode()
        # Every key compared in constant time, none skipped: the timing tells nothing about which matched.
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(given, key)
        return scheme.lower() == "bearer" and matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public:
            await self.app(scope, receive, send)
            return
        if not self._authorized(Headers(scope=scope).get("authorization")):
            response = render(
                Unauthorized(
                    "this route needs an API key: send `Authorization: Bearer <key>`",
                    headers={"WWW-Authenticate": 'Bearer realm="car-classifier"'},
                )
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class Cors(CORSMiddleware):
    """Starlette's CORS middleware, with a refused preflight answered in the service's JSON error shape (its own
    answer is plain text, "Disallowed CORS origin"): a browser shows neither, but a developer's curl sees why."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")
        headers = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}
        methods = ", ".join(self.allow_methods)
        message = f"CORS preflight refused ({refused}): an origin of CORS_ORIGINS, a method of {methods}"
        return render(CorsRefused(message, headers=headers))
