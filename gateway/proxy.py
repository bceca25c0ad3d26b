"""The proxy: every request under /api/v1/, from the team's key to the upstream's answer.

One request makes one store round trip before it is forwarded (`Store.admit`) and one after its
answer has been sent (`Store.finish`, in the background). Whatever happens in between (upstream
errors, a client that disconnects, cancellation at shutdown) the reservation is settled or
refunded and the flight lock released.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import httpx
import orjson

from . import inbound, routes
from .asgi import (
    ClientDisconnected,
    Headers,
    Receive,
    Reply,
    Scope,
    Send,
    error_reply,
    head_length,
    read_body,
    request_id_of,
    send_reply,
    wait_disconnect,
)
from .auth import authenticate
from .budget import from_milli, period_id, to_milli
from .cache import canonical_json, client_directive, decode_entry, encode_entry, request_digest
from .errors import (
    AuthenticationError,
    GatewayError,
    IdempotencyConflict,
    IdempotencyMismatch,
    InsufficientCredits,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PermissionDenied,
    RateLimited,
    RequestTooLarge,
    StoreUnavailable,
    UpstreamUnavailable,
)
from .policy import Policy, TeamPolicy
from .quota import QuotaState, state_header
from .runtime import Runtime
from .store import Store, StoreError
from .store.base import (
    IDEMPOTENCY_TTL_MS,
    Admission,
    AdmitResult,
    CacheRef,
    Completion,
    Reservation,
    Settle,
    Verdict,
)
from .store.keys import digest as key_digest
from .tasks import task_outcome
from .upstream import request_headers, response_headers

PREFIX = "/api/v1/"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_STRICT_CACHE_CONTROL = (b"no-store", b"no-cache", b"private")
_FOLLOW_ATTEMPTS = 3

log = logging.getLogger("gateway")
access_log = logging.getLogger("gateway.access")


@dataclass(slots=True)
class Exchange:
    """What one request did, for its access-log line and its metrics."""

    request_id: str
    method: str
    route: str
    team: str = "unknown"
    key_id: str | None = None
    model: str | None = None
    status: int = 0
    cache: str = "none"
    credits: float = 0.0
    upstream_s: float | None = None
    reason: str | None = None
    policy_header: bytes | None = None
    quotas: tuple[QuotaState, ...] = ()
    streaming: bool = False  # the answer has started: no other answer can be sent


@dataclass(slots=True)
class Prepared:
    """A validated request and what it asks of the store."""

    team: TeamPolicy
    method: str
    path: str
    query: bytes
    headers: Headers
    body: bytes
    stream: bool
    task_id: str | None
    cache: CacheRef | None
    lookup: bool  # read the cache (and coalesce) rather than only refresh it
    admission: Admission
    context: bytes  # ledger context
    flight: str = ""  # local single-flight key


class Proxy:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        request_id = request_id_of(scope["headers"])
        path = scope["path"][len(PREFIX):]
        ex = Exchange(request_id, scope["method"], routes.route_of(path))
        metrics = self.rt.metrics
        metrics.inflight.inc()
        try:
            try:
                reply = await self._answer(scope, receive, send, ex, path)
            except GatewayError as exc:
                reply = error_reply(exc)
                ex.reason = ex.reason or exc.reason
            except Exception:  # a defect: still an answer in the error shape, and a log line
                log.exception("unexpected error", extra={"fields": {
                    "request_id": request_id, "message": "unexpected error"}})
                if ex.streaming:
                    raise
                reply = error_reply(GatewayError("The gateway failed to answer this request."))
            if reply is not None:
                ex.status = reply.status
                await send_reply(send, self._decorate(reply, ex), head=ex.method == "HEAD")
        except ClientDisconnected:
            ex.status = 499
        finally:
            metrics.inflight.dec()
            self._observe(ex, time.perf_counter() - started)

    async def _answer(self, scope: Scope, receive: Receive, send: Send, ex: Exchange,
                      path: str) -> Reply | None:
        inbound.check(scope)
        policy = self.rt.policy
        if ex.method not in METHODS:
            raise MethodNotAllowed(f"Method {ex.method} is not supported.")
        if not routes.is_safe_path(path):
            raise NotFound("Unknown API path.")
        head = _Head(scope["headers"])
        principal = authenticate(head.authorization, policy.keys)
        ex.team, ex.key_id = principal.team, principal.key_id
        team = policy.teams[principal.team]
        ex.policy_header = team.policy_header
        limit = policy.config.listen.max_body_bytes
        if head.content_length is not None and head.content_length > limit:
            raise RequestTooLarge(f"The request body is larger than {limit} bytes.")
        body = await read_body(receive, limit)
        req = self._prepare(policy, team, scope, head, body, path, principal.key_id, ex)
        result, store = await self.rt.admit(req.admission)
        ex.quotas = result.quotas
        self.rt.budget_seen(team.name, req.admission.reservation.period
                            if req.admission.reservation else None, result.budget_used)

        followed_before = 0
        while True:
            verdict = result.verdict
            if verdict is Verdict.ADMIT:
                if req.stream:
                    return await self._stream(req, result, store, receive, send, ex)
                return await self._forward(req, result, store, ex)
            if verdict is Verdict.HIT:
                return self._hit(req, result, store, ex)
            if verdict is Verdict.REPLAY:
                ex.cache = "bypass"
                reply, _, _ = decode_entry(result.entry or b"")
                reply.headers.append((b"idempotent-replayed", b"true"))
                return reply
            if verdict is not Verdict.FOLLOW:
                raise self._rejection(verdict, req, result, ex)
            followed = await self._follow(req, store)
            if followed is not None:
                return self._coalesced(req, followed, store, ex)
            followed_before += 1
            if followed_before >= _FOLLOW_ATTEMPTS:
                raise UpstreamUnavailable(
                    "The upstream answer for this request could not be obtained.", status=503)
            # the leader gave up without an answer: ask again, without counting the quota twice
            req.admission = replace(req.admission, count_quota=False)
            result, store = await self.rt.admit(req.admission)

    def _prepare(self, policy: Policy, team: TeamPolicy, scope: Scope, head: _Head,
                 body: bytes, path: str, key_id: str, ex: Exchange) -> Prepared:
        config = policy.config
        method = ex.method
        payload: dict[str, Any] | None = None
        canonical = b""
        if method == "POST":
            payload = inbound.json_object(body, head.content_type)
            model = payload.get("model")
            if not isinstance(model, str) or not model:
                raise InvalidRequest("The request body must carry a 'model' string.")
            ex.model = model
            if team.models is not None and model not in team.models:
                raise PermissionDenied(f"Model {model!r} is not allowed for this team.")
            canonical = canonical_json(payload)
        elif body:
            canonical = body
        stream = payload is not None and payload.get("stream") is True
        query = scope["query_string"]

        task_id = None
        if ex.route == routes.TASKS:
            task_id = routes.task_id_of(path)
            if task_id is None or method not in ("GET", "HEAD"):
                raise NotFound("Task not found.")

        directive = client_directive(head.cache_control)
        cache: CacheRef | None = None
        shared = config.cache.scope == "organisation"
        team_part = b"" if shared else team.name.encode()
        if directive != "no-store" and not stream:
            if task_id is not None and method == "GET":
                cache = CacheRef(routes.TASKS, task_id)
            elif config.cache.ttl_s > 0 and (
                method == "GET" or (method == "POST" and path in config.cache.endpoints)
            ):
                digest = request_digest(method.encode(), path.encode(), query, canonical,
                                        team_part)
                cache = CacheRef(ex.route, digest, shared)
        lookup = cache is not None and directive != "no-cache"
        if cache is None or not lookup:
            ex.cache = "bypass"
        if directive is not None:
            self.rt.metrics.cache_events.labels(ex.route, "bypass").inc()

        idempotency = None
        if method == "POST" and head.idempotency_key is not None:
            key = head.idempotency_key
            if not key or len(key) > 255 or not all(0x21 <= c <= 0x7E for c in key):
                raise InvalidRequest(
                    "Idempotency-Key must be 1 to 255 visible ASCII characters.")
            fingerprint = request_digest(path.encode(), query, canonical)
            idempotency = (key_digest(key.decode()), fingerprint)

        context = orjson.dumps({
            "team": team.name, "key_id": key_id, "model": ex.model, "route": ex.route,
            "request_id": ex.request_id, "cached": False,
        })
        ticket = self.rt.ticket()
        reservation = None
        if method == "POST":
            period = period_id(team.budget.period if team.budget else "month", self.rt.clock())
            reservation = Reservation(ticket, period, to_milli(config.price(ex.model or "")),
                                      context)
        admission = Admission(
            team=team.name,
            key_id=key_id,
            ticket=ticket,
            hold_ms=policy.hold_ms,
            quotas=team.quotas,
            idempotency=idempotency,
            task_id=task_id,
            cache=cache if lookup else None,
            reservation=reservation,
            budget_limit=team.budget_limit,
            pace=policy.pace,
            hit_event=context if lookup and method == "POST" else None,
            ledger_min_ms=self._ledger_min_ms(),
        )
        headers = request_headers(scope["headers"], request_id=ex.request_id.encode(),
                                  json_body=payload is not None)
        flight = ""
        if cache is not None:
            flight = f"{'' if cache.shared else team.name}:{cache.route}:{cache.digest}"
        return Prepared(team, method, path, query, headers, body, stream, task_id, cache, lookup,
                        admission, context, flight)

    # -- forwarding ------------------------------------------------------------------------

    async def _send_upstream(self, req: Prepared, ex: Exchange, *, stream: bool) -> httpx.Response:
        started = time.perf_counter()
        try:
            response = await self.rt.upstream.send(
                req.method, req.path, req.query, req.headers, req.body, stream=stream,
                before_retry=self._book_retry,
            )
        except UpstreamUnavailable:
            self._upstream_seen(ex, "error", time.perf_counter() - started)
            raise
        self._upstream_seen(ex, str(response.status_code), time.perf_counter() - started)
        if response.status_code in (401, 402):
            await response.aclose()
            log.error("upstream refused the organisation's key or account",
                      extra={"fields": {"upstream_status": response.status_code,
                                        "request_id": ex.request_id}})
            raise UpstreamUnavailable(
                "The gateway's upstream account needs attention (operators have been alerted). "
                "This request was not charged.",
                status=502 if response.status_code == 401 else 503,
            )
        return response

    async def _book_retry(self) -> None:
        try:
            wait = await self.rt.upstream_slot()
        except StoreError:
            return  # the first attempt had its slot; a retry does not fail on the store
        if wait is not None:
            raise RateLimited("The organisation's upstream allowance is spent; retry shortly.",
                              wait_s=wait)

    async def _forward(self, req: Prepared, result: AdmitResult, store: Store,
                       ex: Exchange) -> Reply:
        future: asyncio.Future[Reply] | None = None
        if req.lookup and req.cache is not None:
            ex.cache = "miss"
            future = asyncio.get_running_loop().create_future()
            self.rt.flights[req.flight] = future
        reply: Reply | None = None
        try:
            if result.pace_delay_s > 0:
                await asyncio.sleep(result.pace_delay_s)
            response = await self._send_upstream(req, ex, stream=False)
            reply = Reply(response.status_code, _answer_headers(response), response.content)
        finally:
            self.rt.finish(store, self._completion(req, reply, ex))
            if future is not None:
                del self.rt.flights[req.flight]
                if reply is not None:  # followers get their own copy to decorate
                    future.set_result(Reply(reply.status, list(reply.headers), reply.body))
                else:
                    future.cancel()
        return reply

    async def _stream(self, req: Prepared, result: AdmitResult, store: Store, receive: Receive,
                      send: Send, ex: Exchange) -> Reply | None:
        reply: Reply | None = None
        tail = b""
        started = complete = False
        try:
            if result.pace_delay_s > 0:
                await asyncio.sleep(result.pace_delay_s)
            response = await self._send_upstream(req, ex, stream=True)
            if not 200 <= response.status_code < 300:
                await response.aread()
                reply = Reply(response.status_code, _answer_headers(response), response.content)
                return reply
            ex.status = response.status_code
            ex.streaming = True
            start = Reply(response.status_code, _answer_headers(response))
            started = True
            await send({"type": "http.response.start", "status": start.status,
                        "headers": self._decorate(start, ex).headers})
            gone = asyncio.ensure_future(wait_disconnect(receive))
            try:
                async for chunk in response.aiter_bytes():
                    if gone.done():
                        break
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    tail = (tail + chunk)[-8192:]
                else:
                    complete = True
            except httpx.TransportError:
                log.warning("upstream stream broke off", extra={"fields": {
                    "request_id": ex.request_id}})
            finally:
                gone.cancel()
                await response.aclose()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            if not complete:
                ex.status = 499 if gone.done() else 502
            return None
        finally:
            if reply is None and complete:
                reply = Reply(ex.status, [], tail)
            completion = self._completion(req, reply, ex, streamed=True,
                                          cut_short=started and not complete)
            self.rt.finish(store, completion)

    def _completion(self, req: Prepared, reply: Reply | None, ex: Exchange, *,
                    streamed: bool = False, cut_short: bool = False) -> Completion:
        """Settle, cache, release and remember, from what came back.

        `reply` is None when no answer came; `cut_short` when a stream was cut after it began
        (the upstream did part of the work, so the reservation is charged as it stands).
        """
        a, config = req.admission, self.rt.policy.config
        r = a.reservation
        ok = reply is not None and 200 <= reply.status < 300
        outcome = None
        if ok and reply is not None:
            outcome = task_outcome(req.method, req.path, req.task_id, reply.body)
        settle = Settle.CHARGE if ok or cut_short else Settle.REFUND
        charge = None
        hold_id = None
        task_owner = None
        if outcome is not None:
            charge = outcome.charge
            if outcome.created_task is not None:
                settle, hold_id = Settle.HOLD, f"task:{outcome.created_task}"
                task_owner = (outcome.created_task,
                              max(config.cache.task_ttl_s, 86400) * 1000)
        cache_put = None
        if ok and reply is not None and req.cache is not None and not streamed:
            ttl_s = float(config.cache.ttl_s)
            if req.task_id is not None:
                ttl_s = (config.cache.task_ttl_s if outcome is not None and outcome.final
                         else config.cache.pending_task_ttl_s)
            if 0 < len(reply.body) <= config.cache.max_entry_bytes and ttl_s > 0:
                # what a hit will save: the credits this answer cost (task polls cost none)
                credits = 0 if r is None else charge if charge is not None else r.amount
                cache_put = (req.cache, encode_entry(reply, credits=credits, ttl_s=ttl_s),
                             int(ttl_s * 1000))
                self.rt.metrics.cache_events.labels(ex.route, "stored").inc()
        idem = None
        if a.idempotency is not None:
            keep = reply is not None and reply.status < 500 and reply.status != 429 and not streamed
            idem = (a.idempotency[0], encode_entry(reply, credits=0, ttl_s=0) if keep and reply
                    else None, IDEMPOTENCY_TTL_MS)
        if r is not None:
            completion = Completion(
                team=a.team, ticket=a.ticket, settle=settle, reservation_id=r.id,
                period=r.period, charge=charge, hold_id=hold_id, hold_ms=self.rt.task_check_ms,
            )
        elif outcome is not None and outcome.final and req.task_id is not None:
            # a poll that sees a task finish settles what its creation reserved
            completion = Completion(
                team=a.team, ticket=a.ticket,
                settle=Settle.REFUND if outcome.failed else Settle.CHARGE,
                reservation_id=f"task:{req.task_id}", charge=outcome.charge,
            )
        else:
            completion = Completion(team=a.team, ticket=a.ticket)
        if charge is not None and settle is Settle.CHARGE:
            ex.credits = from_milli(charge)
        return replace(
            completion,
            cache_put=cache_put,
            release=req.cache if req.lookup else None,
            idempotency=idem,
            task_owner=task_owner,
            ledger_min_ms=self._ledger_min_ms(),
        )

    def _ledger_min_ms(self) -> int:
        retention = self.rt.policy.config.ledger.retention_days * 86400
        return int((self.rt.clock() - retention) * 1000)

    # -- answers without the upstream ----------------------------------------------------------

    def _hit(self, req: Prepared, result: AdmitResult, store: Store, ex: Exchange) -> Reply:
        """A cache hit: `admit` already counted it and wrote its ledger and idempotent answer."""
        reply, credits, ttl_s = decode_entry(result.entry or b"")
        ex.cache = "hit"
        reply.headers.append((b"age", str(max(0, int(ttl_s - result.entry_ttl_s))).encode()))
        self._saved(req, reply, credits, store)
        return reply

    def _coalesced(self, req: Prepared, leader: Reply, store: Store, ex: Exchange) -> Reply:
        """Another request's answer: the bookkeeping a hit gets from `admit` is done here."""
        ex.cache = "coalesced"
        reply = Reply(leader.status, list(leader.headers), leader.body)
        a = req.admission
        saved = 0
        if 200 <= reply.status < 300 and req.method == "POST":
            reported = task_outcome(req.method, req.path, None, reply.body).charge
            saved = reported if reported is not None else to_milli(
                self.rt.policy.config.price(ex.model or ""))
        self._saved(req, reply, saved, store)
        ledger = None
        if req.method == "POST":
            event = orjson.loads(req.context)
            event.update(kind="charge", credits=0, cached=True, saved=saved)
            ledger = orjson.dumps(event)
        idem = None
        if a.idempotency is not None:
            idem = (a.idempotency[0], encode_entry(reply, credits=0, ttl_s=0), IDEMPOTENCY_TTL_MS)
        if ledger or idem:
            self.rt.finish(store, Completion(
                team=a.team, ticket=a.ticket, idempotency=idem, ledger=ledger,
                ledger_min_ms=self._ledger_min_ms()))
        return reply

    def _saved(self, req: Prepared, reply: Reply, saved: int, store: Store) -> None:
        """Count what the cache saved; a shared task answer makes the task this team's too."""
        a = req.admission
        if saved:
            self.rt.metrics.credits_saved.labels(a.team).inc(from_milli(saved))
        if req.cache is not None and req.cache.shared and req.path in routes.ASYNC_ENDPOINTS:
            created = _created_task(reply)
            if created is not None:
                owner = (created, max(self.rt.policy.config.cache.task_ttl_s, 86400) * 1000)
                self.rt.finish(store, Completion(team=a.team, ticket=a.ticket, task_owner=owner))

    async def _follow(self, req: Prepared, store: Store) -> Reply | None:
        """Wait for the request already fetching this cache key; None if it gave up."""
        local = self.rt.flights.get(req.flight)
        hold_s = req.admission.hold_ms / 1000.0
        if local is not None:
            try:
                return await asyncio.wait_for(asyncio.shield(local), hold_s)
            except (TimeoutError, asyncio.CancelledError):
                if not local.cancelled():
                    raise
                return None
        assert req.cache is not None
        deadline = time.monotonic() + hold_s
        pause = 0.01
        while time.monotonic() < deadline:
            await asyncio.sleep(pause)
            pause = min(pause * 1.5, 0.1)
            try:
                flight = await store.flight(req.team.name, req.cache)
            except StoreError:
                raise StoreUnavailable() from None
            if flight.entry is not None:
                reply, _, _ = decode_entry(flight.entry)
                return reply
            if not flight.held:
                return None
        return None

    # -- rejections and decoration -----------------------------------------------------------------

    def _rejection(self, verdict: Verdict, req: Prepared, result: AdmitResult,
                   ex: Exchange) -> GatewayError:
        team = req.team
        if verdict is Verdict.QUOTA:
            ex.reason = "quota"
            spent = [s.quota for s in result.quotas if s.remaining <= 0]
            which = ", ".join(f"{q.limit} requests per {q.name}" for q in spent) or "quota"
            return RateLimited(f"Team quota exceeded ({which}).", wait_s=result.retry_after_s)
        if verdict is Verdict.BUDGET:
            ex.reason = "budget"
            limit = team.budget_limit or 0
            remaining = from_milli(max(limit - (result.budget_used or 0), 0))
            needed = from_milli(req.admission.reservation.amount
                                if req.admission.reservation else 0)
            period = team.budget.period if team.budget else "period"
            return InsufficientCredits(
                f"Team budget exhausted for this {period}: {remaining} credits remaining, "
                f"{needed} needed.")
        if verdict is Verdict.PACE:
            ex.reason = "pace"
            return RateLimited("The organisation's upstream allowance is spent; retry shortly.",
                               wait_s=result.retry_after_s)
        if verdict is Verdict.NOT_FOUND:
            ex.reason = "not_found"
            return NotFound("Task not found.")
        if verdict is Verdict.REVOKED:
            ex.reason = "revoked"
            return AuthenticationError("Missing or invalid API key.")
        if verdict is Verdict.CANCELLED:  # this request's earlier store call timed out
            ex.reason = "store"
            return StoreUnavailable()
        ex.reason = "idempotency"
        if verdict is Verdict.IDEM_BUSY:
            return IdempotencyConflict(
                "A request with this Idempotency-Key is still being processed; retry later.")
        return IdempotencyMismatch(
            "This Idempotency-Key was already used with a different request.")

    def _decorate(self, reply: Reply, ex: Exchange) -> Reply:
        headers = reply.headers
        headers.append((b"x-request-id", ex.request_id.encode()))
        if ex.team != "unknown":
            headers.append((b"x-cache", _X_CACHE.get(ex.cache, b"BYPASS")))
        if ex.policy_header is not None:
            headers.append((b"ratelimit-policy", ex.policy_header))
            if ex.quotas:
                headers.append((b"ratelimit", state_header(ex.quotas).encode()))
        if reply.status == 429:
            headers[:] = [(k, v) for k, v in headers if k != b"cache-control"]
            headers.append((b"cache-control", b"no-store"))
        elif not any(k == b"cache-control" for k, _ in headers):
            headers.append((b"cache-control", b"private"))
        return reply

    def _upstream_seen(self, ex: Exchange, status: str, seconds: float) -> None:
        ex.upstream_s = seconds
        self.rt.metrics.upstream_requests.labels(ex.route, status).inc()
        self.rt.metrics.upstream_duration.labels(ex.route).observe(seconds)

    def _observe(self, ex: Exchange, seconds: float) -> None:
        m = self.rt.metrics
        m.requests.labels(ex.team, ex.route, str(ex.status), ex.cache).inc()
        m.request_duration.labels(ex.route).observe(seconds)
        if ex.cache in ("hit", "miss", "coalesced"):
            m.cache_events.labels(ex.route, ex.cache).inc()
        if ex.reason is not None:
            m.rejections.labels(ex.team, ex.reason).inc()
        if self.rt.policy.config.logging.access_log:
            access_log.info("", extra={"fields": {
                "request_id": ex.request_id, "team": ex.team, "key_id": ex.key_id,
                "method": ex.method, "route": ex.route, "model": _short(ex.model),
                "status": ex.status, "cache": ex.cache, "credits": ex.credits,
                "upstream_ms": None if ex.upstream_s is None else round(ex.upstream_s * 1000, 2),
                "total_ms": round(seconds * 1000, 2),
            }})


_X_CACHE = {"hit": b"HIT", "miss": b"MISS", "bypass": b"BYPASS", "coalesced": b"COALESCED",
            "none": b"BYPASS"}


class _Head:
    """The few request headers the gateway reads, found in one pass."""

    __slots__ = ("authorization", "cache_control", "content_length", "content_type",
                 "idempotency_key")

    def __init__(self, headers: Headers) -> None:
        self.authorization: bytes | None = None
        self.cache_control: bytes | None = None
        self.content_type: bytes | None = None
        self.idempotency_key: bytes | None = None
        self.content_length: int | None = None
        for name, value in headers:
            if name == b"authorization":
                self.authorization = value
            elif name == b"content-type":
                self.content_type = value
            elif name == b"content-length":
                try:
                    self.content_length = int(value)
                except ValueError:
                    raise InvalidRequest("Content-Length is not a number.") from None
            elif name == b"cache-control":
                self.cache_control = value
            elif name == b"idempotency-key":
                self.idempotency_key = value.strip()


def _answer_headers(response: httpx.Response) -> Headers:
    """The upstream's headers a client may see; `Retry-After` only where it means something,
    `Cache-Control` at least `private` (answers are per key)."""
    status = response.status_code
    headers = [(k, v) for k, v in response_headers(response.headers)
               if k != b"retry-after" or status in (429, 503)]
    if status == 429 and not any(k == b"retry-after" for k, _ in headers):
        headers.append((b"retry-after", b"1"))  # the contract promises one on every 429
    if response.request.method == "HEAD":
        headers += head_length(status, response.headers.raw)
    for i, (name, value) in enumerate(headers):
        if name == b"cache-control":
            if not any(word in value.lower() for word in _STRICT_CACHE_CONTROL):
                headers[i] = (name, b"private")
            break
    return headers


def _created_task(reply: Reply) -> str | None:
    try:
        data = orjson.loads(reply.body)
    except orjson.JSONDecodeError:
        return None
    task_id = data.get("id") if isinstance(data, dict) else None
    return task_id if isinstance(task_id, str) and routes.task_id_of(f"tasks/{task_id}") else None


def _short(model: str | None) -> str | None:
    return None if model is None else model[:64]
