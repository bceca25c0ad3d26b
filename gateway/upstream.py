"""The one pool of connections to apiin.one: header hygiene, key swap, safe retries.

The gateway sees httpx's `Request` and `Response`; under them, `AiohttpTransport` moves the
bytes with aiohttp's pool and C parser (chosen by measurement: README, Benchmarks).

Retries happen only where they cannot double a charge: when the connection failed before the
request was sent (any method), and for GETs answered 429/502/503/504 (honouring `Retry-After`).
Every retry first books an upstream slot, like the first attempt did.

Cancellation may arrive at any `await` (the caller's overall deadline): a request cancelled
before its answer, or a body cancelled or closed before its end, closes its connection.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import certifi
import httpx
import yarl

from . import __version__
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
    b"idempotency-key", b"cache-control", b"forwarded", b"x-real-ip", b"x-gateway-tags",
}
# Dropped from the upstream's answer: framing httpx has undone, cookies, and the account's own
# rate-limit state (the team sees its quota instead).
_DROP_RESPONSE = HOP_BY_HOP | {
    b"content-length", b"content-encoding", b"set-cookie", b"server", b"date",
    b"www-authenticate", b"alt-svc", b"x-request-id",
}
# Sent unless the client sent its own (Accept-Encoding: what httpx decodes without extras).
_DEFAULT_HEADERS: Headers = [
    (b"accept", b"*/*"), (b"accept-encoding", b"gzip, deflate"),
    (b"user-agent", f"aio-gateway/{__version__}".encode()),
]
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


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx's transport seam over aiohttp's connection pool and C HTTP parser.

    The rest of the gateway keeps httpx's `Request` / `Response`; only the bytes on the wire go
    through aiohttp, which costs a fraction of httpcore's CPU per request (bench/ENGINES.md).
    The request is sent as built (no headers added, no redirects, cookies or environment
    proxies); bodies are not decompressed here (httpx decodes them, as its own transport
    would). Timeouts come from `request.extensions["timeout"]`, as httpx sets them: `pool`
    bounds the wait for a pooled connection plus connecting, `connect` a new connection,
    `read` each read.

    A response that is not read to its end, or whose reader is cancelled, closes its connection
    instead of lending it again: the pool never holds a half-read connection.
    """

    def __init__(self, *, max_connections: int, verify: ssl.SSLContext) -> None:
        self._max_connections = max_connections
        self._tls = verify
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[float | None, ...], aiohttp.ClientTimeout] = {}

    @property
    def in_use(self) -> int:
        """Connections lent out right now (requests sending or bodies being read); aiohttp
        keeps no public count."""
        connector = self._session.connector if self._session is not None else None
        return len(connector._acquired) if isinstance(connector, aiohttp.TCPConnector) else 0

    def _open(self) -> aiohttp.ClientSession:
        """The session, made on first use: aiohttp binds it to the running event loop."""
        connector = aiohttp.TCPConnector(limit=self._max_connections, ssl=self._tls)
        session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
            skip_auto_headers=_AIOHTTP_AUTO_HEADERS, trust_env=False,
            timeout=aiohttp.ClientTimeout(),
        )
        # aiohttp resends an idempotent request once when a kept-alive connection breaks; the
        # gateway's retries are its own (each books an upstream slot), so that one is off.
        session._retry_connection = False
        return session

    def _timeout(self, request: httpx.Request) -> aiohttp.ClientTimeout:
        given = request.extensions.get("timeout", {})
        key = (given.get("pool"), given.get("connect"), given.get("read"))
        timeout = self._timeouts.get(key)
        if timeout is None:
            timeout = aiohttp.ClientTimeout(connect=key[0], sock_connect=key[1], sock_read=key[2])
            self._timeouts[key] = timeout
        return timeout

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session
        if session is None:
            session = self._session = self._open()
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
        try:
            answer = await session.request(
                request.method, yarl.URL(str(request.url), encoded=True), headers=headers,
                data=await request.aread() or None, allow_redirects=False,
                timeout=self._timeout(request),
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _httpx_error(exc, request) from exc
        return httpx.Response(
            answer.status, headers=answer.raw_headers, stream=_Body(answer, request),
            request=request, extensions={"http_version": b"HTTP/1.1",
                                         "reason_phrase": (answer.reason or "").encode()},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


_AIOHTTP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent")


class _Body(httpx.AsyncByteStream):
    """An aiohttp response's body as httpx reads it: chunks as they arrive."""

    def __init__(self, answer: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._answer = answer
        self._request = request

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._answer.content.readany()
        except BaseException as exc:  # cancelled or broken: never lend this connection again
            self._answer.close()
            if isinstance(exc, aiohttp.ClientError | TimeoutError):
                raise _httpx_error(exc, self._request) from exc
            raise
        if not chunk:
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        # at its end the body already gave its connection back; before it, close the connection
        if self._answer.content.is_eof():
            self._answer.release()
        else:
            self._answer.close()


def _httpx_error(exc: BaseException, request: httpx.Request) -> httpx.TransportError:
    """aiohttp's error as the httpx error the gateway (and httpx's own transport) would raise."""
    kind: type[httpx.TransportError]
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        kind = httpx.ConnectTimeout
    elif isinstance(exc, TimeoutError):
        kind = httpx.ReadTimeout
    elif isinstance(exc, aiohttp.ClientConnectorError):
        kind = httpx.ConnectError
    elif isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        kind = httpx.UnsupportedProtocol
    elif isinstance(exc, aiohttp.ClientOSError):
        kind = httpx.ReadError
    else:  # disconnected, a broken body or a malformed answer
        kind = httpx.RemoteProtocolError
    return kind(str(exc) or type(exc).__name__, request=request)


class Upstream:
    def __init__(self, config: cfg.Upstream, *,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.retries = config.retries
        # one Authorization header per account (`config.accounts`, or the one `api_key`)
        self._auth = {account.id: (b"authorization", b"Bearer " + account.api_key.encode())
                      for account in cfg.accounts_of(config)}
        self._default = next(iter(self._auth))
        self._base = config.base_url.rstrip("/") + "/"
        self._urls: dict[str, httpx.URL] = {}
        self._host = (b"host", httpx.URL(self._base).netloc)
        self._extensions = {"timeout": httpx.Timeout(
            config.timeout_s, connect=config.connect_timeout_s).as_dict()}
        self._transport = transport or AiohttpTransport(
            max_connections=config.max_connections,
            verify=ssl.create_default_context(cafile=certifi.where()),  # loaded once
        )

    def __repr__(self) -> str:
        return f"Upstream(base_url={self._base!r})"

    async def aclose(self) -> None:
        await self._transport.aclose()

    def _url(self, path: str, query: bytes) -> httpx.URL:
        """The absolute URL; the documented endpoints are parsed once."""
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
        account: str | None = None,
    ) -> httpx.Response:
        """Send with `account`'s key (None, or an account no longer configured: the first
        account's); raise `UpstreamUnavailable` when no answer came.

        With `stream`, the body is left to read (`aiter_bytes`) and the caller must `aclose()`
        the response; otherwise it is read before returning."""
        given = {name for name, _ in headers}
        framing = [self._host]
        if body or method in ("POST", "PUT", "PATCH"):
            framing.append((b"content-length", str(len(body)).encode()))
        # framing as httpx would add it, given here so that httpx need not work it out
        request = httpx.Request(
            method, self._url(path, query),
            headers=[*framing, *(h for h in _DEFAULT_HEADERS if h[0] not in given), *headers,
                     self._auth.get(account or self._default, self._auth[self._default])],
            stream=httpx.ByteStream(body), extensions=self._extensions,
        )
        attempt = 0
        while True:
            wait: float | None = None
            try:
                response = await self._transport.handle_async_request(request)
                if not stream:
                    await _read(response)
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


async def _read(response: httpx.Response) -> None:
    try:
        await response.aread()
    except BaseException:
        await response.aclose()
        raise


def _unavailable(exc: httpx.TransportError) -> UpstreamUnavailable:
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamUnavailable("The upstream API did not answer in time.", status=504)
    if isinstance(exc, httpx.ConnectError):
        return UpstreamUnavailable("The upstream API could not be reached.")
    return UpstreamUnavailable("The upstream API closed the connection before answering.")
