"""Every concurrent store call over one Redis connection.

Redis answers a connection's commands in order, so calls need no connection each: each one
queues its command and takes the next reply. This replaces redis-py's per-call checkout, retry
wrapper and response parsing on the hot path (a third of a cache hit's CPU in the profile) with
one future, and the commands queued in one turn of the event loop leave in one write (a write
per call was a fifth of a cache hit's CPU); the connection itself (TLS, unix sockets, AUTH,
SELECT) is still made by redis-py. One timer per connection enforces the store's timeout: when
the oldest call is overdue, every later one is stuck behind it, so the connection is dropped and
every call on it fails (it may have run); the next call connects afresh. A connection the server
closed is noticed when it closes, so a restarted Redis costs no request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
from redis.asyncio.connection import AbstractConnection

from .base import ScriptFailed, StoreError

# Error replies that say the store cannot serve now, not that the script is wrong. Each refuses
# the command before it writes anything (a script meets them at its first write at the latest).
_TRANSIENT = ("BUSY", "LOADING", "MASTERDOWN", "NOREPLICAS", "OOM", "READONLY", "TRYAGAIN",
              "CLUSTERDOWN", "MOVED", "ASK", "NOSCRIPT")

_LAST_LOOK_S = 0.001  # an overdue call's reply is looked for once more, this much later


def reply_error(message: str) -> StoreError | ScriptFailed:
    """What an error reply means: the store is not serving now (and the command changed
    nothing: there is nothing to undo), or the script failed."""
    if message.startswith(_TRANSIENT):
        return StoreError(f"redis: {message.split(' ', 1)[0]}", maybe_ran=False)
    return ScriptFailed(f"redis: {message}")


class _Link(asyncio.Protocol):
    """One open connection and the calls waiting for its replies, oldest first.

    Once redis-py has opened the connection (and said AUTH and SELECT), the link takes its
    transport over as its protocol: replies are parsed as they arrive, with no reader task to
    wake, and the commands of every call made in one turn of the event loop go out in one
    write (Redis reads them in one read), as a client's automatic pipelining does.
    """

    def __init__(self, connection: AbstractConnection, timeout_s: float) -> None:
        self.connection = connection
        reader, writer = connection._reader, connection._writer
        assert reader is not None and writer is not None
        self._transport: asyncio.WriteTransport = writer.transport
        self._timeout_s = timeout_s
        self._loop = asyncio.get_running_loop()
        self._parser = hiredis.Reader()
        self._waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._outgoing: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._overdue: asyncio.Future[Any] | None = None  # the call found overdue, if any
        self.failed: StoreError | None = None
        self.closed = self._loop.create_future()
        self._transport.set_protocol(self)
        leftover = bytes(getattr(reader, "_buffer", b""))  # nothing, after AUTH and SELECT
        if leftover:
            self.data_received(leftover)

    @property
    def usable(self) -> bool:
        return self.failed is None and not self._transport.is_closing()

    def send(self, packed: bytes, replies: int) -> list[asyncio.Future[Any]]:
        """Queue commands (packed) for the next write; a future for each reply."""
        deadline = self._loop.time() + self._timeout_s
        futures = [self._loop.create_future() for _ in range(replies)]
        self._waiting.extend((future, deadline) for future in futures)
        self._queue(packed, deadline)
        return futures

    def send_one(self, packed: bytes) -> asyncio.Future[Any]:
        """`send` for one command: a store call is most often one script."""
        deadline = self._loop.time() + self._timeout_s
        future = self._loop.create_future()
        self._waiting.append((future, deadline))
        self._queue(packed, deadline)
        return future

    def _queue(self, packed: bytes, deadline: float) -> None:
        if not self._outgoing:
            self._loop.call_soon(self._flush)
        self._outgoing.append(packed)
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._check)

    def _flush(self) -> None:
        outgoing, self._outgoing = self._outgoing, []
        if self.failed is None:
            self._transport.write(b"".join(outgoing))

    def data_received(self, data: bytes) -> None:
        parser, waiting = self._parser, self._waiting
        try:
            parser.feed(data)
            while (reply := parser.gets()) is not False:
                future = waiting.popleft()[0]
                if not future.done():  # its caller may have been cancelled
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError):
            self.fail("redis: ConnectionError")

    def eof_received(self) -> bool:
        self.fail("redis: ConnectionError")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail("redis: ConnectionError")
        if not self.closed.done():
            self.closed.set_result(None)

    def _check(self) -> None:
        self._timer = None
        if not self._waiting:
            return
        oldest, deadline = self._waiting[0]
        if deadline > self._loop.time():
            self._timer = self._loop.call_at(deadline, self._check)
        elif oldest is not self._overdue:
            # A loop busy past the deadline runs its timers before it reads the sockets that
            # became readable meanwhile: the reply may be waiting unread. One more look, after
            # the loop has polled its sockets once, before the call is failed.
            self._overdue = oldest
            self._timer = self._loop.call_at(self._loop.time() + _LAST_LOOK_S, self._check)
        else:
            self.fail("redis: TimeoutError")

    def fail(self, message: str) -> None:
        """Drop the connection: every call still waiting fails (its command may have run)."""
        if self.failed is not None:
            return
        self.failed = StoreError(message, maybe_ran=True)
        if self._timer is not None:
            self._timer.cancel()
        while self._waiting:
            future = self._waiting.popleft()[0]
            if not future.done():
                future.set_exception(StoreError(message, maybe_ran=True))
        self._transport.abort()
        self.connection._close()  # type: ignore[no-untyped-call]  # forget the streams too


def _demoted(link: _Link, reply: hiredis.ReplyError) -> None:
    """A READONLY reply: the server was demoted to a replica (a failover). The link is
    dropped, so the next call connects to whichever server is the master now (through
    Sentinel), as redis-py would."""
    if str(reply).startswith("READONLY"):
        link.fail("redis: ReadOnlyError")


class Multiplexed:
    """Commands to one Redis server, over one connection shared by every caller."""

    def __init__(self, make_connection: Callable[[], AbstractConnection], *,
                 timeout_s: float) -> None:
        self._make_connection = make_connection  # redis-py's: TLS, AUTH and SELECT as it does
        self._timeout_s = timeout_s
        self._link: _Link | None = None
        self._connecting = asyncio.Lock()

    async def _open(self) -> _Link:
        link = self._link
        if link is not None and link.usable:
            return link
        async with self._connecting:
            link = self._link
            if link is not None and link.usable:
                return link
            connection = self._make_connection()
            try:
                await connection.connect()  # type: ignore[no-untyped-call]
            except Exception as exc:  # nothing of ours was sent on it: say so
                with contextlib.suppress(Exception):
                    await connection.disconnect(nowait=True)
                raise StoreError(f"redis: {type(exc).__name__}", maybe_ran=False) from None
            self._link = _Link(connection, self._timeout_s)
            return self._link

    async def execute(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Each command's reply, in order (an error reply as a `hiredis.ReplyError` in its
        place); raises `StoreError` when the connection fails or the store does not answer."""
        link = await self._open()
        futures = link.send(b"".join(hiredis.pack_command(tuple(c)) for c in commands),
                            len(commands))
        try:
            replies = [await future for future in futures]
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise
        for reply in replies:
            if reply.__class__ is hiredis.ReplyError:
                _demoted(link, reply)
        return replies

    async def call(self, command: tuple[Any, ...]) -> Any:
        """`execute` for one command, without its lists: the request path's store call."""
        link = self._link
        if link is None or not link.usable:
            link = await self._open()
        future = link.send_one(hiredis.pack_command(command))
        try:
            reply = await future
        except asyncio.CancelledError:
            future.cancel()
            raise
        if reply.__class__ is hiredis.ReplyError:
            _demoted(link, reply)
        return reply

    async def close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.fail("redis: closed")
            await asyncio.wait([link.closed], timeout=self._timeout_s)
