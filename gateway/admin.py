"""The operators' API under /admin/v1, for admin keys only.

    GET    /admin/v1/teams                       quota, budget, spent and remaining per team
    GET    /admin/v1/teams/{team}/ledger         one team's ledger, paged (?after=<id>&limit=);
                                                 from PostgreSQL when ledger.url is set
    GET    /admin/v1/usage                       totals ?by=team,key,model,route,tag:<name>
                                                 &period=day|month&since=&until=&team=
    GET    /admin/v1/keys                        every key id, its team, revoked or not, its
                                                 lifetime (?expiring_within=7d: only those)
    POST   /admin/v1/keys/{key_id}/revoke        refuse a key at once, on every replica
    DELETE /admin/v1/keys/{key_id}/revoke        accept it again
    DELETE /admin/v1/cache                       flush the cache (?route=...&team=...)
    POST   /admin/v1/reload                      re-read the config file, on every process
    GET    /admin/v1/audit                       who did what: admin actions, config changes
    GET    /admin/v1/accounts                    each upstream account: in rotation or out
                                                 (until when, why), limits, teams, use, credits
    GET    /admin/v1/webhooks/failed             task webhooks given up, oldest first, paged
                                                 (?after=<cursor>&limit=)
    POST   /admin/v1/webhooks/{id}/redeliver     put a failed webhook back to work
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from . import audit
from . import routes as api_routes
from .auth import TeamKey, timestamp
from .budget import from_milli, period_end, period_id, to_milli
from .config import ConfigError, Key, UpstreamAccount, accounts_of
from .errors import InvalidRequest, NotFound, StoreUnavailable
from .ledger import LedgerDB, LedgerUnavailable
from .ledger.report import group, parse_by
from .ledger.report import usage as ledger_usage
from .runtime import Runtime
from .store import StoreError
from .store.base import AccountState, BudgetUsage

PREFIX = "/admin/v1"
_ENTRY_ID = re.compile(r"[0-9]{1,15}-[0-9]{1,19}")  # patterns are used with fullmatch
_DAYS = re.compile(r"([0-9]{1,4})d")
_LIMIT = re.compile(r"-?[0-9]{1,9}")
_HOOK_ID = re.compile(r"msg_[0-9a-f]{32}")
_HOOK_CURSOR = re.compile(r"([0-9]{1,15})-(msg_[0-9a-f]{32})")


def routes() -> list[BaseRoute]:
    return [
        Route(f"{PREFIX}/teams", teams, methods=["GET"]),
        Route(f"{PREFIX}/teams/{{team}}/ledger", ledger, methods=["GET"]),
        Route(f"{PREFIX}/usage", usage, methods=["GET"]),
        Route(f"{PREFIX}/keys", keys, methods=["GET"]),
        Route(f"{PREFIX}/keys/{{key_id}}/revoke", revoke, methods=["POST", "DELETE"]),
        Route(f"{PREFIX}/cache", flush_cache, methods=["DELETE"]),
        Route(f"{PREFIX}/reload", reload, methods=["POST"]),
        Route(f"{PREFIX}/audit", audit_log, methods=["GET"]),
        Route(f"{PREFIX}/accounts", upstream_accounts, methods=["GET"]),
        Route(f"{PREFIX}/webhooks/failed", webhooks_failed, methods=["GET"]),
        Route(f"{PREFIX}/webhooks/{{hook_id}}/redeliver", redeliver_webhook, methods=["POST"]),
    ]


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _authorize(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    authorization = request.headers.get("authorization", "").encode("latin-1")
    request.state.admin = runtime.policy.auth.admin(authorization, runtime.clock())
    return runtime


def _page(request: Request) -> tuple[str, int]:
    """`after` and `limit` of a paged stream (a ledger, the audit log), checked."""
    raw_limit = request.query_params.get("limit", "100")
    if not _LIMIT.fullmatch(raw_limit):
        raise InvalidRequest("limit must be a whole number.")
    after = request.query_params.get("after", "-")
    if after != "-" and not _ENTRY_ID.fullmatch(after):
        raise InvalidRequest("after must be an entry id from a previous page.")
    return after, min(max(int(raw_limit), 1), 1000)


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
    after, limit = _page(request)
    record: LedgerDB | None = request.app.state.ledger
    if record is not None:  # the ledger of record, when configured
        try:
            entries = await record.ledger(team, after=after, limit=limit)
        except LedgerUnavailable:
            raise StoreUnavailable("The ledger database is unreachable; retry shortly.") from None
    else:
        entries = await _store(runtime.store.ledger(team, after=after, limit=limit))
    events = [{"id": e.id, **_event(e.id, e.event)} for e in entries]
    return _json({
        "team": team,
        "entries": events,
        "next": events[-1]["id"] if len(events) == limit else None,
    })


_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_PAGE = 1000


async def usage(request: Request) -> Response:
    """Totals grouped by team, key, model, route or tag (`by`), per day or month (`period`),
    from the ledger of record when there is one, else from the store's ledger."""
    runtime = _authorize(request)
    params = request.query_params
    try:
        by = parse_by(params.get("by", "team"))
    except ValueError as exc:
        raise InvalidRequest(str(exc).replace("--by", "by")) from None
    period = params.get("period")
    if period not in (None, "day", "month"):
        raise InvalidRequest("period must be day or month.")
    team = params.get("team")
    if team is not None and team not in runtime.policy.teams:
        raise NotFound(f"No team named {team!r}.")
    bounds = []
    for name in ("since", "until"):
        value = params.get(name)
        if value is not None and not _DAY.fullmatch(value):
            raise InvalidRequest(f"{name} must be a date, YYYY-MM-DD.")
        try:
            bounds.append(None if value is None else
                          datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC))
        except ValueError:
            raise InvalidRequest(f"{name} must be a date, YYYY-MM-DD.") from None
    since, until = bounds
    record: LedgerDB | None = request.app.state.ledger
    if record is not None:
        try:
            report = await ledger_usage(record, by, period=period,  # type: ignore[arg-type]
                                        since=since, until=until, team=team)
        except LedgerUnavailable:
            raise StoreUnavailable("The ledger database is unreachable; retry shortly.") from None
    else:
        events = []
        since_ms = int(since.timestamp() * 1000) if since is not None else 0
        for name in [team] if team else list(runtime.policy.teams):
            after = f"{since_ms - 1}-{2**64 - 1}" if since_ms > 0 else "-"
            while True:
                page = await _store(runtime.store.ledger(name, after=after, limit=_PAGE))
                events += [_event(e.id, e.event, milli=True) for e in page]
                if len(page) < _PAGE:
                    break
                after = page[-1].id
        if until is not None:
            events = [e for e in events if e["time_ms"] < until.timestamp() * 1000]
        report = group(events, by, period=period)  # type: ignore[arg-type]
    return _json({"header": list(report.header), "rows": [list(row) for row in report.rows]})


def _event(entry_id: str, raw: bytes, *, milli: bool = False) -> dict[str, Any]:
    """A ledger entry as the API shows it: credits in credits (`milli`: as stored)."""
    event: dict[str, Any] = orjson.loads(raw)
    event["time_ms"] = int(entry_id.split("-", 1)[0])
    if not milli:
        for name in ("credits", "reserved", "saved"):
            if name in event:
                event[name] = from_milli(event[name])
    return event


async def keys(request: Request) -> Response:
    runtime = _authorize(request)
    now = runtime.clock()
    listed = runtime.policy.auth.team_keys
    within = request.query_params.get("expiring_within")
    if within is not None:
        days = _DAYS.fullmatch(within)
        if days is None or not 1 <= int(days[1]) <= 3650:
            raise InvalidRequest("expiring_within must be a number of days from 1 to 3650, "
                                 "like 7d.")
        listed = runtime.policy.auth.expiring(now, int(days[1]) * 86400.0)
    revoked = {team: await _store(runtime.store.revoked(team))
               for team in {k.team for k in listed}}
    budgeted = [k for k in listed if k.key.budget is not None]
    usage = await _store(runtime.store.key_budgets([
        (k.team, k.key.id, period_id(k.key.budget.period, now))
        for k in budgeted if k.key.budget is not None]))
    budgets = {k.key.id: _key_budget(k.key, used) for k, used in zip(budgeted, usage,
                                                                      strict=True)}
    return _json({"keys": [_key_state(k, k.key.id in revoked[k.team], now, budgets.get(k.key.id))
                           for k in listed]})


def _key_state(listed: TeamKey, revoked: bool, now: float,
               budget: dict[str, Any] | None) -> dict[str, Any]:
    key = listed.key
    start, end = timestamp(key.not_before, -math.inf), timestamp(key.expires_at, math.inf)
    return {
        "id": key.id,
        "team": listed.team,
        "revoked": revoked,
        "not_before": _time(key.not_before),
        "expires_at": _time(key.expires_at),
        "valid": start <= now < end,  # its current secret, on the clock, revocation aside
        "previous": [{"expires_at": _time(p.expires_at), "valid": now < p.expires_at.timestamp()}
                     for p in key.previous],
        "requests_per_minute": key.requests_per_minute,
        "requests_per_day": key.requests_per_day,
        "budget": budget,
    }


def _key_budget(key: Key, used: BudgetUsage) -> dict[str, Any]:
    """A key's own budget in its current period (inside its team's)."""
    assert key.budget is not None
    limit = to_milli(key.budget.credits)
    return {"credits": key.budget.credits, "period": key.budget.period,
            "spent": from_milli(used.spent), "reserved": from_milli(used.reserved),
            "remaining": from_milli(max(limit - used.spent - used.reserved, 0))}


def _time(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat().replace("+00:00", "Z")


async def revoke(request: Request) -> Response:
    runtime = _authorize(request)
    key_id = request.path_params["key_id"]
    team = runtime.policy.key_owner.get(key_id)
    if team is None:
        raise NotFound(f"No team key with id {key_id!r}.")
    revoked = request.method == "POST"
    await _store(runtime.revoke(team, key_id, revoked))
    await audit.record(runtime.store, request.state.admin, "revoke" if revoked else "unrevoke",
                       team=team, key_id=key_id)
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
    await audit.record(runtime.store, request.state.admin, "cache.flush", route=route,
                       team=team, removed=removed)
    return _json({"removed": removed})


async def reload(request: Request) -> Response:
    """Reload here and on every process sharing the store; say which sections applied, which
    need a restart, and which processes have reloaded (they follow within a heartbeat)."""
    runtime = _authorize(request)
    if runtime.config_path is None:
        raise InvalidRequest("This gateway was not started from a config file.")
    try:
        return _json(await runtime.reload_everywhere(request.state.admin))
    except ConfigError as exc:
        raise InvalidRequest(f"The running config was kept: {exc}") from None


async def audit_log(request: Request) -> Response:
    """The audit log, oldest first, paged like a ledger (?after=<id>&limit=)."""
    runtime = _authorize(request)
    after, limit = _page(request)
    entries = await _store(runtime.store.audit_log(after=after, limit=limit))
    out = [{"id": e.id, "time_ms": int(e.id.split("-", 1)[0]), **orjson.loads(e.event)}
           for e in entries]
    return _json({"entries": out, "next": out[-1]["id"] if len(out) == limit else None})


_OUT_BECAUSE = {401: "the upstream refused its key", 402: "its credits are exhausted"}


async def upstream_accounts(request: Request) -> Response:
    """The upstream accounts as every replica sees them (the store's state), never their keys:
    in rotation or out (until when, why), limits, teams, recent use, the balance watched."""
    runtime = _authorize(request)
    now = runtime.clock()
    counted = runtime.policy.accounts.only is None  # one unpaced account takes no slots
    states = {s.id: s for s in await _store(runtime.health.states())}
    return _json({"accounts": [_account(a, states[a.id], now, counted=counted)
                               for a in accounts_of(runtime.policy.config.upstream)]})


def _account(account: UpstreamAccount, state: AccountState, now: float, *,
             counted: bool) -> dict[str, Any]:
    out = None
    if state.down_s > 0:
        status = state.down_status
        out = {"until": _time_ms(int((now + state.down_s) * 1000)), "status": status,
               "reason": _OUT_BECAUSE.get(status or 0, "refused by the upstream")}
    credits = None
    if account.credits is not None and state.credits_left is not None:
        credits = {"balance": account.credits, "remaining": from_milli(state.credits_left)}
    return {
        "id": account.id,
        "in_rotation": out is None,
        "out_of_rotation": out,
        "requests_per_minute": account.requests_per_minute,
        "burst": account.burst,
        "teams": list(account.teams) if account.teams is not None else None,
        "slots_used_last_minute": state.slots_used if counted else None,
        "credits": credits,
    }


async def webhooks_failed(request: Request) -> Response:
    """Failed task webhooks: where they went (the origin only: a path or query may hold the
    receiver's own secret), why they failed, and the cursor of the next page."""
    runtime = _authorize(request)
    raw_limit = request.query_params.get("limit", "100")
    if not _LIMIT.fullmatch(raw_limit):
        raise InvalidRequest("limit must be a whole number.")
    limit = min(max(int(raw_limit), 1), 1000)
    after = None
    raw_after = request.query_params.get("after")
    if raw_after is not None:
        cursor = _HOOK_CURSOR.fullmatch(raw_after)
        if cursor is None:
            raise InvalidRequest("after must be the next cursor of a previous page.")
        after = (int(cursor[1]), cursor[2])
    assert runtime.webhooks is not None, "create_app sets it"
    hooks = await _store(runtime.webhooks.failed(after=after, limit=limit))
    out = [{
        "id": hook.id,
        "team": hook.team,
        "task_id": hook.task_id,
        "callback": _origin(hook.url),
        "error": hook.error,
        "attempts": hook.attempts,
        "polls": hook.polls,
        "task_status": hook.status or None,
        "created_at": _time_ms(hook.created_ms),
        "failed_at": _time_ms(hook.failed_ms),
    } for hook in hooks]
    last = hooks[-1] if len(hooks) == limit else None
    return _json({"webhooks": out, "next": f"{last.failed_ms}-{last.id}" if last else None})


async def redeliver_webhook(request: Request) -> Response:
    """A failed webhook goes back to work at once, with its webhook-id: delivered again (or,
    when its task had not ended, its task polled again)."""
    runtime = _authorize(request)
    hook_id = request.path_params["hook_id"]
    assert runtime.webhooks is not None, "create_app sets it"
    if not _HOOK_ID.fullmatch(hook_id) or not await _store(runtime.webhooks.redeliver(hook_id)):
        raise NotFound("No failed webhook with that id.")
    return _json({"id": hook_id, "redelivering": True})


def _origin(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def _time_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")
