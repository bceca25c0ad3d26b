"""Forwarding: one upstream call within its deadline, or a stream relayed to the client.

The deadline (`ParsedRequest.deadline_s`) covers the whole call: the wait for an upstream slot
(`fairness.Passage`), every attempt and its backoff, and reading the body. It ends before the
locks the request holds expire (`Policy.hold_ms`), so no second leader can start while the
first is still running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .asgi import DisconnectWatch, Headers, Message, Receive, Reply, head_length
from .errors import UpstreamUnavailable
from .fairness import Passage, busy
from .http1 import Broken, Response
from .request import ParsedRequest, upstream_headers
from .runtime import Runtime
from .settlement import End
from .store import StoreError
from .sweep import Deadline
from .tracing import upstream_call
from .upstream import response_headers, unavailable

log = logging.getLogger("gateway")
TAIL_BYTES = 65536  # what a stream keeps of its end: the last events carry the credits


class Upstreamed:
    """What the upstream call did, for the access log and the metrics."""

    __slots__ = ("account", "seconds", "status")

    def __init__(self) -> None:
        self.status: str | None = None  # the upstream's status, or `error`
        self.seconds: float | None = None
        self.account: str | None = None  # the upstream account it went through


@dataclass(slots=True)
class Streamed:
    """How a streamed request ended."""

    end: End  # STREAM, CUT, or ANSWER (a non-2xx answer, read whole and not yet sent)
    status: int
    headers: Headers
    tail: bytes  # the last bytes of the stream, or the whole non-2xx answer
    recorded: bytes | None  # the whole stream, for an Idempotency-Key (None: too large, or
    # not asked for)
    client_gone: bool = False


@upstream_call
async def fetch(rt: Runtime, req: ParsedRequest, seen: Upstreamed, *,
                passage: Passage) -> Reply:
    """The upstream's whole answer; raises `UpstreamUnavailable` when none came in time."""
    try:
        loop = rt.loop or asyncio.get_running_loop()
        with Deadline(loop, loop.time() + req.deadline_s):
            response = await _send(rt, req, seen, passage, stream=False)
            return Reply(response.status_code, answer_headers(response), response.content)
    except TimeoutError:
        raise UpstreamUnavailable("The upstream API did not answer in time.", status=504) from None


@upstream_call
async def relay(rt: Runtime, req: ParsedRequest, seen: Upstreamed, receive: Receive,
                send: Callable[[Message], Awaitable[None]], start: Callable[[Reply], Headers], *,
                passage: Passage, record_limit: int) -> Streamed:
    """Relay a 2xx event stream to the client as it comes; `start` decorates its head, and up to
    `record_limit` bytes of it are kept (0: none). Raises `UpstreamUnavailable` when no answer
    began in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + req.deadline_s
    try:
        with Deadline(loop, deadline):
            response = await _send(rt, req, seen, passage, stream=True)
            if not 200 <= response.status_code < 300:
                try:
                    await response.aread()
                except Broken as exc:
                    raise unavailable(exc) from None
                return Streamed(End.ANSWER, response.status_code, answer_headers(response),
                                response.content, response.content)
    except TimeoutError:
        raise UpstreamUnavailable("The upstream API did not answer in time.", status=504) from None
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": start(Reply(response.status_code, answer_headers(response)))})
    chunks: list[bytes] | None = [] if record_limit > 0 else None
    recorded = 0
    tail = _Tail()
    complete = False
    watch: DisconnectWatch | None = None
    try:
        with Deadline(loop, deadline) as scope:
            # a client that leaves ends the relay at once, even while the upstream is silent
            watch = DisconnectWatch(receive, scope.expire)
            try:
                async for chunk in response.aiter_bytes():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    tail.add(chunk)
                    if chunks is not None:
                        recorded += len(chunk)
                        if recorded <= record_limit:
                            chunks.append(chunk)
                        else:
                            chunks = None
                complete = True
            finally:
                watch.stop()
    except (Broken, TimeoutError) as exc:
        if watch is None or not watch.gone:
            log.warning("upstream stream broke off", extra={"fields": {
                "request_id": req.request_id, "error": type(exc).__name__}})
    finally:
        await response.aclose()
    client_gone = watch is not None and watch.gone
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    # the headers made again rather than held all along the stream
    return Streamed(End.STREAM if complete else End.CUT, response.status_code,
                    answer_headers(response),
                    bytes(tail), b"".join(chunks) if chunks is not None else None,
                    client_gone)


class _Tail(list[bytes]):
    """What a stream keeps of its end: at least its last TAIL_BYTES, its chunks joined 8 at a
    time (a bytes object for each chunk took twice the data, one growing bytearray a fifth
    more: bench/SCALE.md)."""

    __slots__ = ("_loose", "_size")

    def __init__(self) -> None:
        super().__init__()
        self._loose = 0  # chunks at the end not joined yet
        self._size = 0  # of the joined pieces before them

    def add(self, chunk: bytes) -> None:
        self.append(chunk)
        self._loose += 1
        if self._loose == _JOINED:
            piece = b"".join(self[-_JOINED:])
            self[-_JOINED:] = [piece]
            self._loose = 0
            self._size += len(piece)
            while self._size - len(self[0]) >= TAIL_BYTES:
                self._size -= len(self.pop(0))

    def __bytes__(self) -> bytes:
        return b"".join(self)


_JOINED = 8


async def _send(rt: Runtime, req: ParsedRequest, seen: Upstreamed, passage: Passage,
                *, stream: bool) -> Response:
    """Through the account whose slot the request holds; an account that refuses its key or
    has no credits (401/402) leaves the rotation, and the request moves to another."""
    account = await passage.take()
    forwarded = upstream_headers(req)
    while True:
        seen.account = account
        started = time.perf_counter()
        try:
            headers = forwarded if rt.tracing is None else rt.tracing.inject(forwarded)
            response = await rt.upstream.send(req.method, req.path, req.query, headers,
                                              req.body, stream=stream, account=account,
                                              before_retry=_retry_slot(rt, account))
        except UpstreamUnavailable:
            _seen(rt, req, seen, "error", started)
            raise
        _seen(rt, req, seen, str(response.status_code), started)
        status = response.status_code
        if status not in (401, 402):
            await passage.recovered()
            return response
        await response.aclose()
        log.error("upstream refused the organisation's key or account",
                  extra={"fields": {"upstream_status": status, "account": account,
                                    "request_id": req.request_id}})
        moved = await passage.refused(account, status)
        if moved is None:
            raise UpstreamUnavailable(
                "The gateway's upstream account needs attention (operators have been alerted). "
                "This request was not charged.",
                status=502 if status == 401 else 503,
            )
        account = moved


def _retry_slot(rt: Runtime, account: str) -> Callable[[], Awaitable[None]]:
    async def book() -> None:
        if rt.tracing is not None:
            rt.tracing.retrying()
        try:
            wait = await rt.upstream_slot(account)
        except StoreError:
            return  # the first attempt had its slot; a retry does not fail on the store
        if wait is not None:
            raise busy(wait)

    return book


def _seen(rt: Runtime, req: ParsedRequest, seen: Upstreamed, status: str, started: float) -> None:
    seconds = time.perf_counter() - started
    seen.status, seen.seconds = status, seconds
    rt.metrics.upstream_requests.labels(req.route, status).inc()
    exemplar = None if rt.tracing is None else rt.tracing.upstream_answered(status)
    rt.metrics.upstream_duration.labels(req.route).observe(seconds, exemplar)
    if seen.account is not None:
        rt.metrics.upstream_account_requests.labels(seen.account, status).inc()


def answer_headers(response: Response) -> Headers:
    """The upstream's headers a client may see; `Retry-After` only where it means something,
    and for a HEAD the length its GET would have had."""
    status = response.status_code
    headers = [(k, v) for k, v in response_headers(response.headers)
               if k != b"retry-after" or status in (429, 503)]
    if status == 429 and not any(k == b"retry-after" for k, _ in headers):
        headers.append((b"retry-after", b"1"))  # the contract promises one on every 429
    if response.method == "HEAD":
        headers += head_length(status, response.headers)
    return headers
