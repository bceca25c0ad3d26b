"""The operators' API under /admin/v1, for admin keys only.

    GET    /admin/v1/teams                       quota, budget, spent and remaining per team
    GET    /admin/v1/teams/{team}/ledger         one team's ledger, paged (?after=<id>&limit=)
    GET    /admin/v1/keys                        every key id, its team, revoked or not
    POST   /admin/v1/keys/{key_id}/revoke        refuse a key at once, on every replica
    DELETE /admin/v1/keys/{key_id}/revoke        accept it again
    DELETE /admin/v1/cache                       flush the cache (?route=...&team=...)
    POST   /admin/v1/reload                      re-read the config file
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from . import routes as api_routes
from .auth import bearer_token, hash_key
from .budget import from_milli, period_end, period_id
from .config import ConfigError
from .errors import (
    AuthenticationError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    StoreUnavailable,
)
from .runtime import Runtime
from .store import StoreError

PREFIX = "/admin/v1"
_ENTRY_ID = re.compile(r"[0-9]{1,15}-[0-9]{1,19}")  # patterns are used with fullmatch
_LIMIT = re.compile(r"-?[0-9]{1,9}")


def routes() -> list[BaseRoute]:
    return [
        Route(f"{PREFIX}/teams", teams, methods=["GET"]),
        Route(f"{PREFIX}/teams/{{team}}/ledger", ledger, methods=["GET"]),
        Route(f"{PREFIX}/keys", keys, methods=["GET"]),
        Route(f"{PREFIX}/keys/{{key_id}}/revoke", revoke, methods=["POST", "DELETE"]),
        Route(f"{PREFIX}/cache", flush_cache, methods=["DELETE"]),
        Route(f"{PREFIX}/reload", reload, methods=["POST"]),
    ]


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _authorize(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    token = bearer_token(request.headers.get("authorization", "").encode("latin-1"))
    digest = hash_key(token) if token is not None else None
    if digest is not None and digest in runtime.policy.admin_keys:
        return runtime
    if digest is not None and digest in runtime.policy.keys:
        raise PermissionDenied("This key is not an admin key.")
    raise AuthenticationError("Missing or invalid admin key.")


async def _store(call: Any) -> Any:
    try:
        return await call
    except StoreError:
        raise StoreUnavailable() from None


async def teams(request: Request) -> Response:
    runtime = _authorize(request)
    policy = runtime.policy
    now = runtime.clock()
    periods = {name: period_id(t.budget.period if t.budget else "month", now)
               for name, t in policy.teams.items()}
    usage = await _store(runtime.store.budgets(list(periods.items())))
    out = []
    for (name, team), used in zip(policy.teams.items(), usage, strict=True):
        budget = None
        if team.budget is not None and team.budget_limit is not None:
            end = period_end(team.budget.period, now)
            budget = {
                "credits": team.budget.credits,
                "period": team.budget.period,
                "period_ends": end.isoformat() if end else None,
                "remaining": from_milli(team.budget_limit - used.spent - used.reserved),
            }
        out.append({
            "team": name,
            "quota": {q.name: q.limit for q in team.quotas},
            "models": sorted(team.models) if team.models is not None else None,
            "budget": budget,
            "period": periods[name],
            "spent": from_milli(used.spent),
            "reserved": from_milli(used.reserved),
        })
    return _json({"teams": out})


async def ledger(request: Request) -> Response:
    runtime = _authorize(request)
    team = request.path_params["team"]
    if team not in runtime.policy.teams:
        raise NotFound(f"No team named {team!r}.")
    raw_limit = request.query_params.get("limit", "100")
    if not _LIMIT.fullmatch(raw_limit):
        raise InvalidRequest("limit must be a whole number.")
    limit = min(max(int(raw_limit), 1), 1000)
    after = request.query_params.get("after", "-")
    if after != "-" and not _ENTRY_ID.fullmatch(after):
        raise InvalidRequest("after must be an entry id from a previous page.")
    entries = await _store(runtime.store.ledger(team, after=after, limit=limit))
    events = [{"id": e.id, **_event(e.id, e.event)} for e in entries]
    return _json({
        "team": team,
        "entries": events,
        "next": events[-1]["id"] if len(events) == limit else None,
    })


def _event(entry_id: str, raw: bytes) -> dict[str, Any]:
    event: dict[str, Any] = orjson.loads(raw)
    event["time_ms"] = int(entry_id.split("-", 1)[0])
    for name in ("credits", "reserved", "saved"):
        if name in event:
            event[name] = from_milli(event[name])
    return event


async def keys(request: Request) -> Response:
    runtime = _authorize(request)
    out = []
    for team in runtime.policy.teams:
        revoked = await _store(runtime.store.revoked(team))
        out += [{"id": k.id, "team": team, "revoked": k.id in revoked}
                for k in runtime.policy.config.teams[team].keys]
    return _json({"keys": out})


async def revoke(request: Request) -> Response:
    runtime = _authorize(request)
    key_id = request.path_params["key_id"]
    team = runtime.policy.key_owner.get(key_id)
    if team is None:
        raise NotFound(f"No team key with id {key_id!r}.")
    revoked = request.method == "POST"
    await _store(runtime.store.revoke(team, key_id, revoked))
    return _json({"id": key_id, "team": team, "revoked": revoked})


async def flush_cache(request: Request) -> Response:
    runtime = _authorize(request)
    route = request.query_params.get("route")
    team = request.query_params.get("team")
    if route is not None and route not in api_routes.ROUTES:
        raise InvalidRequest(f"route must be one of {', '.join(api_routes.ROUTES)}.")
    if team is not None and team not in runtime.policy.teams:
        raise NotFound(f"No team named {team!r}.")
    removed = await _store(runtime.store.flush_cache(route=route, team=team))
    return _json({"removed": removed})


async def reload(request: Request) -> Response:
    runtime = _authorize(request)
    path = request.app.state.config_path
    if path is None:
        raise InvalidRequest("This gateway was not started from a config file.")
    try:
        runtime.reload(path)
    except ConfigError as exc:
        raise InvalidRequest(f"The running config was kept: {exc}") from None
    return _json({"reloaded": True})
