"""Small ASGI helpers for the proxy hot path (no framework objects per request)."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ClientDisconnected as ClientDisconnected  # raised by read_body
from .errors import GatewayError, RequestTooLarge

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


async def send_reply(send: Send, reply: Reply) -> None:
    headers = [*reply.headers, (b"content-length", str(len(reply.body)).encode())]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


def error_reply(exc: GatewayError) -> Reply:
    headers = [(b"content-type", b"application/json")]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    return Reply(exc.status, headers, exc.body())


async def wait_disconnect(receive: Receive) -> None:
    """Returns when the client disconnects (call once the request body has been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def request_id_of(headers: Headers) -> str:
    """The client's X-Request-ID when it is sane (visible ASCII, up to 128), else a new one."""
    for name, value in headers:
        if name == b"x-request-id":
            if 0 < len(value) <= 128 and all(0x21 <= c <= 0x7E for c in value):
                return value.decode()
            break
    return os.urandom(16).hex()


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
