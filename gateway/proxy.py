"""The proxy: every request under /api/v1/, from the team's key to the upstream's answer.

One store round trip decides a request (`Store.admit`); then it is answered from the cache, by
an idempotent replay, by following the request already fetching the same answer, or by
forwarding it (`forward.py`). However it ends, `_conclude` asks the settlement policy
(`settlement.decide`) what the end means and hands the store's part to the bookkeeping: written
before the answer goes out when a later request relies on it, else batched after.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from . import fairness, forward, inbound, routes, tracing
from .asgi import (
    Message,
    Receive,
    Reply,
    Scope,
    Send,
    error_reply,
    read_body,
    request_id_of,
    send_reply,
)
from .attribution import IGNORED_HEADER
from .budget import from_milli
from .cache import decode_entry, encode_entry
from .errors import (
    AuthenticationError,
    GatewayError,
    IdempotencyConflict,
    IdempotencyMismatch,
    InsufficientCredits,
    MethodNotAllowed,
    NotFound,
    RateLimited,
    RequestTooLarge,
    StoreUnavailable,
    UpstreamUnavailable,
)
from .quota import QuotaState, state_header
from .request import Head, ParsedRequest, parse, read_json
from .runtime import Runtime
from .settlement import (
    STORE_SETTLE,
    Answer,
    Charge,
    Decision,
    End,
    Kind,
    decide,
    read_answer,
    records_stream,
    written_first,
)
from .store import Store, StoreError
from .store.base import IDEMPOTENCY_TTL_MS, Admission, AdmitResult, Completion, Verdict

PREFIX = "/api/v1/"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_STRICT_CACHE_CONTROL = (b"no-store", b"no-cache", b"private")
_FOLLOW_ATTEMPTS = 3
OWNER_MIN_TTL_S = 86400  # a team keeps its task at least a day, whatever the cache keeps

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
    upstream: forward.Upstreamed | None = None
    reason: str | None = None
    policy_header: bytes | None = None
    quotas: tuple[QuotaState, ...] = ()
    tags_ignored: str | None = None
    streaming: bool = False  # the answer has started: no other answer can be sent


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
                req = await self._request(scope, receive, ex, path)
                reply = await self.serve(req, ex, receive, send)
            except GatewayError as exc:  # a client gone mid-upload too: 499
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
        finally:
            metrics.inflight.dec()
            self._observe(ex, time.perf_counter() - started)

    async def _request(self, scope: Scope, receive: Receive, ex: Exchange,
                       path: str) -> ParsedRequest:
        """The request, read and checked. Its own frame: what only reading needs (the head, the
        body's JSON) is not held while the request is served (0.4 KB of each held request)."""
        inbound.check(scope)  # control characters, repeated singleton headers: 400 first
        policy = self.rt.policy
        if ex.method not in METHODS:
            raise MethodNotAllowed(f"Method {ex.method} is not supported.")
        if not routes.is_safe_path(path):
            raise NotFound("Unknown API path.")
        head = Head(scope["headers"])
        principal = await policy.auth.authenticate(head.authorization, self.rt.clock())
        ex.team, ex.key_id = principal.team, principal.key_id
        team = policy.teams[principal.team]
        ex.policy_header = team.limits(principal.key_id)[1]
        limit = policy.config.listen.max_body_bytes
        if head.content_length is not None and head.content_length > limit:
            raise RequestTooLarge(f"The request body is larger than {limit} bytes.")
        body = await read_body(receive, limit)
        payload, ex.model, body = read_json(ex.method, body, head.content_type)
        req = parse(policy, team, principal.key_id, request_id=ex.request_id, method=ex.method,
                    path=path, route=ex.route, query=scope["query_string"], head=head,
                    raw_headers=scope["headers"], body=body, payload=payload, model=ex.model,
                    ticket=self.rt.ticket(), now=self.rt.clock())
        ex.tags_ignored = req.tags_ignored
        if req.cache is None or not req.lookup:
            ex.cache = "bypass"
        if head.cache_control is not None and req.cache is not None and not req.lookup:
            self.rt.metrics.cache_events.labels(ex.route, "bypass").inc()
        if req.callback is not None and self.rt.webhooks is not None:
            await self.rt.webhooks.check(req.callback)  # before anything is reserved or sent
        return req

    async def poll(self, req: ParsedRequest) -> Reply:
        """The gateway's own poll of a task (webhooks.py): a client's `GET /tasks/{id}`, but
        for the HTTP around it."""
        ex = Exchange(req.request_id, req.method, req.route, req.team.name, req.key_id)
        reply = await self.serve(req, ex, _no_receive, _no_send)
        assert reply is not None, "a task poll is never streamed"
        return reply

    async def serve(self, req: ParsedRequest, ex: Exchange, receive: Receive,
                    send: Send) -> Reply | None:
        """Admit a parsed request, then answer it from the cache, by a replay, by following the
        request already fetching it, or by forwarding it."""
        team = req.team
        result, store = await self._admit(req.admission)
        following = False  # holds an idempotency lock as a follower, not yet concluded
        try:
            for attempt in range(_FOLLOW_ATTEMPTS):
                ex.quotas = result.quotas or ex.quotas
                reservation = req.admission.reservation
                self.rt.budget_seen(team.name, reservation.period if reservation else None,
                                    result.budget_used)
                verdict = result.verdict
                if verdict in (Verdict.ADMIT, Verdict.QUEUED, Verdict.HIT, Verdict.REPLAY):
                    following = False  # the lock is the leader's path's now, or an answer's
                if verdict in (Verdict.ADMIT, Verdict.QUEUED):
                    if self.rt.tracing is not None:
                        self.rt.tracing.decided("miss" if req.lookup else "bypass")
                    if req.stream:
                        return await self._stream(req, result, store, receive, send, ex)
                    return await self._forward(req, result, store, ex)
                if verdict is Verdict.HIT:
                    with tracing.child(self.rt.tracing, "gateway.cache") as span:
                        span.set_attribute("gateway.cache.result", "hit")
                        return await self._hit(req, result, store, ex)
                if verdict is Verdict.REPLAY:
                    ex.cache = "bypass"
                    with tracing.child(self.rt.tracing, "gateway.cache") as span:
                        span.set_attribute("gateway.cache.result", "replay")
                        reply, _, _ = decode_entry(result.entry or b"")
                    reply.headers.append((b"idempotent-replayed", b"true"))
                    return reply
                if verdict is not Verdict.FOLLOW:
                    raise self._rejection(verdict, req, result, ex)
                following = req.admission.idempotency is not None
                with tracing.child(self.rt.tracing, "gateway.cache") as span:
                    leader = await self._follow(req, store)
                    span.set_attribute("gateway.cache.result",
                                       "leader_gone" if leader is None else "coalesced")
                if leader is not None:
                    following = False
                    return await self._coalesced(req, leader, store, ex)
                if attempt + 1 < _FOLLOW_ATTEMPTS:
                    # the leader gave up without an answer: ask again, the quota counted once
                    result, store = await self._admit(replace(req.admission,
                                                              count_quota=False))
            raise UpstreamUnavailable(
                "The upstream answer for this request could not be obtained.", status=503)
        finally:
            if following:  # give back the idempotency lock taken while following
                assert req.admission.idempotency is not None
                await self.rt.finish(store, Completion(
                    req.team.name, req.admission.ticket,
                    idempotency=(req.admission.idempotency[0], None, 0)), first=True)

    async def _admit(self, admission: Admission) -> tuple[AdmitResult, Store]:
        """`Runtime.admit`, in its span when tracing."""
        if self.rt.tracing is None:
            return await self.rt.admit(admission)
        with self.rt.tracing.span("gateway.admit") as span:
            result, store = await self.rt.admit(admission)
            span.set_attributes({"gateway.verdict": result.verdict.name.lower(),
                                 "gateway.store": "shared" if store is self.rt.store
                                 else "fallback"})
            return result, store

    # -- forwarding ------------------------------------------------------------------------------

    async def _forward(self, req: ParsedRequest, result: AdmitResult, store: Store,
                       ex: Exchange) -> Reply:
        if req.lookup:
            ex.cache = "miss"
        seen = ex.upstream = forward.Upstreamed()
        reply: Reply | None = None
        with self.rt.flights.lead(req.flight) if req.flight else _no_flight() as flight:
            try:
                reply = await forward.fetch(self.rt, req, seen,
                                            passage=fairness.Passage(self.rt, req, result, store))
            finally:
                flight.publish(reply)
                if reply is None:  # no answer (an error, or cancelled): refunded, locks freed
                    await self._conclude(req, store, ex, End.NO_ANSWER, None, None)
        await self._conclude(req, store, ex, End.ANSWER, reply, _answer_of(reply))
        return reply

    async def _stream(self, req: ParsedRequest, result: AdmitResult, store: Store,
                      receive: Receive, send: Send, ex: Exchange) -> Reply | None:
        seen = ex.upstream = forward.Upstreamed()

        def start(head: Reply) -> list[tuple[bytes, bytes]]:
            ex.status, ex.streaming = head.status, True
            return self._decorate(head, ex).headers

        # not recorded, a stream's tail stands for it at its end (nothing remembers it; the
        # trace reads the usage there)
        recorded = records_stream(req.billing)
        streamed: forward.Streamed | None = None
        try:
            streamed = await forward.relay(
                self.rt, req, seen, receive, send, start,
                passage=fairness.Passage(self.rt, req, result, store),
                record_limit=self.rt.policy.config.cache.max_entry_bytes if recorded else 0)
        finally:
            if streamed is None:
                await self._conclude(req, store, ex, End.NO_ANSWER, None, None)
        cache_control = _header(streamed.headers, b"cache-control")
        if streamed.end is End.ANSWER:  # not a stream: an error, answered whole
            reply = Reply(streamed.status, streamed.headers, streamed.tail)
            await self._conclude(req, store, ex, End.ANSWER, reply,
                                 read_answer(reply.status, cache_control, reply.body))
            return reply
        if streamed.end is End.CUT:
            ex.status = 499 if streamed.client_gone else 502
        kept = None
        if streamed.end is End.STREAM:
            body = streamed.recorded if recorded else streamed.tail
            kept = (Reply(streamed.status, streamed.headers, body) if body is not None
                    else _too_large_to_replay())
        await self._conclude(req, store, ex, streamed.end, kept, read_answer(
            streamed.status, cache_control, streamed.tail, stream=True))
        return None

    # -- the end of a request ------------------------------------------------------------------

    async def _conclude(self, req: ParsedRequest, store: Store, ex: Exchange, end: End,
                        reply: Reply | None, answer: Answer | None) -> Decision:
        """Settle, cache, remember and own, as the policy decides for this end."""
        account = ex.upstream.account if ex.upstream is not None else None
        try:
            decision = decide(req.billing, end, answer, self.rt.policy.cache_rules)
            completion = self._completion(req, end, decision, reply, account)
        except Exception:  # a defect: give back what the request holds, and say so
            log.exception("settlement failed; the request's reservation is refunded")
            decision = Decision(Charge.REFUND)
            completion = self._completion(req, End.NO_ANSWER, decision, None, account)
        if decision.charge is Charge.SETTLE and account is not None:  # the account's bill
            self.rt.health.spent(account, decision.credits if decision.credits is not None
                                 else req.billing.price)
        if decision.charge is Charge.SETTLE and decision.task is None:
            credits = decision.credits
            ex.credits = from_milli(credits if credits is not None else req.billing.price)
        if decision.saved:
            self.rt.metrics.credits_saved.labels(req.team.name).inc(from_milli(decision.saved))
        if self.rt.tracing is not None:
            self.rt.tracing.answered(req.route, end, reply)
        first = written_first(req.billing, decision)
        with tracing.child(self.rt.tracing, "gateway.bookkeeping") as span:
            span.set_attribute("gateway.bookkeeping.written_first", first)
            await self.rt.finish(store, completion, reservation=req.admission.reservation,
                                 first=first)
        if req.callback is not None and decision.owner is not None and self.rt.webhooks:
            await self.rt.webhooks.watch(req.team.name, decision.owner, req.callback)
        return decision

    def _completion(self, req: ParsedRequest, end: End, decision: Decision,
                    reply: Reply | None, account: str | None) -> Completion:
        """The store's part of a decision (`account`: the upstream account it went through)."""
        a, config = req.admission, self.rt.policy.config
        fields: dict[str, Any] = {"ledger": a.ledger}  # one Completion built, not one per part
        reservation = a.reservation
        leader = end in (End.ANSWER, End.STREAM, End.CUT, End.NO_ANSWER)
        if decision.charge is not Charge.NONE and (decision.task or (leader and reservation)):
            fields["settle"] = STORE_SETTLE[decision.charge]
            if decision.charge is Charge.HOLD:
                assert reservation is not None
                fields.update(reservation_id=reservation.id, period=reservation.period,
                              hold_id=f"task:{decision.task}", hold_ms=self.rt.task_check_ms)
            elif decision.task is not None:
                fields.update(reservation_id=f"task:{decision.task}", charge=decision.credits)
            else:
                assert reservation is not None
                fields.update(reservation_id=reservation.id, period=reservation.period,
                              charge=decision.credits)
        if decision.cache_ttl_s > 0 and reply is not None and req.cache is not None:
            credits = decision.credits if decision.credits is not None else req.billing.price
            entry = encode_entry(reply, credits=credits if decision.task is None else 0,
                                 ttl_s=decision.cache_ttl_s)
            fields["cache_put"] = (req.cache, entry, int(decision.cache_ttl_s * 1000))
            self.rt.metrics.cache_events.labels(req.route, "stored").inc()
        if leader and req.lookup and req.cache is not None:
            fields["release"] = req.cache
        if a.idempotency is not None and end is not End.HIT:
            answer = None
            if decision.remember and reply is not None:
                answer = encode_entry(reply, credits=0, ttl_s=0)
            fields["idempotency"] = (a.idempotency[0], answer, IDEMPOTENCY_TTL_MS)
        if decision.owner is not None:
            ttl_ms = max(config.cache.task_ttl_s, OWNER_MIN_TTL_S) * 1000
            fields.update(task_owner=(decision.owner, ttl_ms), task_account=account)
        if end is End.COALESCED and req.billing.kind in (Kind.SYNC, Kind.CREATE):
            fields["event"] = _cached_event(req, decision.saved)
        return Completion(req.team.name, a.ticket, **fields)

    # -- answers without the upstream ----------------------------------------------------------

    async def _hit(self, req: ParsedRequest, result: AdmitResult, store: Store,
                   ex: Exchange) -> Reply:
        """A cache hit: `admit` already counted it and wrote its ledger and idempotent answer."""
        reply, credits, ttl_s = decode_entry(result.entry or b"")
        ex.cache = "hit"
        reply.headers.append((b"age", str(max(0, int(ttl_s - result.entry_ttl_s))).encode()))
        if credits:
            self.rt.metrics.credits_saved.labels(req.team.name).inc(from_milli(credits))
        # a hit's decision reads its answer only for the task an async endpoint's answer names
        # (`decide`, End.HIT): the cached body is not parsed again for anything else
        answer = _answer_of(reply) if req.billing.kind is Kind.CREATE else None
        decision = decide(req.billing, End.HIT, answer, self.rt.policy.cache_rules)
        if decision.owner is not None:  # an organisation-wide answer: the task is ours too
            await self._conclude(req, store, ex, End.HIT, reply, answer)
        return reply

    async def _coalesced(self, req: ParsedRequest, leader: Reply, store: Store,
                         ex: Exchange) -> Reply:
        """Another request's answer: concluded like a hit, which `admit` could not do."""
        ex.cache = "coalesced"
        await self._conclude(req, store, ex, End.COALESCED, leader, _answer_of(leader))
        return leader

    async def _follow(self, req: ParsedRequest, store: Store) -> Reply | None:
        """Wait for the request already fetching this cache key; None if it gave up."""
        hold_s = req.admission.hold_ms / 1000.0
        if req.flight in self.rt.flights:
            return await self.rt.flights.follow(req.flight, hold_s)
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

    # -- rejections and decoration -------------------------------------------------------------

    def _rejection(self, verdict: Verdict, req: ParsedRequest, result: AdmitResult,
                   ex: Exchange) -> GatewayError:
        team = req.team
        if verdict is Verdict.QUOTA:
            spent = [s.quota for s in result.quotas if s.remaining <= 0]
            keyed = [q for q in spent if q.key]
            ex.reason = "key_quota" if keyed else "quota"
            level = f"Key {req.key_id!r} quota" if keyed else "Team quota"
            which = ", ".join(f"{q.limit} requests per {q.name.removeprefix('key-')}"
                              for q in (keyed or spent)) or "quota"
            return RateLimited(f"{level} exceeded ({which}).", wait_s=result.retry_after_s)
        if verdict in (Verdict.BUDGET, Verdict.KEY_BUDGET):
            key = team.keys.get(req.key_id) if verdict is Verdict.KEY_BUDGET else None
            budget, limit, used = ((key.budget, key.budget_limit, result.key_budget_used)
                                   if key is not None else
                                   (team.budget, team.budget_limit, result.budget_used))
            ex.reason = "key_budget" if key is not None else "budget"
            remaining = from_milli(max((limit or 0) - (used or 0), 0))
            needed = from_milli(req.billing.price)
            level = f"Key {req.key_id!r} budget" if key is not None else "Team budget"
            period = budget.period if budget else "period"
            return InsufficientCredits(
                f"{level} exhausted for this {period}: {remaining} credits remaining, "
                f"{needed} needed.")
        if verdict is Verdict.PACE:
            ex.reason = "pace"
            return fairness.busy(result.retry_after_s)
        if verdict is Verdict.QUEUE_FULL:
            ex.reason = "waiting"
            return fairness.busy(result.retry_after_s, reason="waiting")
        if verdict is Verdict.UNAVAILABLE:
            ex.reason = "upstream"
            return UpstreamUnavailable("No upstream account is left for this request.",
                                       status=503)
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
        if ex.tags_ignored is not None:
            headers.append((IGNORED_HEADER, ex.tags_ignored.encode()))
        if ex.policy_header is not None:
            headers.append((b"ratelimit-policy", ex.policy_header))
            if ex.quotas:
                headers.append((b"ratelimit", state_header(ex.quotas).encode()))
        if reply.status == 429:
            headers[:] = [(k, v) for k, v in headers if k != b"cache-control"]
            headers.append((b"cache-control", b"no-store"))
            if ex.reason in ("pace", "waiting"):  # the upstream allowance, not the team's quota
                team = self.rt.policy.teams.get(ex.team)
                wait = _header(headers, b"retry-after") or b"1"
                headers += fairness.ratelimit_headers(
                    team.upstream_per_minute if team is not None else None,
                    float(wait) if wait.isdigit() else 1.0)
        else:
            # answers are per key: at least `private`, unless the upstream said something stricter
            cache_control = _header(headers, b"cache-control")
            if cache_control is None:
                headers.append((b"cache-control", b"private"))
            elif not any(word in cache_control.lower() for word in _STRICT_CACHE_CONTROL):
                headers[:] = [(k, b"private" if k == b"cache-control" else v)
                              for k, v in headers]
        return reply

    def _observe(self, ex: Exchange, seconds: float) -> None:
        m = self.rt.metrics
        m.requests.labels(ex.team, ex.route, str(ex.status), ex.cache).inc()
        exemplar = None if self.rt.tracing is None else self.rt.tracing.finish_request(ex)
        m.request_duration.labels(ex.route).observe(seconds, exemplar)
        if ex.cache in ("hit", "miss", "coalesced"):
            m.cache_events.labels(ex.route, ex.cache).inc()
        if ex.reason is not None:
            m.rejections.labels(ex.team, ex.reason).inc()
        if self.rt.policy.config.logging.access_log:
            upstream_s = ex.upstream.seconds if ex.upstream is not None else None
            access_log.info("", extra={"fields": {
                "request_id": ex.request_id, "team": ex.team, "key_id": ex.key_id,
                "method": ex.method, "route": ex.route, "model": _short(ex.model),
                "status": ex.status, "cache": ex.cache, "credits": ex.credits,
                "account": ex.upstream.account if ex.upstream is not None else None,
                "upstream_ms": None if upstream_s is None else round(upstream_s * 1000, 2),
                "total_ms": round(seconds * 1000, 2),
            }})


_X_CACHE = {"hit": b"HIT", "miss": b"MISS", "bypass": b"BYPASS", "coalesced": b"COALESCED",
            "none": b"BYPASS"}


class _NoFlight:
    """Stands in for `Flights.lead` when a request does not coalesce."""

    def __enter__(self) -> _NoFlight:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def publish(self, reply: Reply | None) -> None:
        return None


def _no_flight() -> _NoFlight:
    return _NoFlight()


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


async def _no_send(message: Message) -> None:
    raise RuntimeError("nothing is sent for the gateway's own requests")


def _answer_of(reply: Reply) -> Answer:
    return read_answer(reply.status, _header(reply.headers, b"cache-control"), reply.body)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _cached_event(req: ParsedRequest, saved: int) -> bytes:
    """The ledger event of an answer another request paid for (as `admit` writes for a hit)."""
    context = req.admission.reservation.context if req.admission.reservation else b"{}"
    return context[:-1] + b',"kind":"charge","credits":0,"cached":true,"saved":%d}' % saved


def _too_large_to_replay() -> Reply:
    return error_reply(IdempotencyConflict("The first request with this Idempotency-Key was "
                                           "answered with a stream too large to replay."))


def _short(model: str | None) -> str | None:
    return None if model is None else model[:64]
