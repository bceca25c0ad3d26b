"""A proxied request, parsed and checked once: what it is, what it costs, what it asks of the
store. Everything after this point reads the immutable `ParsedRequest`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from . import inbound, routes
from .asgi import Headers
from .budget import period_id, to_milli
from .cache import canonical_json, client_directive, request_digest
from .errors import InvalidRequest, NotFound, PermissionDenied
from .policy import Policy, TeamPolicy
from .settlement import Billing, Kind
from .store.base import Admission, CacheRef, Reservation
from .store.keys import digest as key_digest
from .upstream import request_headers


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    request_id: str
    method: str
    path: str  # below /api/v1/
    route: str  # the bounded label
    query: bytes
    team: TeamPolicy
    key_id: str
    model: str | None
    headers: Headers  # what the upstream receives
    body: bytes  # what the upstream receives: for JSON, exactly the document that was checked
    stream: bool
    task_id: str | None
    cache: CacheRef | None  # where the answer may be cached (None: never)
    lookup: bool  # read the cache and coalesce, rather than only refresh it
    flight: str  # the in-process single-flight key ('' when not coalescing)
    billing: Billing
    admission: Admission
    deadline_s: float  # the whole upstream call, pacing wait and retries included


class Head:
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
                if not value.isdigit() or len(value) > 18:
                    raise InvalidRequest("Content-Length is not a number.")
                self.content_length = int(value)
            elif name == b"cache-control":
                self.cache_control = value
            elif name == b"idempotency-key":
                self.idempotency_key = value.strip()


def read_json(method: str, body: bytes, content_type: bytes | None
              ) -> tuple[dict[str, Any] | None, str | None]:
    """A POST's JSON document and its model (both required); None for other methods."""
    if method != "POST":
        return None, None
    payload = inbound.json_object(body, content_type)
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("The request body must carry a 'model' string.")
    return payload, model


def parse(policy: Policy, team: TeamPolicy, key_id: str, *, request_id: str, method: str,
          path: str, route: str, query: bytes, head: Head, raw_headers: Headers, body: bytes,
          payload: dict[str, Any] | None, model: str | None, ticket: str,
          now: float) -> ParsedRequest:
    """Check a request against the team's policy and say what it asks of the store; raises
    the `GatewayError` a client must see when it cannot go further. `payload` and `model`
    come from `read_json`."""
    config = policy.config
    if payload is not None:
        if team.models is not None and model not in team.models:
            raise PermissionDenied(f"Model {model!r} is not allowed for this team.")
        # the upstream gets the document that was checked: with a name given twice, the
        # upstream and the gateway could otherwise read different models
        body = canonical_json(payload)
    kind = _kind(method, path)
    stream = kind is Kind.SYNC and payload is not None and payload.get("stream") is True

    task_id = None
    if route == routes.TASKS:
        task_id = routes.task_id_of(path)
        if task_id is None or method not in ("GET", "HEAD"):
            raise NotFound("Task not found.")

    directive = client_directive(head.cache_control)
    cache: CacheRef | None = None
    shared = config.cache.scope == "organisation"
    if directive != "no-store" and not stream and method in ("GET", "POST"):
        if kind is Kind.POLL:
            cache = CacheRef(routes.TASKS, request_digest(task_id.encode() if task_id else b"",
                                                          query))
        elif config.cache.ttl_s > 0 and (method == "GET" or path in config.cache.endpoints):
            team_part = b"" if shared else team.name.encode()
            cache = CacheRef(route, request_digest(method.encode(), path.encode(), query, body,
                                                   team_part), shared)
    lookup = cache is not None and directive != "no-cache"

    idempotency = None
    if method == "POST" and head.idempotency_key is not None:
        key = head.idempotency_key
        if not key or len(key) > 255 or not all(0x21 <= c <= 0x7E for c in key):
            raise InvalidRequest("Idempotency-Key must be 1 to 255 visible ASCII characters.")
        idempotency = (key_digest(key.decode()), request_digest(path.encode(), query, body))

    context = orjson.dumps({"event_id": ticket, "team": team.name, "key_id": key_id,
                            "model": model, "route": route, "request_id": request_id})
    price = 0
    reservation = None
    if method == "POST":
        price = to_milli(config.price(model or ""))
        period = period_id(team.budget.period if team.budget else "month", now)
        reservation = Reservation(ticket, period, price, context)
    hold_ms, deadline_s = (policy.stream_hold_ms, policy.stream_deadline_s) if stream else (
        policy.hold_ms, policy.deadline_s)
    admission = Admission(
        team=team.name,
        key_id=key_id,
        ticket=ticket,
        hold_ms=hold_ms,
        quotas=team.quotas,
        idempotency=idempotency,
        task_id=task_id,
        cache=cache if lookup else None,
        reservation=reservation,
        budget_limit=team.budget_limit,
        slot=team.slot,
        hit_event=context if lookup and method == "POST" else None,
        ledger=policy.ledger_trim(now),
    )
    flight = ""
    if lookup and cache is not None:
        flight = f"{'' if cache.shared else team.name}:{cache.route}:{cache.digest}"
    billing = Billing(kind, price=price, task_id=task_id, idempotent=idempotency is not None,
                      cacheable=cache is not None, shared=cache is not None and cache.shared)
    headers = request_headers(raw_headers, request_id=request_id.encode(),
                              json_body=payload is not None)
    return ParsedRequest(request_id, method, path, route, query, team, key_id, model, headers,
                         body, stream, task_id, cache, lookup, flight, billing, admission,
                         deadline_s)


def _kind(method: str, path: str) -> Kind:
    if method == "POST":
        return Kind.CREATE if path in routes.ASYNC_ENDPOINTS else Kind.SYNC
    if path.startswith(routes.TASKS + "/"):
        return Kind.POLL if method == "GET" else Kind.PEEK if method == "HEAD" else Kind.READ
    return Kind.READ
