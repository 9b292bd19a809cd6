"""GET /docs: one self-contained HTML page (no CDN, no external font) to try the model from a browser."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse

PAGE = Path(__file__).resolve().parent / "static" / "docs.html"
# Everything the page needs is inline or on this origin; the policy makes a stray external load fail loudly.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'"
    ),
    "Cache-Control": "no-cache",
}


@cache
def _page() -> bytes:
    return PAGE.read_bytes()


async def docs(request: Request) -> HTMLResponse:
    return HTMLResponse(_page(), headers=_HEADERS)
