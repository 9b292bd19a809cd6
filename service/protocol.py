"""uvicorn's HTTP protocol, with one change: a request it cannot parse is answered in the service's JSON error shape.

Bytes that are not HTTP never reach the app, so its handlers cannot answer them; stock uvicorn writes a
plain-text "Invalid HTTP request received." there, the one error of the service that was not JSON.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.errors import MalformedHTTP, render


class HttpProtocol(HttpToolsProtocol):
    """httptools' parser, as uvicorn picks it by default where httptools is installed (requirements-serve.txt)."""

    def send_400_response(self, msg: str) -> None:
        body = render(MalformedHTTP(msg)).body
        head = [STATUS_LINE[MalformedHTTP.status_code]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)]
        self.transport.write(b"".join(head) + body)
        self.transport.close()
