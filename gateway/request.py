"""A proxied request, parsed and checked once: what it is, what it costs, what it asks of the
store. Everything after this point reads the immutable `ParsedRequest`."""

from __future__ import annotations

from typing import Any

import orjson

from . import callbacks, inbound, routes
from .asgi import Headers
from .attribution import TAGS_HEADER, parse_tags
from .budget import period_id, to_milli
from .cache import client_directive, request_digest
from .errors import InvalidRequest, NotFound, PermissionDenied
from .policy import Policy, TeamPolicy
from .records import record
from .settlement import Billing, Kind
from .store.base import Admission, CacheRef, Reservation
from .store.keys import digest as key_digest
from .upstream import request_headers


@record
class ParsedRequest:
    request_id: str
    method: str
    path: str  # below /api/v1/
    route: str  # the bounded label
    query: bytes
    team: TeamPolicy
    key_id: str
    model: str | None
    client_headers: Headers  # as the client sent them (`upstream_headers`: as forwarded)
    body: bytes  # what the upstream receives: for JSON, exactly the document that was checked
    stream: bool
    task_id: str | None
    cache: CacheRef | None  # where the answer may be cached (None: never)
    lookup: bool  # read the cache and coalesce, rather than only refresh it
    flight: str  # the in-process single-flight key ('' when not coalescing)
    billing: Billing
    admission: Admission
    deadline_s: float  # the whole upstream call, pacing wait and retries included
    tags_ignored: str | None  # what `X-Gateway-Tags-Ignored` tells the client, if anything
    callback: callbacks.Callback | None = None  # X-Callback-URL: a webhook when the task ends


class Head:
    """The few request headers the gateway reads, found in one pass."""

    __slots__ = ("authorization", "cache_control", "callback_secret_id", "callback_url",
                 "content_length", "content_type", "idempotency_key", "tags")

    def __init__(self, headers: Headers) -> None:
        self.authorization: bytes | None = None
        self.cache_control: bytes | None = None
        self.content_type: bytes | None = None
        self.idempotency_key: bytes | None = None
        self.content_length: int | None = None
        self.tags: bytes | None = None
        self.callback_url: bytes | None = None
        self.callback_secret_id: bytes | None = None
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
            elif name == TAGS_HEADER:  # repeated: one list
                self.tags = value if self.tags is None else self.tags + b"," + value
            elif name == b"x-callback-url":
                self.callback_url = value.strip()
            elif name == b"x-callback-secret-id":
                self.callback_secret_id = value.strip()


def carries_json(method: str) -> bool:
    """Whether a request's body is a JSON document the gateway checks and passes on in
    canonical form (`read_json`), and so is sent upstream as `application/json`: a POST's."""
    return method == "POST"


def read_json(method: str, body: bytes, content_type: bytes | None
              ) -> tuple[dict[str, Any] | None, str | None, bytes]:
    """A POST's JSON document, its model (both required) and its canonical form, which the
    upstream gets: the document that was checked (with a name given twice, the upstream and
    the gateway could otherwise read different models). None, None and the body as it came
    for other methods."""
    if not carries_json(method):
        return None, None, body
    payload, canonical = inbound.json_object(body, content_type)
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("The request body must carry a 'model' string.")
    return payload, model, canonical


def parse(policy: Policy, team: TeamPolicy, key_id: str, *, request_id: str, method: str,
          path: str, route: str, query: bytes, head: Head, raw_headers: Headers, body: bytes,
          payload: dict[str, Any] | None, model: str | None, ticket: str,
          now: float) -> ParsedRequest:
    """Check a request against the team's policy and say what it asks of the store; raises
    the `GatewayError` a client must see when it cannot go further. `payload`, `model` and
    `body` come from `read_json`."""
    config = policy.config
    if payload is not None and team.models is not None and model not in team.models:
        raise PermissionDenied(f"Model {model!r} is not allowed for this team.")
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

    tags, tags_ignored = parse_tags(head.tags, policy.tags)
    fields: dict[str, Any] = {"event_id": ticket, "team": team.name, "key_id": key_id,
                              "model": model, "route": route, "request_id": request_id}
    if tags:
        fields["tags"] = tags  # ledger fields only, never metric labels
    context = inbound.fitted(orjson.dumps(fields))
    price = 0
    reservation = None
    limits = team.keys.get(key_id)
    if method == "POST":
        price = to_milli(config.price(model or ""))
        period = period_id(team.budget.period if team.budget else "month", now)
        # a key with a budget of its own: its counters are named by key and by its own period
        counters = (f"{key_id}/{period_id(limits.budget.period, now)}"
                    if limits and limits.budget else "")
        reservation = Reservation(ticket, period, price, context, key=counters)
    hold_ms, deadline_s = (policy.stream_hold_ms, policy.stream_deadline_s) if stream else (
        policy.hold_ms, policy.deadline_s)
    admission = Admission(
        team=team.name,
        key_id=key_id,
        ticket=ticket,
        hold_ms=hold_ms,
        quotas=team.limits(key_id)[0],
        idempotency=idempotency,
        task_id=task_id,
        cache=cache if lookup else None,
        reservation=reservation,
        budget_limit=team.budget_limit,
        key_budget_limit=limits.budget_limit if limits else None,
        slot=team.slot,
        hit_event=context if lookup and method == "POST" else None,
        ledger=policy.ledger_trim(now),
    )
    flight = ""
    if lookup and cache is not None:
        flight = f"{'' if cache.shared else team.name}:{cache.route}:{cache.digest}"
    billing = Billing(kind, price=price, task_id=task_id, idempotent=idempotency is not None,
                      cacheable=cache is not None, shared=cache is not None and cache.shared)
    callback = callbacks.from_request(team.callbacks, head.callback_url, head.callback_secret_id,
                                      async_endpoint=kind is Kind.CREATE)
    return ParsedRequest(request_id, method, path, route, query, team, key_id, model, raw_headers,
                         body, stream, task_id, cache, lookup, flight, billing, admission,
                         deadline_s, tags_ignored, callback)


_CALLBACK_HEADERS = (b"x-callback-url", b"x-callback-secret-id")


def upstream_headers(req: ParsedRequest) -> Headers:
    """The headers the upstream receives: made only when the request is forwarded (a cache hit
    or a refusal never needs them). The webhook headers are the gateway's own, not the
    upstream's business."""
    headers = request_headers(req.client_headers, request_id=req.request_id.encode(),
                              json_body=carries_json(req.method))
    if req.callback is not None:
        headers = [(k, v) for k, v in headers if k not in _CALLBACK_HEADERS]
    return headers


def _kind(method: str, path: str) -> Kind:
    if method == "POST":
        return Kind.CREATE if path in routes.ASYNC_ENDPOINTS else Kind.SYNC
    if path.startswith(routes.TASKS + "/"):
        return Kind.POLL if method == "GET" else Kind.PEEK if method == "HEAD" else Kind.READ
    return Kind.READ
