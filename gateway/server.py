"""Running the gateway under uvicorn.

`HttpProtocol`: requests the HTTP parser cannot read (an unknown method token, CR/LF in a header)
never reach the ASGI app; uvicorn answers them itself in plain text, and with httptools it
accepts a URL and headers of any size, and waits for a request head as long as the client
likes (its keep-alive timeout only starts after an answer, and the first byte of a request
stops it): a client that sends its head a byte at a time (slow loris) holds a connection
forever. This subclass keeps uvicorn's behaviour, caps the head at `MAX_HEAD_BYTES` (as nginx's
large_client_header_buffers does), bounds the time a head may take (`head_timeout_s`, counted
from the connection or the previous answer, as nginx's client_header_timeout) and answers in
the error shape: 400 or 431, 408 for a head cut off mid-way (a connection that sent nothing is
closed silently: an unasked-for 408 would be read by a pooling client as the answer to its
next request).

WebSockets are off (`ws="none"`): the gateway serves none, and uvicorn, with a WebSocket
library installed, would otherwise take any `Upgrade: websocket` and refuse it with a bodiless
403; the request is now an ordinary one (the hop-by-hop `Upgrade` is not forwarded).

The ASGI extension `gateway.disconnect` (in every request's scope): the connection's loss is
reported to the app that asked (asgi.DisconnectWatch, a stream's relay), where under another
server a task must wait on `receive` for it.

`Server`: on SIGTERM uvicorn stops accepting, lets in-flight requests finish (up to the grace
period) and runs the app's shutdown, which settles their charges; it then raises the signal
again, so the process would end with status 143. A gateway that finished its work exits 0.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import Multiprocess

from .asgi import DISCONNECT_EXTENSION, new_request_id
from .errors import error_body
from .sweep import Sweep, sweep_of

APP = "gateway.app:create_app_from_env"

MAX_HEAD_BYTES = 32 * 1024
HEAD_TIMEOUT_S = 10.0
_ADDRESSES: dict[Any, Any] = {}  # the addresses the servers listen on, each kept once


class Config(uvicorn.Config):
    """uvicorn's config, and how long a request head may take to arrive."""

    def __init__(self, app: Any, *, head_timeout_s: float = HEAD_TIMEOUT_S, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.head_timeout_s = head_timeout_s


class HttpProtocol(HttpToolsProtocol):
    # One attribute of its own per connection: uvicorn's protocol sets 28, and an instance with
    # 30 (past CPython's limit for sharing its class's table of attribute names) gets a
    # dictionary of its own, 1.5 KB more for every open connection (measured with tracemalloc).
    _head_bytes = -1  # of the head being read; -1 until a head begins
    _head_too_large = False  # set only when refusing one

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.pipeline = _Pipeline()  # type: ignore[assignment]

    @property
    def _watch(self) -> Sweep:
        """The loop's connections waiting for a request head (a timer of its own per connection
        would be held as long as the connection is, a request's included), looked over 4 times
        per timeout (the shortest of the loop's servers): a head is cut within 1.25x of it."""
        return sweep_of(self.loop, "heads", self._head_timeout_s / 4)

    @property
    def _head_timeout_s(self) -> float:
        config = self.config
        return config.head_timeout_s if isinstance(config, Config) else HEAD_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_Coalesced(transport, self.loop))  # type: ignore[arg-type]
        # one copy of the server's address, and of a client's host, for all their connections
        # (uvicorn makes them anew for each: 0.2 KB of every held request)
        self.server = _ADDRESSES.setdefault(self.server, self.server)
        if self.client is not None:
            self.client = (sys.intern(self.client[0]), self.client[1])
        _lean(self.flow._is_writable_event)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._watch.stop(self)
        super().connection_lost(exc)
        _disconnects.lost(self.transport)

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)  # its head has arrived already
        super().on_response_complete()
        if not pipelined and not self.transport.is_closing():
            self._await_head()

    def _await_head(self) -> None:
        self._head_bytes = -1
        self._watch.wait(self, self.loop.time() + self._head_timeout_s)

    def overdue(self) -> None:
        """The head did not arrive in time: a 408 if it had begun, else a silent close."""
        if self.transport.is_closing():
            return
        if self._head_bytes >= 0:
            self._refuse(408, b"Request Timeout", "The request's head did not arrive within "
                         f"{self._head_timeout_s:g} seconds.")
        else:
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self.scope["extensions"] = _EXTENSIONS

    def on_headers_complete(self) -> None:
        self._watch.stop(self)
        super().on_headers_complete()
        _lean(self.cycle.message_event)  # its task has not run yet: nothing waits on it

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            self._head_too_large = True
            raise httptools.HttpParserError("request head too large")

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:
            self._refuse(431, b"Request Header Fields Too Large",
                         f"The request's URL and headers exceed {MAX_HEAD_BYTES} bytes.")
        else:
            self._refuse(400, b"Bad Request",
                         "The request is not valid HTTP (method, URL or headers).")

    def _refuse(self, status: int, reason: bytes, message: str) -> None:
        """Answer in the error shape and close: what follows on the connection is unreadable."""
        self._watch.stop(self)
        body = error_body(status, message, "invalid_request")
        head = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: ", str(len(body)).encode(), b"\r\n",
            b"x-request-id: ", new_request_id().encode(), b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(head))
        self.transport.close()


class _Disconnects:
    """The ASGI extension `gateway.disconnect` (asgi.DisconnectWatch): what to call when the
    connection of a watched request is lost, kept by connection rather than by a task waiting
    on each request's `receive`."""

    def __init__(self) -> None:
        self._watching: dict[Any, Callable[[], None]] = {}  # by the connection's transport

    def watch(self, receive: Any, callback: Callable[[], None]) -> bool:
        """False when the client has gone already (its `receive` answers at once)."""
        transport = receive.__self__.transport  # uvicorn's request cycle's
        if transport.is_closing():
            return False
        self._watching[transport] = callback
        return True

    def unwatch(self, receive: Any) -> None:
        self._watching.pop(receive.__self__.transport, None)

    def lost(self, transport: Any) -> None:
        callback = self._watching.pop(transport, None)
        if callback is not None:
            callback()


_disconnects = _Disconnects()
# every scope shares it (apps read extensions, never change them)
_EXTENSIONS: dict[str, dict[object, object]] = {
    DISCONNECT_EXTENSION: {"watch": _disconnects.watch, "unwatch": _disconnects.unwatch}}


# uvicorn keeps three deques for every connection (the pipeline, and the waiters of two
# asyncio.Events: the flow control's and the request's), empty nearly always, and an empty deque
# takes 0.77 KB (a block of 64 slots): 2.3 KB of each held request's 22 (bench/SCALE.md). Lists
# do the same work in 0.06 KB; a connection rarely has more than one waiter or pipelined request.


class _Pipeline(list[Any]):
    """The deque operations uvicorn's protocol uses on its pipeline, on a list."""

    __slots__ = ()

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)


def _lean(event: asyncio.Event) -> None:
    """The event's waiters in a list: asyncio.Event appends to, removes from and iterates them."""
    assert not event._waiters
    event._waiters = []  # type: ignore[assignment]


class _Coalesced:
    """A connection's transport whose writes in one turn of the event loop leave as one.

    uvicorn writes an answer's head and its body as they are sent (two ASGI messages), each a
    system call and a TCP segment of its own; here they go out together at the end of the turn
    (at once past `_FLUSH_BYTES`, and before a close). Everything else is the transport's.
    """

    __slots__ = ("_loop", "_pending", "_size", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)
        self._size += len(data)
        if self._size > _FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._size = 0
            if not self._transport.is_closing():  # the client may have gone meanwhile
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


_FLUSH_BYTES = 64 * 1024


class Server(uvicorn.Server):
    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def serve(*, host: str, port: int, workers: int, grace_s: float, head_timeout_s: float) -> int:
    """Serve until SIGTERM or SIGINT; the exit status is 0 after a graceful shutdown."""
    config = Config(
        APP, factory=True, host=host, port=port, workers=workers, loop="uvloop",
        http=HttpProtocol, ws="none", log_config=None, access_log=False, server_header=False,
        proxy_headers=False,  # the gateway reads neither the client's address nor its scheme
        timeout_graceful_shutdown=int(grace_s), head_timeout_s=head_timeout_s,
    )
    if workers > 1:
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return 0
    server = Server(config)
    server.run()
    return 0 if server.started else 3
