"""A local OTLP/HTTP trace receiver: what a collector would receive, decoded for the tests."""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


@dataclass
class Span:
    """One received span, its ids as hex."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    links: list[tuple[str, str]]  # (trace_id, span_id)
    resource: dict[str, Any]
    status: int  # 0 unset, 1 ok, 2 error
    flags: int = 0
    children: list[Span] = field(default_factory=list)


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def _attributes(attributes: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in attributes}


class Receiver:
    """Accepts POST /v1/traces (protobuf, plain or gzip); `status` answers every export with
    that code instead (500: a collector that refuses), `hold` keeps each export waiting."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.exports = 0
        self.status = 200
        self.hold = threading.Event()
        self.hold.set()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                encoding = self.headers.get("content-encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                receiver.hold.wait(30)
                status = receiver.status if self.path == "/v1/traces" else 404
                if status == 200:
                    receiver._take(body)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(status)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _take(self, body: bytes) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        received = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    received.append(Span(
                        name=s.name, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                        parent_id=s.parent_span_id.hex(), kind=s.kind,
                        attributes=_attributes(s.attributes),
                        events=[(e.name, _attributes(e.attributes)) for e in s.events],
                        links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                        resource=resource, status=s.status.code, flags=s.flags))
        with self._lock:
            self.exports += 1
            self.spans.extend(received)

    def all(self) -> list[Span]:
        with self._lock:
            return list(self.spans)

    def wait(self, condition: Callable[[list[Span]], bool], timeout: float = 30) -> list[Span]:
        """Poll the received spans until `condition` holds (spans leave in batches)."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.all()
            if condition(spans):
                return spans
            assert time.monotonic() < deadline, f"spans never arrived: {names(spans)}"
            time.sleep(0.02)

    def clear(self) -> None:
        with self._lock:
            self.spans.clear()

    def close(self) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()


def names(spans: list[Span]) -> list[str]:
    return sorted(s.name for s in spans)


def trees(spans: list[Span]) -> list[Span]:
    """The root spans (no parent among `spans`), each with its `children` filled in."""
    by_id = {s.span_id: s for s in spans}
    for s in spans:
        s.children = []
    roots = []
    for s in spans:
        parent = by_id.get(s.parent_id)
        if parent is None:
            roots.append(s)
        else:
            parent.children.append(s)
    return roots


def walk(span: Span) -> Iterator[Span]:
    yield span
    for child in span.children:
        yield from walk(child)


def values(span: Span) -> Iterator[str]:
    """Every string an exported span carries: attributes, events, resource, name."""
    yield span.name
    for group in (span.attributes, span.resource, *(attrs for _, attrs in span.events)):
        for key, value in group.items():
            yield key
            yield str(value)
    for name, _ in span.events:
        yield name
