"""The upstream's HTTP/1.1 client: a pool of kept-alive connections, parsed by httptools.

httptools (llhttp, the parser uvicorn serves with) reads the answers; this module only pools,
frames and times. It is the gateway's upstream engine because it costs about a quarter of
aiohttp's client's CPU per request (README, "The upstream engine"): one write per request, no
per-request objects beyond the answer, no tracing hooks or cookie logic the gateway does not
use.

An answer gives its connection back as soon as its last byte is in (its body is kept in memory
until read); an answer abandoned before then, or whose reader is cancelled, closes its
connection instead: the pool never lends a half-read connection. A connection idle longer than
`keepalive_s` is closed rather than reused (servers drop idle connections, and a request sent on
one that is closing fails after it may have been received).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import zlib
from collections.abc import AsyncIterator
from typing import Any, cast

import httptools

Headers = list[tuple[bytes, bytes]]
MAX_HEAD_BYTES = 65536  # an answer's header lines, in all: more is a broken answer
HIGH_WATER = 262144  # a stream's unread bytes past which the connection stops reading
_NO_BODY_LENGTH = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # as aiohttp: no length of 0


class Broken(Exception):
    """No whole answer: `kind` says why: `connect` or `connect_timeout` (no connection was
    made, so the request was not sent), `timeout` (no byte for the read timeout) or `broken`
    (the connection failed or the answer was malformed)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind

    @property
    def unsent(self) -> bool:
        return self.kind in ("connect", "connect_timeout")


class Pool:
    """Up to `limit` connections to one origin. `wait_s` bounds the wait for a connection (a
    pooled one, or a new one), `connect_s` making a new one, `read_s` each wait for a byte."""

    def __init__(self, host: str, port: int, authority: str, *, tls: ssl.SSLContext | None,
                 limit: int, wait_s: float, connect_s: float, read_s: float,
                 keepalive_s: float = 15.0) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.authority = authority.encode("idna")  # the Host header
        self.limit, self.wait_s, self.connect_s, self.read_s = limit, wait_s, connect_s, read_s
        self.keepalive_s = keepalive_s
        self._idle: list[_Connection] = []
        self._made: set[_Connection] = set()  # every open connection, lent or idle
        self._open = 0  # connections open or being opened
        self.in_use = 0  # connections lent to a request
        self._waiters: collections.deque[asyncio.Future[_Connection | None]] = (
            collections.deque())
        self._closed = False
        # the loop the pool serves on, from its first request: asyncio.get_running_loop()
        # makes a system call (getpid) on Python 3.11, a pool's connections are the loop's
        self.loop: asyncio.AbstractEventLoop | None = None
        self._sweep: asyncio.TimerHandle | None = None  # the read timeout's, while any waits

    def head(self, method: str, target: str, headers: Headers, body: bytes) -> bytes:
        """The request line and header block, framed for `body` (one Host, one length)."""
        lines = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (method.encode(), target.encode("latin-1"),
                                                    self.authority)]
        lines += [b"%s: %s\r\n" % pair for pair in headers]
        if body or method not in _NO_BODY_LENGTH:
            lines.append(b"content-length: %d\r\n" % len(body))
        lines.append(b"\r\n")
        return b"".join(lines)

    async def request(self, method: str, head: bytes, body: bytes) -> Response:
        """Send a request (`head` from `head()`) and wait for its answer's status and headers;
        raises `Broken`. Cancelled at any point, the connection is closed, not lent again."""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        conn = self._pooled() or await self._connection()
        response = Response(conn, method)
        try:
            conn.send(response, head, body)
            await response._head
        except BaseException:
            conn.close()
            raise
        return response

    def _pooled(self) -> _Connection | None:
        idle, loop = self._idle, self.loop
        assert loop is not None
        while idle:
            conn = idle.pop()
            if conn.usable(loop.time() - self.keepalive_s):
                self.in_use += 1
                return conn
            conn.close()
        return None

    async def _connection(self) -> _Connection:
        if self._closed:
            raise Broken("connect")
        try:
            async with asyncio.timeout(self.wait_s):
                while True:
                    conn = self._pooled()
                    if conn is not None:
                        return conn
                    if self._open < self.limit:
                        return await self._connect()
                    assert self.loop is not None
                    waiter: asyncio.Future[_Connection | None] = self.loop.create_future()
                    self._waiters.append(waiter)
                    try:
                        conn = await waiter
                    except BaseException:
                        if waiter.done() and not waiter.cancelled():  # handed over, too late
                            given = waiter.result()
                            if given is not None:
                                self.in_use += 1
                                self.release(given)
                            else:
                                self._wake()
                        raise
                    if conn is not None and not conn.closed:  # (it may have closed since)
                        self.in_use += 1
                        return conn
        except TimeoutError:
            raise Broken("connect_timeout") from None

    async def _connect(self) -> _Connection:
        self._open += 1
        loop = self.loop
        assert loop is not None
        try:
            async with asyncio.timeout(self.connect_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self), self.host, self.port, ssl=self.tls,
                    server_hostname=self.host if self.tls is not None else None)
        except TimeoutError:
            self._gone()
            raise Broken("connect_timeout") from None
        except OSError:
            self._gone()
            raise Broken("connect") from None
        except BaseException:
            self._gone()
            raise
        self._made.add(conn)
        self.in_use += 1
        return conn

    def watch_reads(self) -> None:
        """Look for answers silent past `read_s` four times per `read_s` while any is awaited
        (a silent upstream is cut within 1.25x of it): one timer per pool, not one per
        connection (a held request costs its memory)."""
        if self._sweep is None and self.loop is not None:
            self._sweep = self.loop.call_later(self.read_s / 4, self._check_reads)

    def _check_reads(self) -> None:
        self._sweep = None
        assert self.loop is not None
        now, awaited = self.loop.time(), False
        for conn in list(self._made):
            response = conn.response
            if response is None:
                continue
            awaited = True
            if response._paused:  # it waits on its reader, not on the upstream
                conn.last_read = now
            elif now - conn.last_read >= self.read_s:
                response._fail(Broken("timeout"))
                conn.close()
        if awaited:
            self.watch_reads()

    def release(self, conn: _Connection) -> None:
        """A connection whose answer is complete: to the longest waiter, or kept idle."""
        self.in_use -= 1
        if self._closed:
            conn.close()
            return
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = conn.loop.time()
        self._idle.append(conn)

    def lost(self, conn: _Connection, lent: bool) -> None:
        """A connection closed (by either side)."""
        self._made.discard(conn)
        if lent:
            self.in_use -= 1
        elif conn in self._idle:
            self._idle.remove(conn)
        self._gone()

    def _gone(self) -> None:
        self._open -= 1
        self._wake()

    def _wake(self) -> None:
        """A connection may be made now: the longest waiter makes it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        """Close every connection, lent ones too (their answers break off)."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self._made):
            conn.close()


class _Connection(asyncio.Protocol):
    """One connection, one answer at a time; the parser's callbacks feed the answer."""

    __slots__ = ("closed", "idle_since", "last_read", "lent", "loop", "parser", "pool",
                 "response", "transport")

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        assert pool.loop is not None
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None  # the answer being received (lent)
        self.lent = True  # made for a request
        self.closed = False
        self.idle_since = 0.0
        self.last_read = 0.0  # when the answer's last byte came (or the request left)

    def usable(self, fresh_since: float) -> bool:
        transport = self.transport
        return (not self.closed and transport is not None and not transport.is_closing()
                and self.idle_since >= fresh_since)

    def send(self, response: Response, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        self.response, self.lent = response, True
        self.last_read = self.loop.time()
        self.pool.watch_reads()
        # request bodies are bounded (`listen.max_body_bytes`): the transport buffers one whole
        self.transport.write(head + body if len(body) < 65536 else b"".join((head, body)))

    def close(self) -> None:
        """Close now: the pool counts it gone at once, and an unfinished answer is broken."""
        self._shut()
        if self.transport is not None:
            self.transport.abort()

    def _shut(self) -> None:
        if self.closed:
            return
        self.closed = True
        response, self.response = self.response, None
        lent, self.lent = self.lent, False
        if response is not None:
            response._lost()
        self.pool.lost(self, lent)

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # bytes nobody asked for: the connection is out of step
            self.close()
            return
        self.last_read = self.loop.time()
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            response._fail(Broken("broken"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._shut()

    # -- the parser's callbacks ----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        response = self.response
        if response is None:  # a second answer to one request: the connection is out of step
            raise httptools.HttpParserError("an answer nobody asked for")
        response._head_bytes += len(name) + len(value)
        if response._head_bytes > MAX_HEAD_BYTES:
            raise httptools.HttpParserError("the answer's head is too large")
        response.headers.append((name, value))

    def on_headers_complete(self) -> None:
        response = self.response
        if response is None:
            raise httptools.HttpParserError("an answer nobody asked for")
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (103 Early Hints): the real one follows
            response.headers = []
            return
        response._started(status)
        if response.method == "HEAD":  # no body follows, whatever its length says
            keep_alive = self.parser.should_keep_alive()
            self.parser = httptools.HttpResponseParser(self)
            self._complete(response, keep_alive)

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is not None:
            response._data(body)

    def on_message_complete(self) -> None:
        response = self.response
        if response is not None and response.status_code >= 200:
            self._complete(response, self.parser.should_keep_alive())

    def _complete(self, response: Response, keep_alive: bool) -> None:
        self.response = None
        response._done()
        transport = self.transport
        # answered before the whole request was sent (an early error): the rest would be read
        # as the next request, so the connection is not lent again
        if (keep_alive and not self.closed and transport is not None
                and not transport.get_write_buffer_size()):
            self.lent = False
            self.pool.release(self)
        else:
            self.close()


class Response:
    """An upstream answer: status and headers (as received) at once, the body read whole
    (`aread`, then `content`) or as it comes (`aiter_bytes`, then `aclose`). Bodies sent with
    gzip or deflate are decoded (the gateway asks for no other coding)."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_decoder",
        "_ended",
        "_error",
        "_head",
        "_head_bytes",
        "_paused",
        "_until_close",
        "_waiter",
        "_whole",
        "content",
        "headers",
        "method",
        "status_code",
    )

    def __init__(self, conn: _Connection, method: str) -> None:
        self._conn: _Connection | None = conn
        self.method = method
        self.status_code = 0
        self.headers: Headers = []
        self.content = b""
        self._head: asyncio.Future[None] = conn.loop.create_future()
        self._head_bytes = 0
        self._chunks: list[bytes] = []  # (a deque costs 600 bytes even empty)
        self._buffered = 0
        self._paused = False
        self._whole = False  # read by `aread`: the connection never pauses
        self._ended = False
        self._error: Broken | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._decoder: Any = None
        self._until_close = False  # no length and not chunked: the body ends with the connection

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (`name` in lower case)."""
        return next((v for k, v in self.headers if k.lower() == name), None)

    async def aread(self) -> bytes:
        """The whole body; raises `Broken` when it breaks off (the connection is then closed)."""
        self._whole = True
        if self._paused:
            self._resume()
        try:
            while not self._ended:
                await self._more()
        except BaseException:
            self._abandon()
            raise
        self.content = self._decoded(b"".join(self._chunks), final=True)
        self._chunks.clear()
        return self.content

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body's chunks as they arrive (decoded, when the upstream compressed it)."""
        return _Chunks(self)

    async def aclose(self) -> None:
        """Done with the answer: a body not read to its end closes the connection."""
        self._abandon()

    def _abandon(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not self._ended:
            conn.close()

    def _more(self) -> asyncio.Future[None]:
        """What to await for more of the answer: a future, not a coroutine (whose frame a held
        stream would keep, 0.2 KB); the caller looks again at what came, or at the error."""
        if self._error is not None:
            raise self._error
        waiter = self._waiter = self._head.get_loop().create_future()
        return waiter

    def _decoded(self, data: bytes, *, final: bool) -> bytes:
        decoder = self._decoder
        if decoder is None:
            return data
        try:
            out: bytes = decoder.decompress(data)
            if final:
                out += decoder.flush()
        except zlib.error:
            raise Broken("broken") from None
        return out

    # -- fed by the connection -----------------------------------------------------------------

    def _started(self, status: int) -> None:
        self.status_code = status
        framed = False
        for name, value in self.headers:
            if len(name) == 16 and name.lower() == b"content-encoding":
                self._decoder = _decoder(value)
            elif len(name) in (14, 17) and name.lower() in (b"content-length",
                                                           b"transfer-encoding"):
                framed = True
        self._until_close = not framed and status not in (204, 304)
        if not self._head.done():
            self._head.set_result(None)

    def _data(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._whole and not self._paused:
            conn = self._conn
            if conn is not None and conn.transport is not None:
                self._paused = True
                conn.transport.pause_reading()
        self._wake()

    def _resume(self) -> None:
        self._paused = False
        conn = self._conn
        if conn is not None and conn.transport is not None and not conn.closed:
            conn.transport.resume_reading()

    def _done(self) -> None:
        self._ended = True
        self._conn = None
        self._wake()

    def _fail(self, error: Broken) -> None:
        if self._error is None and not self._ended:
            self._error = error
        if not self._head.done():
            self._head.set_exception(error)
        self._wake()

    def _lost(self) -> None:
        """The connection closed before the answer was complete."""
        if self._until_close and self._head.done() and self._error is None:
            self._done()  # a body delimited by the end of the connection
        else:
            self._fail(Broken("broken"))

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Chunks:
    """`Response.aiter_bytes`: an iterator object rather than an async generator, which asyncio
    keeps in a weak set, with its frame, for as long as a stream lasts (0.3 KB of each)."""

    __slots__ = ("_flushed", "_response", "_taken")

    def __init__(self, response: Response) -> None:
        self._response = response
        self._taken: list[bytes] = []  # come, not yet given: in reverse order
        self._flushed = False

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        response = self._response
        try:
            while True:
                if self._taken:
                    decoded = response._decoded(self._taken.pop(), final=False)
                    if decoded:
                        return decoded
                elif response._chunks:  # all that came, at once: the connection reads on
                    # swapped: the emptied list takes the next chunks (no list made for each)
                    self._taken, response._chunks = response._chunks, self._taken
                    self._taken.reverse()
                    response._buffered = 0
                    if response._paused:
                        response._resume()
                elif response._ended:
                    if self._flushed:
                        raise StopAsyncIteration
                    self._flushed = True
                    tail = response._decoded(b"", final=True)
                    if tail:
                        return tail
                else:
                    await response._more()
        except BaseException:  # the end too: an answer read to its end keeps its connection
            response._abandon()
            raise


def _decoder(coding: bytes) -> Any:
    coding = coding.strip().lower()
    if coding in (b"gzip", b"x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if coding == b"deflate":
        return zlib.decompressobj(32 + zlib.MAX_WBITS)  # zlib-wrapped (or gzip) as sent
    return None
