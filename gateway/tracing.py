"""Traces: OpenTelemetry spans of each request, sent to a collector over OTLP/HTTP.

Built only with a `tracing` section in the config; without one the gateway holds no SDK object
and each instrumented place costs one `is None` test. The tree of one request:

    POST /api/v1/chat/completions       SERVER  the request, from its head to its last byte
      gateway.admit                              the store's one round trip (quota, budget, ...)
      gateway.cache                              hit, miss, coalesced, replay, bypass
      POST /api/v1/chat/completions     CLIENT  the upstream call, pacing wait included;
                                                 the upstream receives its `traceparent`
      gateway.bookkeeping                        settlement handed to the bookkeeping
    gateway.bookkeeping.batch           (root)   a batch written to the store after the
                                                 answers, with a link to each request in it

A client's W3C `traceparent` makes the request span its child and decides sampling (its sampled
flag is respected; a malformed header is ignored). Attributes follow the OpenTelemetry HTTP and
GenAI conventions, plus the gateway's own (`gateway.*`); they never carry a key, a token, a
header value, a prompt or a body. Spans leave in batches from a background thread through a
bounded queue: a slow or unreachable collector costs dropped spans
(`gateway_trace_spans_dropped_total`), never a slower request.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar
from urllib.parse import urlsplit

import orjson
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter,
)
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import (
    ReadableSpan,
    SpanLimits,
    TracerProvider,
)
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from . import __version__, routes
from . import config as cfg
from .asgi import Headers, Reply, Scope
from .bookkeeping import MAX_BATCH, Work
from .metrics import Metrics
from .request import ParsedRequest
from .settlement import End

log = logging.getLogger("gateway")

P = ParamSpec("P")
T = TypeVar("T")
Span = trace.Span
Exemplar = dict[str, str]

PROVIDER = "apiin.one"  # gen_ai.system / gen_ai.provider.name
BATCH_SPAN = "gateway.bookkeeping.batch"
_OPERATIONS = {routes.CHAT: "chat"}  # gen_ai.operation.name; the media endpoints make content
_TRACE_HEADERS = (b"traceparent", b"tracestate")
_MAX_TOKENS = 10**12  # believable token counts (gen_ai.usage.*)
_MAX_PATH = 512  # characters of url.path kept (a request head may be 32 KiB)
_NOOP: contextlib.nullcontext[Span] = contextlib.nullcontext(trace.INVALID_SPAN)


class Exchange(Protocol):
    """What the proxy knows of a request once it is answered (`proxy.Exchange`)."""

    @property
    def request_id(self) -> str: ...
    @property
    def route(self) -> str: ...
    @property
    def team(self) -> str: ...
    @property
    def key_id(self) -> str | None: ...
    @property
    def model(self) -> str | None: ...
    @property
    def status(self) -> int: ...
    @property
    def cache(self) -> str: ...
    @property
    def credits(self) -> float: ...
    @property
    def reason(self) -> str | None: ...


class Traced(Protocol):
    """Whatever carries the tracing of a running gateway (`runtime.Runtime`)."""

    @property
    def tracing(self) -> Tracing | None: ...


R = TypeVar("R", bound=Traced)


class Tracing:
    """The tracer of one process: its provider, sampler, batch processor and exporter."""

    def __init__(self, config: cfg.Tracing, *, instance: str, metrics: Metrics,
                 upstream_url: str, exporter: SpanExporter | None = None) -> None:
        dropped = metrics.trace_spans_dropped
        self._exporter = _Counted(
            exporter or OTLPSpanExporter(endpoint=traces_url(config.endpoint),
                                         timeout=config.timeout_s),
            on_failed=dropped.labels("export_failed").inc)
        self._processor = _Batch(
            self._exporter, max_queue_size=config.queue_size,
            schedule_delay_millis=config.export_interval_s * 1000,
            max_export_batch_size=min(512, config.queue_size),
            on_dropped=dropped.labels("queue_full").inc)
        self._provider = TracerProvider(
            resource=_resource(instance), sampler=ParentBased(_LinkedOrRatio(config.sample_ratio)),
            span_limits=SpanLimits(max_links=MAX_BATCH), shutdown_on_exit=False)
        self._provider.add_span_processor(self._processor)
        self._tracer = self._provider.get_tracer("aio-gateway", __version__)
        self._propagator = TraceContextTextMapPropagator()
        self._request: contextvars.ContextVar[Span | None] = contextvars.ContextVar(
            "gateway_request_span", default=None)
        base = urlsplit(upstream_url.rstrip("/"))
        self._upstream = {"server.address": base.hostname or "",
                          "server.port": base.port or (443 if base.scheme == "https" else 80)}
        self._upstream_base = upstream_url.rstrip("/")
        self._upstream_path = base.path
        self.bookkeeping = BookkeepingTrace(self._tracer)

    # -- the request ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def request(self, scope: Scope) -> Iterator[Span]:
        """The request's SERVER span, current while the request runs; the client's
        `traceparent` (if well-formed) is its parent."""
        parent = self._propagator.extract(scope["headers"], getter=_ASGI_HEADERS)
        method, route = scope["method"], _route_template(scope["path"])
        server = scope.get("server") or (None, None)
        attributes: dict[str, Any] = {
            "http.request.method": method, "url.path": scope["path"][:_MAX_PATH],
            "url.scheme": scope.get("scheme", "http"),
        }
        if server[0] is not None:
            attributes["server.address"] = server[0]
            if server[1] is not None:
                attributes["server.port"] = server[1]
        if route is not None:
            attributes["http.route"] = route
        span = self._tracer.start_span(
            f"{method} {route}" if route else method, context=parent, kind=SpanKind.SERVER,
            attributes=attributes, record_exception=False, set_status_on_exception=False)
        token = self._request.set(span)
        try:
            with trace.use_span(span, end_on_exit=True, record_exception=False,
                                set_status_on_exception=False):
                yield span
        finally:
            self._request.reset(token)

    def finish_request(self, ex: Exchange) -> Exemplar | None:
        """Describe the answered request on its span; the exemplar for its latency."""
        span = self._request.get()
        if span is None or not span.is_recording():
            return None
        attributes: dict[str, Any] = {
            "http.response.status_code": ex.status, "gateway.request_id": ex.request_id,
            "gateway.route": ex.route, "gateway.team": ex.team, "gateway.cache": ex.cache,
        }
        if ex.key_id is not None:
            attributes["gateway.key_id"] = ex.key_id
        if ex.credits:
            attributes["gateway.credits_charged"] = ex.credits
        if ex.reason is not None:
            attributes["gateway.reason"] = ex.reason
        if ex.model is not None:
            attributes.update(_gen_ai(ex.route, ex.model))
        if ex.status >= 500 or ex.status == 0:
            attributes["error.type"] = str(ex.status) if ex.status else "no_answer"
            span.set_status(Status(StatusCode.ERROR))
        span.set_attributes(attributes)
        return _exemplar(span)

    def answered(self, route: str, end: End, reply: Reply | None) -> None:
        """The token usage of an upstream answer, on the request's span (GenAI conventions)."""
        span = self._request.get()
        if (span is None or not span.is_recording() or route != routes.CHAT or reply is None
                or end not in (End.ANSWER, End.STREAM) or not 200 <= reply.status < 300):
            return
        usage = _usage(reply.body, stream=end is End.STREAM)
        if usage is not None:
            span.set_attributes({"gen_ai.usage.input_tokens": usage[0],
                                 "gen_ai.usage.output_tokens": usage[1]})

    # -- the steps inside it ---------------------------------------------------------------------

    def _sampled(self) -> bool:
        """Whether this request is recorded. The children of one that is not would not be
        either: they are not made at all (an SDK span costs tens of microseconds even then),
        and the upstream's `traceparent` names the request span, marked not sampled."""
        span = self._request.get()
        return span is not None and span.is_recording()

    def span(self, name: str) -> contextlib.AbstractContextManager[Span]:
        """An INTERNAL child of the current span."""
        if not self._sampled():
            return _NOOP
        return _current(self._tracer.start_span(name, record_exception=False,
                                                set_status_on_exception=False))

    def decided(self, result: str) -> None:
        """The cache decision that takes no time of its own (a miss, a bypass)."""
        if self._sampled():
            self._tracer.start_span("gateway.cache", attributes={"gateway.cache.result": result},
                                    record_exception=False, set_status_on_exception=False).end()

    def upstream(self, req: ParsedRequest, pace_delay_s: float) -> (
            contextlib.AbstractContextManager[Span]):
        """The upstream call's CLIENT span, from the pacing wait to the answer's last byte."""
        if not self._sampled():
            return _NOOP
        template = self._upstream_path + "/" + _TEMPLATES.get(req.route, req.path)
        attributes: dict[str, Any] = {
            **self._upstream, "http.request.method": req.method, "url.template": template,
            "url.full": f"{self._upstream_base}/{req.path}", "gateway.route": req.route,
            "gateway.upstream.pace_wait_s": pace_delay_s,
        }
        if req.model is not None:
            attributes.update(_gen_ai(req.route, req.model))
        span = self._tracer.start_span(f"{req.method} {template}", kind=SpanKind.CLIENT,
                                       attributes=attributes, record_exception=False,
                                       set_status_on_exception=False)
        if pace_delay_s > 0:
            span.add_event("gateway.upstream.pacing_wait", {"seconds": pace_delay_s})
        return _current(span)

    def upstream_answered(self, status: str) -> Exemplar | None:
        """The upstream's status on the current (upstream) span; the exemplar of its latency."""
        span = trace.get_current_span()
        if not span.is_recording():
            return None
        if status.isdigit():
            span.set_attribute("http.response.status_code", int(status))
            if int(status) >= 500:
                span.set_attribute("error.type", status)
                span.set_status(Status(StatusCode.ERROR))
        return _exemplar(span)

    def retrying(self) -> None:
        trace.get_current_span().add_event("gateway.upstream.retry")

    def inject(self, headers: Headers) -> Headers:
        """The headers for the upstream: the current span's `traceparent` (and `tracestate`)
        instead of the client's."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        return [*(h for h in headers if h[0] not in _TRACE_HEADERS),
                *((k.encode(), v.encode()) for k, v in carrier.items())]

    # -- the process -----------------------------------------------------------------------------

    def flush(self) -> None:
        """Export what has ended (blocking: tests and benchmarks)."""
        self._provider.force_flush()

    async def close(self, timeout_s: float) -> None:
        """Export what is queued and stop, within `timeout_s`; the rest is dropped. The export
        runs in a daemon thread: a collector that does not answer never holds up the exit."""
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def shutdown() -> None:
            try:
                self._provider.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile
                    loop.call_soon_threadsafe(done.set)

        threading.Thread(target=shutdown, name="gateway-tracing-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(done.wait(), timeout_s)
        except TimeoutError:
            log.warning("shutdown: spans still queued for the collector were dropped")


def child(tracing: Tracing | None, name: str) -> contextlib.AbstractContextManager[Span]:
    """`tracing.span(name)`, or a span that records nothing when tracing is off."""
    return _NOOP if tracing is None else tracing.span(name)


def upstream_call(fn: Callable[Concatenate[R, ParsedRequest, P], Awaitable[T]]
                  ) -> Callable[Concatenate[R, ParsedRequest, P], Awaitable[T]]:
    """Runs an upstream call (`forward.fetch`, `forward.relay`) inside its CLIENT span. With
    tracing off, the call's own coroutine is returned: no frame of this wrapper is held for as
    long as the upstream takes."""

    async def traced(tracing: Tracing, rt: R, req: ParsedRequest, /, *args: P.args,
                     **kwargs: P.kwargs) -> T:
        pace = kwargs.get("pace_delay_s", 0.0)
        with tracing.upstream(req, pace if isinstance(pace, float | int) else 0.0):
            return await fn(rt, req, *args, **kwargs)

    @functools.wraps(fn)
    def call(rt: R, req: ParsedRequest, /, *args: P.args, **kwargs: P.kwargs) -> Awaitable[T]:
        tracing = rt.tracing
        if tracing is None:
            return fn(rt, req, *args, **kwargs)
        return traced(tracing, rt, req, *args, **kwargs)

    return call


class BookkeepingTrace:
    """Links each batch the bookkeeping writes to the requests whose work it carries.

    The work of a sampled request is remembered (with the span that queued it) from `queued`
    until the batch that lands it; work sent again keeps its link for the next batch."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer
        self._links: dict[int, tuple[Work, trace.SpanContext]] = {}

    def queued(self, work: Work) -> None:
        context = trace.get_current_span().get_span_context()
        if context.trace_flags.sampled:
            self._links[id(work)] = (work, context)  # the work is held: its id stays unique

    async def send(self, batch: Sequence[Work],
                   send: Callable[[list[Work]], Awaitable[list[Work]]]) -> list[Work]:
        """`send(batch)` inside a root span linked to the batch's requests."""
        linked = [entry for w in batch if (entry := self._links.pop(id(w), None)) is not None]
        span = self._tracer.start_span(
            BATCH_SPAN, context=Context(),
            links=[Link(context) for _, context in linked],
            attributes={"gateway.bookkeeping.batch_size": len(batch)},
            record_exception=False, set_status_on_exception=False)
        with _current(span):
            retry = await send(list(batch))
            if retry:
                span.set_attribute("gateway.bookkeeping.retried", len(retry))
                span.set_status(Status(StatusCode.ERROR))
        if retry and linked:
            again = {id(w) for w in retry}
            self._links.update((id(w), (w, c)) for w, c in linked if id(w) in again)
        return retry


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a collector's base URL (as OTEL_EXPORTER_OTLP_ENDPOINT)."""
    return endpoint.rstrip("/") + "/v1/traces"


@contextlib.contextmanager
def _current(span: Span) -> Iterator[Span]:
    """`span` current while the block runs, then ended; an exception marks it failed by its
    type only (an exception's message is not an attribute)."""
    try:
        with trace.use_span(span, end_on_exit=False, record_exception=False,
                            set_status_on_exception=False):
            yield span
    except BaseException as exc:
        if span.is_recording():
            span.set_attribute("error.type", type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR))
        raise
    finally:
        span.end()


def _exemplar(span: Span) -> Exemplar | None:
    context = span.get_span_context()
    if not context.trace_flags.sampled:
        return None
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


def _gen_ai(route: str, model: str) -> dict[str, str]:
    attributes = {"gen_ai.system": PROVIDER, "gen_ai.provider.name": PROVIDER,
                  "gen_ai.request.model": model[:64]}
    if route in routes.ENDPOINTS:
        attributes["gen_ai.operation.name"] = _OPERATIONS.get(route, "generate_content")
    return attributes


_TEMPLATES = {**{e: e for e in routes.ENDPOINTS}, routes.TASKS: "tasks/{task_id}"}


def _route_template(path: str) -> str | None:
    """`http.route`: the path's template under /api/v1/, ids left out; None when unknown."""
    template = _TEMPLATES.get(routes.route_of(path.removeprefix("/api/v1/")))
    return None if template is None else "/api/v1/" + template


def _usage(body: bytes, *, stream: bool) -> tuple[int, int] | None:
    """(input, output) tokens of a chat answer's `usage`, or of a stream's last event that has
    one; None when absent or not believable."""
    documents = [body]
    if stream:
        documents = [line[5:].strip() for line in reversed(body.split(b"\n"))
                     if line.startswith(b"data:") and b'"usage"' in line]
    for document in documents:
        try:
            data = orjson.loads(document)
        except orjson.JSONDecodeError:
            continue
        usage = data.get("usage") if isinstance(data, dict) else None
        if not isinstance(usage, dict):
            continue
        counts = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= _MAX_TOKENS
               for n in counts):
            return counts  # type: ignore[return-value]
        return None
    return None


def _resource(instance: str) -> Resource:
    """service.name `aio-gateway` unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES names
    it; this process's name as service.instance.id."""
    resource = Resource.create({"service.version": __version__, "service.instance.id": instance})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "aio-gateway"}))
    return resource


class _AsgiHeaders(Getter[Sequence[tuple[bytes, bytes]]]):
    def get(self, carrier: Sequence[tuple[bytes, bytes]], key: str) -> list[str] | None:
        name = key.encode()
        values = [v.decode("latin-1") for k, v in carrier if k == name]
        return values or None

    def keys(self, carrier: Sequence[tuple[bytes, bytes]]) -> list[str]:
        return [k.decode("latin-1") for k, _ in carrier]


_ASGI_HEADERS = _AsgiHeaders()


class _LinkedOrRatio(TraceIdRatioBased):
    """Roots: a batch span is sampled when a request it carries was; other roots by ratio."""

    def should_sample(self, parent_context: Context | None, trace_id: int, name: str,
                      kind: SpanKind | None = None, attributes: Any = None,
                      links: Sequence[Link] | None = None, trace_state: Any = None
                      ) -> SamplingResult:
        if name == BATCH_SPAN:
            sampled = any(link.context.trace_flags.sampled for link in links or ())
            return SamplingResult(Decision.RECORD_AND_SAMPLE if sampled else Decision.DROP,
                                  attributes)
        return super().should_sample(parent_context, trace_id, name, kind, attributes, links,
                                     trace_state)


class _Counted(SpanExporter):
    """The exporter, counting the spans of batches the collector never took."""

    def __init__(self, exporter: SpanExporter, *, on_failed: Callable[[int], None]) -> None:
        self._exporter = exporter
        self._on_failed = on_failed

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self._exporter.export(spans)
        if result is not SpanExportResult.SUCCESS:
            self._on_failed(len(spans))
        return result

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(self._exporter.force_flush(timeout_millis))


class _Batch(BatchSpanProcessor):
    """The SDK's batch processor, counting the spans its full queue drops (it drops the
    oldest when a span arrives to a full queue; the SDK only logs that)."""

    def __init__(self, exporter: SpanExporter, *, on_dropped: Callable[[], None],
                 **options: Any) -> None:
        super().__init__(exporter, **options)
        self._on_dropped = on_dropped
        self._capacity: int = options["max_queue_size"]

    def on_end(self, span: ReadableSpan) -> None:
        queue = getattr(self._batch_processor, "_queue", ())  # the SDK's own deque
        if span.context.trace_flags.sampled and len(queue) >= self._capacity:
            self._on_dropped()
        super().on_end(span)

