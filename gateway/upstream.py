"""The one pool of connections to apiin.one: header hygiene, key swap, safe retries.

aiohttp's client moves the bytes, with its pool and C parser, and nothing around it (chosen by
measurement: README, Benchmarks).

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
# Dropped from the upstream's answer: framing aiohttp has undone, cookies, and the account's own
# rate-limit state (the team sees its quota instead).
_DROP_RESPONSE = HOP_BY_HOP | {
    b"content-length", b"content-encoding", b"set-cookie", b"server", b"date",
    b"www-authenticate", b"alt-svc", b"x-request-id",
}
# Sent unless the client sent its own (Accept-Encoding: what aiohttp decodes without extras).
_DEFAULT_HEADERS = (  # as aiohttp takes them: str
    ("accept", "*/*"), ("accept-encoding", "gzip, deflate"),
    ("user-agent", f"aio-gateway/{__version__}"),
)
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


def response_headers(upstream: Headers) -> Headers:
    raw = [(k.lower(), v) for k, v in upstream]
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


class UpstreamResponse:
    """The upstream's answer: its status and headers (as received) at once, its body read
    whole by `send` (`content`) or, for a stream, as it comes (`aiter_bytes`, then `aclose`).

    A body that is not read to its end, or whose reader is cancelled, closes its connection
    instead of lending it again: the pool never holds a half-read connection.
    """

    __slots__ = ("_answer", "content", "headers", "method", "status_code")

    def __init__(self, answer: aiohttp.ClientResponse, method: str) -> None:
        self._answer = answer
        self.status_code = answer.status
        self.headers: Headers = list(answer.raw_headers)
        self.method = method
        self.content = b""

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (`name` in lower case)."""
        return next((v for k, v in self.headers if k.lower() == name), None)

    async def aread(self) -> bytes:
        """The whole body; raises `UpstreamBroken` when it breaks off."""
        try:
            self.content = await self._answer.read()
        except BaseException as exc:
            broken = self._failed(exc)
            if broken is None:
                raise
            raise broken from exc
        return self.content

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body's chunks as they arrive (decoded, when the upstream compressed it)."""
        content = self._answer.content
        while True:
            try:
                chunk = await content.readany()
            except BaseException as exc:
                broken = self._failed(exc)
                if broken is None:
                    raise
                raise broken from exc
            if not chunk:
                return
            yield chunk

    def _failed(self, exc: BaseException) -> UpstreamBroken | None:
        """A read that failed or was cancelled: the connection is never lent again; an
        aiohttp error is `UpstreamBroken` (None: anything else, a cancellation, goes on as is)."""
        self._answer.close()
        if isinstance(exc, aiohttp.ClientError | TimeoutError):
            return UpstreamBroken(_broken(exc))
        return None

    async def aclose(self) -> None:
        # at its end the body already gave its connection back; before it, close the connection
        if self._answer.content.is_eof():
            self._answer.release()
        else:
            self._answer.close()


class UpstreamBroken(Exception):
    """No whole answer: `kind` says why: `connect` or `connect_timeout` (no connection was
    made, so the request was not sent), `timeout` (no byte for the read timeout) or `broken`
    (the connection failed or the answer was malformed)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind

    @property
    def unsent(self) -> bool:
        return self.kind in ("connect", "connect_timeout")


def _broken(exc: BaseException) -> str:
    """What kind of failure an aiohttp error is (see `unavailable`)."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError | aiohttp.ClientConnectorError):
        return "connect_timeout" if isinstance(exc, TimeoutError) else "connect"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "broken"


_AIOHTTP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent")


class Upstream:
    """aiohttp's client, used directly: httpx's `Request` and `Response` objects around it cost
    more CPU than the rest of a forwarded request's gateway code (bench/ENGINES.md)."""

    def __init__(self, config: cfg.Upstream, *, verify: ssl.SSLContext | None = None) -> None:
        self.retries = config.retries
        # one Authorization header per account (`config.accounts`, or the one `api_key`)
        self._auth = {account.id: ("authorization", f"Bearer {account.api_key}")
                      for account in cfg.accounts_of(config)}
        self._default = next(iter(self._auth))
        self._base = config.base_url.rstrip("/") + "/"
        self._urls: dict[str, yarl.URL] = {}
        # `connect` bounds the wait for a pooled connection plus connecting, `sock_connect` a
        # new connection, `sock_read` each read
        self._timeout = aiohttp.ClientTimeout(connect=config.timeout_s,
                                              sock_connect=config.connect_timeout_s,
                                              sock_read=config.timeout_s)
        self._max_connections = config.max_connections
        # TLS verified against certifi's roots, loaded once
        self._tls = verify or ssl.create_default_context(cafile=certifi.where())
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"Upstream(base_url={self._base!r})"

    @property
    def in_use(self) -> int:
        """Connections lent out right now (requests sending or bodies being read); aiohttp
        keeps no public count."""
        connector = self._session.connector if self._session is not None else None
        return len(connector._acquired) if isinstance(connector, aiohttp.TCPConnector) else 0

    def _open(self) -> aiohttp.ClientSession:
        """The session, made on first use: aiohttp binds it to the running event loop. The
        request goes out as built: no redirects, cookies or environment proxies."""
        connector = aiohttp.TCPConnector(limit=self._max_connections, ssl=self._tls)
        session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=_AIOHTTP_AUTO_HEADERS, trust_env=False, timeout=self._timeout,
        )
        # aiohttp resends an idempotent request once when a kept-alive connection breaks; the
        # gateway's retries are its own (each books an upstream slot), so that one is off.
        session._retry_connection = False
        return session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _url(self, path: str, query: bytes) -> yarl.URL:
        """The absolute URL; the documented endpoints are parsed once."""
        if query:
            return yarl.URL(f"{self._base}{path}?{query.decode('latin-1')}")
        url = self._urls.get(path)
        if url is None:
            url = yarl.URL(self._base + path)
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
    ) -> UpstreamResponse:
        """Send with `account`'s key (None, or an account no longer configured: the first
        account's); raise `UpstreamUnavailable` when no answer came.

        With `stream`, the body is left to read (`aiter_bytes`) and the caller must `aclose()`
        the response; otherwise it is read before returning."""
        session = self._session
        if session is None:
            session = self._session = self._open()
        client = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]
        given = {name for name, _ in client}
        sent = [*(pair for pair in _DEFAULT_HEADERS if pair[0] not in given), *client,
                self._auth.get(account or self._default, self._auth[self._default])]
        url = self._url(path, query)
        attempt = 0
        while True:
            wait: float | None = None
            try:
                response = await _request(session, method, url, sent, body)
                if not stream:
                    await response.aread()
            except UpstreamBroken as exc:
                if not exc.unsent or attempt >= self.retries:
                    raise unavailable(exc) from None
            else:
                if method != "GET" or response.status_code not in _RETRY_STATUS:
                    return response
                value = response.header(b"retry-after")
                wait = retry_after_s(value.decode("latin-1") if value else None)
                if attempt >= self.retries or (wait is not None and wait > _MAX_RETRY_WAIT_S):
                    return response
                await response.aclose()
            attempt += 1
            backoff = random.uniform(0, min(2.0, 0.1 * 2**attempt))
            await asyncio.sleep(max(wait or 0.0, backoff))
            if before_retry is not None:
                await before_retry()


async def _request(session: aiohttp.ClientSession, method: str, url: yarl.URL,
                   headers: list[tuple[str, str]], body: bytes) -> UpstreamResponse:
    try:
        answer = await session.request(method, url, headers=headers, data=body or None,
                                       allow_redirects=False)
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise UpstreamBroken(_broken(exc)) from exc
    return UpstreamResponse(answer, method)


def unavailable(exc: UpstreamBroken) -> UpstreamUnavailable:
    """The client's error for an upstream call that brought no answer."""
    if exc.kind in ("timeout", "connect_timeout"):
        return UpstreamUnavailable("The upstream API did not answer in time.", status=504)
    if exc.kind == "connect":
        return UpstreamUnavailable("The upstream API could not be reached.")
    return UpstreamUnavailable("The upstream API closed the connection before answering.")
