"""The one pooled connection to apiin.one: header hygiene, key swap, safe retries.

Retries happen only where they cannot double a charge: when the connection failed before the
request was sent (any method), and for GETs answered 429/502/503/504 (honouring `Retry-After`).
Every retry first books an upstream slot, like the first attempt did.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import random
import ssl
import time
from collections.abc import Awaitable, Callable

import certifi
import httpx

from . import config as cfg
from .asgi import Headers
from .errors import UpstreamUnavailable
from .routes import ENDPOINTS

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
    b"proxy-connection", b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
})
# Dropped from what the client sends: its auth and cookies, what the gateway itself answers for
# (Idempotency-Key, Cache-Control) and what would reveal the organisation's network.
_DROP_REQUEST = HOP_BY_HOP | {
    b"host", b"authorization", b"cookie", b"content-length", b"expect", b"accept-encoding",
    b"idempotency-key", b"cache-control", b"forwarded", b"x-real-ip",
}
# Dropped from the upstream's answer: framing httpx has undone, cookies, and the account's own
# rate-limit state (the team sees its quota instead).
_DROP_RESPONSE = HOP_BY_HOP | {
    b"content-length", b"content-encoding", b"set-cookie", b"server", b"date",
    b"www-authenticate", b"alt-svc", b"x-request-id",
}
_RETRY_STATUS = frozenset({429, 502, 503, 504})
_MAX_RETRY_WAIT_S = 10.0


def _connection_listed(headers: Headers) -> frozenset[bytes]:
    listed = {t.strip().lower() for k, v in headers if k == b"connection" for t in v.split(b",")}
    return frozenset(listed)


def request_headers(client: Headers, *, request_id: bytes, json_body: bool) -> Headers:
    listed = _connection_listed(client)
    out: Headers = [
        (k, v) for k, v in client
        if k not in _DROP_REQUEST and k not in listed
        and not k.startswith((b"proxy-", b"x-forwarded-"))
        and k != b"x-request-id" and not (json_body and k == b"content-type")
    ]
    out.append((b"x-request-id", request_id))
    if json_body:
        out.append((b"content-type", b"application/json"))
    return out


def response_headers(upstream: httpx.Headers) -> Headers:
    raw = [(k.lower(), v) for k, v in upstream.raw]
    listed = _connection_listed(raw)
    return [
        (k, v) for k, v in raw
        if k not in _DROP_RESPONSE and k not in listed
        and not k.startswith((b"ratelimit", b"x-ratelimit", b"proxy-"))
    ]


def retry_after_s(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


class ShardedTransport(httpx.AsyncBaseTransport):
    """Connections to the upstream, in several httpcore pools taken in turn.

    httpcore walks its whole pool (and polls each idle socket) on every request and response
    (encode/httpcore#924), so one pool of N connections costs O(N) per request: with 32
    requests in flight that scan was most of the gateway's CPU. K pools of N/K keep it short.
    """

    def __init__(self, *, max_connections: int, shards: int = 8) -> None:
        shards = max(1, min(shards, max_connections))
        limits = httpx.Limits(max_connections=max_connections // shards,
                              max_keepalive_connections=max_connections // shards)
        tls = ssl.create_default_context(cafile=certifi.where())  # loaded once, not per pool
        self._pools = [httpx.AsyncHTTPTransport(limits=limits, verify=tls)
                       for _ in range(shards)]
        self._next = itertools.cycle(self._pools)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await next(self._next).handle_async_request(request)

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()


class Upstream:
    def __init__(self, config: cfg.Upstream, *,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.retries = config.retries
        self._auth = (b"authorization", b"Bearer " + config.api_key.encode())
        self._base = config.base_url.rstrip("/") + "/"
        self._urls: dict[str, httpx.URL] = {}
        self._client = httpx.AsyncClient(
            base_url=config.base_url.rstrip("/") + "/",
            timeout=httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s),
            transport=transport or ShardedTransport(max_connections=config.max_connections),
            follow_redirects=False,
            trust_env=False,
        )

    def __repr__(self) -> str:
        return f"Upstream(base_url={str(self._client.base_url)!r})"

    async def aclose(self) -> None:
        await self._client.aclose()

    def _url(self, path: str, query: bytes) -> httpx.URL:
        """The absolute URL (httpx parses a relative one and the base URL on every request);
        the documented endpoints are parsed once."""
        if query:
            return httpx.URL(self._base + path, query=query)
        url = self._urls.get(path)
        if url is None:
            url = httpx.URL(self._base + path)
            if path in ENDPOINTS:
                self._urls[path] = url
        return url

    async def send(
        self,
        method: str,
        path: str,
        query: bytes,
        headers: Headers,
        body: bytes,
        *,
        stream: bool = False,
        before_retry: Callable[[], Awaitable[None]] | None = None,
    ) -> httpx.Response:
        """Send with the organisation's key; raise `UpstreamUnavailable` when no answer came."""
        url = self._url(path, query)
        request = self._client.build_request(method, url, headers=[*headers, self._auth],
                                             content=body or None)
        attempt = 0
        while True:
            wait: float | None = None
            try:
                response = await self._client.send(request, stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                if attempt >= self.retries:
                    raise _unavailable(exc) from None
            except httpx.TransportError as exc:
                raise _unavailable(exc) from None
            else:
                if method != "GET" or response.status_code not in _RETRY_STATUS:
                    return response
                wait = retry_after_s(response.headers.get("retry-after"))
                if attempt >= self.retries or (wait is not None and wait > _MAX_RETRY_WAIT_S):
                    return response
                await response.aclose()
            attempt += 1
            backoff = random.uniform(0, min(2.0, 0.1 * 2**attempt))
            await asyncio.sleep(max(wait or 0.0, backoff))
            if before_retry is not None:
                await before_retry()


def _unavailable(exc: httpx.TransportError) -> UpstreamUnavailable:
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamUnavailable("The upstream API did not answer in time.", status=504)
    if isinstance(exc, httpx.ConnectError):
        return UpstreamUnavailable("The upstream API could not be reached.")
    return UpstreamUnavailable("The upstream API closed the connection before answering.")
