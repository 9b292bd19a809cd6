"""Optional OpenTelemetry traces: a real server exports to a real OTLP/HTTP receiver (a small server here, decoding
the protobuf with opentelemetry-proto); without OTEL_EXPORTER_OTLP_ENDPOINT nothing of OpenTelemetry is imported."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.helpers import ROOT, image_bytes, running_service, wait_for

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
STAGES = {"body read", "queue wait", "decode", "engine run"}


class Receiver:
    """An OTLP/HTTP collector of traces: every span posted to /v1/traces, decoded."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.paths: list[str] = []
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                export = ExportTraceServiceRequest.FromString(body)
                with lock:
                    outer.paths.append(self.path)
                    outer.spans += [span for rs in export.resource_spans for ss in rs.scope_spans for span in ss.spans]
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.close()


def test_one_trace_per_request_with_four_stages_under_the_callers_parent(
    tiny_artifact: Path, receiver: Receiver, tmp_path: Path
) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "50", "LOG_FORMAT": "json"}
    with running_service(tiny_artifact, tmp_path / "server.log", **env) as server:
        traceparent = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
        headers = {"traceparent": traceparent, "X-Request-ID": "traced-1"}
        answer = httpx.post(f"{server.url}/infer", files={"image": image_bytes((0, 0, 200))}, headers=headers)
        assert answer.status_code == 200, answer.text
        ping = httpx.get(f"{server.url}/ping", headers={"X-Request-ID": "ping-1"})  # no caller's trace: its own
        assert ping.status_code == 200
        wait_for(lambda: len(receiver.spans) >= 6, "the spans")
        assert f'"trace_id":"{CALLER_TRACE}"' in server.output()  # the access line names the trace
    assert set(receiver.paths) == {"/v1/traces"}
    by_trace: dict[str, list[Span]] = {}
    for span in receiver.spans:
        by_trace.setdefault(span.trace_id.hex(), []).append(span)
    # One trace per request: this test's two, and the start-up's polls of /ping.
    assert all(len(group) == 1 for trace, group in by_trace.items() if trace != CALLER_TRACE)
    spans = by_trace[CALLER_TRACE]
    (root,) = [span for span in spans if span.name == "POST /infer"]
    assert root.parent_span_id.hex() == CALLER_SPAN and root.kind == Span.SpanKind.SPAN_KIND_SERVER
    attributes = {item.key: item.value for item in root.attributes}
    assert attributes["request.id"].string_value == "traced-1"
    assert attributes["http.response.status_code"].int_value == 200
    children = [span for span in spans if span is not root]
    assert {span.name for span in children} == STAGES and len(children) == 4
    for child in children:
        assert child.parent_span_id == root.span_id
        assert root.start_time_unix_nano <= child.start_time_unix_nano <= child.end_time_unix_nano
        assert child.end_time_unix_nano <= root.end_time_unix_nano
    (own,) = [group[0] for group in by_trace.values() if _attribute(group[0], "request.id") == "ping-1"]
    assert own.name == "GET /ping" and not own.parent_span_id


def _attribute(span: Span, key: str) -> str:
    return next((item.value.string_value for item in span.attributes if item.key == key), "")


def test_without_an_endpoint_opentelemetry_is_never_imported(tiny_artifact: Path) -> None:
    # The app built and started as `python -m service` builds it, in a fresh interpreter.
    code = (
        "import sys, asyncio\n"
        "from service.app import create_app\n"
        "from service.settings import Settings\n"
        f"app = create_app(Settings(model_dir=__import__('pathlib').Path({str(tiny_artifact)!r})))\n"
        "async def main():\n"
        "    async with app.router.lifespan_context(app):\n"
        "        pass\n"
        "asyncio.run(main())\n"
        "print(sorted(name for name in sys.modules if name.startswith('opentelemetry')))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"
