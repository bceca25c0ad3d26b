"""The one pool of connections to apiin.one: header hygiene, key swap, safe retries.

`http1.Pool` moves the bytes (chosen by measurement: README, "The upstream engine").

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
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import certifi

from . import __version__
from . import config as cfg
from .asgi import Headers
from .errors import UpstreamUnavailable
from .http1 import Broken, Pool, Response

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
# Dropped from the upstream's answer: framing `http1` has undone, cookies, and the account's own
# rate-limit state (the team sees its quota instead).
_DROP_RESPONSE = HOP_BY_HOP | {
    b"content-length", b"content-encoding", b"set-cookie", b"server", b"date",
    b"www-authenticate", b"alt-svc", b"x-request-id",
}
# Sent unless the client sent its own (Accept-Encoding: what `http1` decodes).
_DEFAULT_HEADERS = (
    (b"accept", b"*/*"), (b"accept-encoding", b"gzip, deflate"),
    (b"user-agent", f"aio-gateway/{__version__}".encode()),
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


class Upstream:
    """The organisation's accounts' keys over one `http1.Pool` to the configured base URL."""

    def __init__(self, config: cfg.Upstream, *, verify: ssl.SSLContext | None = None) -> None:
        self.retries = config.retries
        # one Authorization header per account (`config.accounts`, or the one `api_key`)
        self._auth = {account.id: (b"authorization", f"Bearer {account.api_key}".encode())
                      for account in cfg.accounts_of(config)}
        self._default = next(iter(self._auth))
        base = urlsplit(config.base_url)
        tls = base.scheme == "https"
        # TLS verified against certifi's roots, loaded once
        self._tls = verify or ssl.create_default_context(cafile=certifi.where())
        # `timeout_s` bounds the wait for a connection (pooled or new) and each read,
        # `connect_timeout_s` making a new one
        self._pool = Pool(base.hostname or "", base.port or (443 if tls else 80), base.netloc,
                          tls=self._tls if tls else None, limit=config.max_connections,
                          wait_s=config.timeout_s, connect_s=config.connect_timeout_s,
                          read_s=config.timeout_s)
        self._prefix = base.path.rstrip("/") + "/"

    def __repr__(self) -> str:
        return f"Upstream(host={self._pool.host!r})"

    @property
    def in_use(self) -> int:
        """Connections lent out right now (requests sending or bodies being read)."""
        return self._pool.in_use

    async def aclose(self) -> None:
        await self._pool.close()

    def _head(self, method: str, path: str, query: bytes, headers: Headers, body: bytes,
              account: str | None) -> bytes:
        """The request's head: the gateway's defaults unless the client sent its own, the
        client's headers, and the account's key."""
        given = {name for name, _ in headers}
        sent = [*(pair for pair in _DEFAULT_HEADERS if pair[0] not in given), *headers,
                self._auth.get(account or self._default, self._auth[self._default])]
        target = self._prefix + path
        if query:
            target += "?" + query.decode("latin-1")
        return self._pool.head(method, target, sent, body)

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
    ) -> Response:
        """Send with `account`'s key (None, or an account no longer configured: the first
        account's); raise `UpstreamUnavailable` when no answer came.

        With `stream`, the body is left to read (`aiter_bytes`) and the caller must `aclose()`
        the response; otherwise it is read before returning. No redirect is followed."""
        pool = self._pool
        head = self._head(method, path, query, headers, body, account)
        attempt = 0
        while True:
            wait: float | None = None
            try:
                response = await pool.request(method, head, body)
                if not stream:
                    await response.aread()
            except Broken as exc:
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


def unavailable(exc: Broken) -> UpstreamUnavailable:
    """The client's error for an upstream call that brought no answer."""
    if exc.kind in ("timeout", "connect_timeout"):
        return UpstreamUnavailable("The upstream API did not answer in time.", status=504)
    if exc.kind == "connect":
        return UpstreamUnavailable("The upstream API could not be reached.")
    return UpstreamUnavailable("The upstream API closed the connection before answering.")
