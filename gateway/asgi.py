"""Small ASGI helpers for the proxy hot path (no framework objects per request)."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ClientDisconnected as ClientDisconnected  # raised by read_body
from .errors import GatewayError, RequestTimeout, RequestTooLarge

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class Reply:
    """A complete answer: what the proxy sends, caches and replays."""

    status: int
    headers: Headers = field(default_factory=list)
    body: bytes = b""


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body, at most `limit` bytes.

    A client that goes away mid-body: uvicorn (httptools) notices the closed connection and
    answers the next `receive()` with `http.disconnect`, whatever part of the body it had. That
    raises `ClientDisconnected`, a `GatewayError` (499), so that whoever answers errors counts
    it as the client's doing, not as a defect of the gateway.
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"The request body is larger than {limit} bytes.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def with_body_timeout(receive: Receive, idle_s: float) -> Receive:
    """`receive` for one request, bounded while its body arrives: `RequestTimeout` (408, and
    the connection closes) when no part of it comes for `idle_s` (as nginx's
    client_body_timeout); once the body is whole, unbounded (the proxy then waits on it for the
    client's disconnect, for as long as a stream lasts).

    A small body has usually arrived with the head: uvicorn's `receive` is its request cycle's
    method, whose `more_body` is False then, and there is nothing to bound (a timer per
    request was 4% of a cache hit's CPU). Under another server, the timer always runs."""
    if getattr(getattr(receive, "__self__", None), "more_body", None) is False:
        return receive
    whole = False

    async def receive_body() -> Message:
        nonlocal whole
        if whole:
            return await receive()
        try:
            async with asyncio.timeout(idle_s):
                message = await receive()
        except TimeoutError:
            raise RequestTimeout(
                f"No part of the request body arrived for {idle_s:g} seconds.") from None
        whole = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return receive_body


async def send_reply(send: Send, reply: Reply, *, head: bool = False) -> None:
    """Send a whole answer, framed by `Content-Length`, except where HTTP says otherwise
    (RFC 9110, 8.6 and 9.3.2): none on a 1xx, 204 or 304; on an answer to HEAD (`head`) that
    has no body, only the length the reply carries (`head_length`: the upstream's), as a
    gateway-made answer to HEAD keeps its body's length, the one its GET would have had."""
    headers = reply.headers
    bodiless = reply.status < 200 or reply.status in (204, 304) or (head and not reply.body)
    if not bodiless:
        headers = [*headers, (b"content-length", str(len(reply.body)).encode())]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


_LENGTH = re.compile(rb"[0-9]{1,18}")


def head_length(status: int, upstream: Headers) -> Headers:
    """The `Content-Length` of the upstream's answer to a HEAD, the length its GET would have
    had, when it is a plain number for a status that has a body, and that body was not
    content-encoded (the gateway's GET decodes it, so its length would differ); else none."""
    if status < 200 or status in (204, 304):
        return []
    lengths = [v for k, v in upstream if k.lower() == b"content-length"]
    if len(lengths) != 1 or not _LENGTH.fullmatch(lengths[0].strip()) or any(
            k.lower() == b"content-encoding" for k, _ in upstream):
        return []
    return [(b"content-length", lengths[0].strip())]


def error_reply(exc: GatewayError) -> Reply:
    headers = [(b"content-type", b"application/json")]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    return Reply(exc.status, headers, exc.body())


async def wait_disconnect(receive: Receive) -> None:
    """Returns when the client disconnects (call once the request body has been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


DISCONNECT_EXTENSION = "gateway.disconnect"


class DisconnectWatch:
    """Calls `on_gone` once if the client disconnects before `stop()` (start it once the request
    body has been read). A server with the ASGI extension `gateway.disconnect` (server.py) calls
    it when the connection is lost; under another, a task waits on `receive` (the task, its
    coroutines and futures: 1.3 KB more for each held stream, bench/SCALE.md)."""

    __slots__ = ("_on_gone", "_receive", "_server", "_task", "gone")

    def __init__(self, receive: Receive, on_gone: Callable[[], None]) -> None:
        self.gone = False
        self._on_gone, self._receive = on_gone, receive
        self._task: asyncio.Future[None] | None = None
        # uvicorn's `receive` is its request cycle's bound method, which keeps the scope
        scope = getattr(getattr(receive, "__self__", None), "scope", None)
        extensions = scope.get("extensions") if isinstance(scope, dict) else None
        self._server: dict[str, Any] | None = (
            extensions.get(DISCONNECT_EXTENSION) if extensions else None)
        if self._server is None or not self._server["watch"](receive, self._went):
            self._server = None
            self._task = asyncio.ensure_future(wait_disconnect(receive))
            self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Future[None]) -> None:
        if not task.cancelled():
            self._went()

    def _went(self) -> None:
        self.gone = True
        self._on_gone()

    def stop(self) -> None:
        if self._server is not None:
            self._server["unwatch"](self._receive)
        elif self._task is not None:
            self._task.remove_done_callback(self._ended)
            self._task.cancel()


def request_id_of(headers: Headers) -> str:
    """The client's X-Request-ID when it is sane (visible ASCII, up to 128), else a new one."""
    for name, value in headers:
        if name == b"x-request-id":
            if 0 < len(value) <= 128 and all(0x21 <= c <= 0x7E for c in value):
                return value.decode()
            break
    return new_request_id()


def new_request_id() -> str:
    """128 random bits in hex: unique, not secret, so Python's generator (reseeded in each
    forked worker) rather than a system call per request (`os.urandom`)."""
    return f"{random.getrandbits(128):032x}"


class RequestIdMiddleware:
    """Puts `X-Request-ID` on every answer of the wrapped app."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = (b"x-request-id", request_id_of(scope["headers"]).encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_id)
