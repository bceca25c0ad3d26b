"""The OpenAPI document of the gateway's own surface, served at GET /openapi.json.

Built in code from plain dicts when asked for (nothing happens at import time beyond constants),
and kept accurate to the handlers: `gateway/proxy.py` for everything under /api/v1/,
`gateway/app.py` for the probes and `gateway/admin.py` for /admin/v1. `tests/test_openapi.py`
validates it, checks that it lists exactly the routes the app serves, and fuzzes a running
gateway against it.
"""

from __future__ import annotations

from typing import Any

from . import __version__
from .routes import ASYNC_ENDPOINTS, CHAT, ROUTES

API = "/api/v1"
ADMIN = "/admin/v1"
OPENAPI_VERSION = "3.0.3"

# Every `type` an error body can carry: the gateway's own, and the upstream's `server_error`.
ERROR_TYPES = (
    "invalid_request",
    "authentication_error",
    "permission_denied",
    "insufficient_credits",
    "not_found",
    "request_too_large",
    "rate_limit",
    "upstream_unavailable",
    "store_unavailable",
    "server_error",
)

Json = dict[str, Any]

_ASYNC = {  # endpoint -> (operationId, summary)
    "images/generations": ("createImageGeneration", "Generate images (asynchronous task)"),
    "videos/generations": ("createVideoGeneration", "Generate a video (asynchronous task)"),
    "audio/music": ("createMusic", "Generate music (asynchronous task)"),
    "audio/speech": ("createSpeech", "Synthesise speech (asynchronous task)"),
    "images/tools/remove-bg": ("removeBackground",
                               "Remove an image's background (asynchronous task)"),
}

# Why each status can come back from a proxied endpoint. "Upstream" errors are the upstream's
# own answers, passed through unchanged (and never charged).
_WHY = {
    400: "`invalid_request`: the body is not JSON or not an object, `model` is missing or not a "
         "non-empty string, `Idempotency-Key` is malformed, `Content-Length` is not a number, "
         "`X-Callback-URL` is refused (not an asynchronous endpoint, not allowed for the team, "
         "or it leads to a private address); or the upstream's own 400 about a model "
         "parameter.",
    401: "`authentication_error`: the team key is missing, unknown, malformed or revoked.",
    402: "`insufficient_credits`: the team's budget for this period cannot hold the model's "
         "price (the message says how many credits remain and how many were needed).",
    403: "`permission_denied`: the model is not in the team's allow-list.",
    404: "`not_found`: the upstream's own 404 (an unknown model, say).",
    409: "`invalid_request`: a request with this `Idempotency-Key` is still in flight.",
    413: "`request_too_large`: the body is larger than `listen.max_body_bytes` (25 MiB).",
    415: "`invalid_request`: the body's `Content-Type` is not JSON.",
    422: "`invalid_request`: this `Idempotency-Key` was already used with another request.",
    429: "`rate_limit`: the team's quota or the organisation's upstream allowance is spent, or "
         "the upstream throttled the account; retry after `Retry-After` seconds.",
    500: "`server_error`: the upstream's own failure, passed through (the gateway never "
         "answers 500 itself).",
    502: "`upstream_unavailable`: the upstream could not be reached, closed the connection, or "
         "refused the organisation's key (the upstream account needs attention).",
    503: "`store_unavailable`: the gateway's store is unreachable (`Retry-After: 1`); or "
         "`upstream_unavailable`: the upstream account needs attention, or the answer of an "
         "identical request in flight could not be obtained; or the upstream's own 503.",
    504: "`upstream_unavailable`: the upstream did not answer in time.",
}
_WHY_GET = {
    **_WHY,
    400: "`invalid_request`: `Content-Length` is not a number.",
    404: "`not_found`: no such task, or another team's task.",
}
_POST_ERRORS = (400, 401, 402, 403, 404, 409, 413, 415, 422, 429, 500, 502, 503, 504)
_GET_ERRORS = (400, 401, 404, 413, 429, 500, 502, 503, 504)


def document() -> Json:
    """The whole document, a fresh dict on every call."""
    paths: Json = {f"{API}/{endpoint}": {"post": _async_operation(endpoint)}
                   for endpoint in sorted(ASYNC_ENDPOINTS)}
    paths[f"{API}/{CHAT}"] = {"post": _chat_operation()}
    paths[f"{API}/tasks/{{task_id}}"] = {"get": _task_operation()}
    paths.update(_site_paths())
    paths.update(_admin_paths())
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "aio-gateway",
            "version": __version__,
            "description": (
                "The organisation-wide gateway to API in One (apiin.one). Teams call "
                f"`{API}/...` with their own key exactly as they would call the upstream; the "
                "gateway swaps the key, enforces the team's quotas and credit budget, answers "
                "repeated requests and finished task results from cache, and exports "
                "Prometheus metrics. Every path under `/api/v1/` is forwarded; the seven "
                "endpoints below are the upstream's documented ones. Errors made by the "
                "gateway use the upstream's error shape (`Error`)."
            ),
        },
        "servers": [{"url": "/", "description": "this gateway"}],
        "tags": [
            {"name": "api", "description": "The upstream's API, proxied (team key)."},
            {"name": "probes", "description": "Liveness, readiness, metrics, this document."},
            {"name": "admin", "description": "The operators' API (admin key)."},
        ],
        "paths": paths,
        "components": _components(),
    }


# -- proxied endpoints ------------------------------------------------------------------------


def _async_operation(endpoint: str) -> Json:
    operation_id, summary = _ASYNC[endpoint]
    return {
        "tags": ["api"],
        "operationId": operation_id,
        "summary": summary,
        "description": (
            "Answers at once with a pending task; poll `GET /api/v1/tasks/{task_id}` until it "
            "is finished, or send `X-Callback-URL` and the gateway polls it for you and POSTs "
            "its final status there (a signed webhook). The model's price is reserved from the "
            "team's budget and settled to the task's `credits_consumed` when its final status "
            "is seen. A callback URL the team's `callbacks.allow` does not list, or that leads "
            "to a private, loopback or link-local address, answers 400 before anything is "
            "reserved or forwarded."
        ),
        "security": [{"teamKey": []}],
        "parameters": [*_post_parameters(), {"$ref": "#/components/parameters/CallbackUrl"},
                       {"$ref": "#/components/parameters/CallbackSecretId"}],
        "requestBody": _json_body("#/components/schemas/TaskRequest"),
        "responses": _proxied_responses(
            "POST", _content("#/components/schemas/Task"), "The task was created.",
        ),
    }


def _chat_operation() -> Json:
    return {
        "tags": ["api"],
        "operationId": "createChatCompletion",
        "summary": "Chat completion (synchronous, OpenAI-compatible)",
        "description": (
            "Identical requests are answered from the cache (`X-Cache: HIT`) unless the client "
            "sends `Cache-Control: no-cache` or `no-store`. With `\"stream\": true` the answer is "
            "server-sent events, passed through event by event (never cached)."
        ),
        "security": [{"teamKey": []}],
        "parameters": _post_parameters(),
        "requestBody": _json_body("#/components/schemas/ChatCompletionRequest"),
        "responses": _proxied_responses(
            "POST",
            {
                **_content("#/components/schemas/ChatCompletion"),
                "text/event-stream": {"schema": {"$ref": "#/components/schemas/ChatEvent"}},
            },
            "The completion (JSON), or its events when `stream` is true.",
        ),
    }


def _task_operation() -> Json:
    return {
        "tags": ["api"],
        "operationId": "getTask",
        "summary": "A task's status",
        "description": (
            "Another team's task answers 404. Finished results come from the cache; running "
            "tasks are cached for at most `cache.pending_task_ttl_s`."
        ),
        "security": [{"teamKey": []}],
        "parameters": [
            {
                "name": "task_id",
                "in": "path",
                "required": True,
                "description": "The `id` of the task creation's answer.",
                "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,128}$",
                           "example": "task_abc123"},
            },
            *_common_parameters(),
        ],
        "responses": _proxied_responses(
            "GET", _content("#/components/schemas/TaskStatus"), "The task's current status.",
        ),
    }


def _post_parameters() -> list[Json]:
    return [{"$ref": "#/components/parameters/IdempotencyKey"}, *_common_parameters()]


def _common_parameters() -> list[Json]:
    return [{"$ref": "#/components/parameters/CacheControl"},
            {"$ref": "#/components/parameters/RequestId"}]


def _json_body(ref: str) -> Json:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": ref}}}}


def _content(ref: str) -> Json:
    return {"application/json": {"schema": {"$ref": ref}}}


def _proxied_responses(method: str, ok_content: Json, ok_description: str) -> Json:
    replayable = method == "POST"
    responses: Json = {"200": {
        "description": ok_description,
        "headers": _proxied_headers(ok=True, replayable=replayable),
        "content": ok_content,
    }}
    for status in _POST_ERRORS if method == "POST" else _GET_ERRORS:
        headers = _proxied_headers(
            ok=False,
            # an answer kept for an Idempotency-Key replay: under 500, and never a 429
            replayable=replayable and status < 500 and status != 429,
        )
        if status == 429:
            headers["Retry-After"] = {"$ref": "#/components/headers/RetryAfterRequired"}
            headers["Cache-Control"] = {"$ref": "#/components/headers/CacheControlNoStore"}
        elif status == 503:
            headers["Retry-After"] = {"$ref": "#/components/headers/RetryAfter"}
        responses[str(status)] = _error((_WHY if method == "POST" else _WHY_GET)[status], headers)
    return responses


def _proxied_headers(*, ok: bool, replayable: bool) -> Json:
    headers: Json = {
        "X-Request-ID": {"$ref": "#/components/headers/XRequestId"},
        "X-Cache": {"$ref": "#/components/headers/XCacheRequired" if ok
                    else "#/components/headers/XCache"},
        "RateLimit-Policy": {"$ref": "#/components/headers/RateLimitPolicy"},
        "RateLimit": {"$ref": "#/components/headers/RateLimit"},
        "Cache-Control": {"$ref": "#/components/headers/CacheControl"},
    }
    if ok:
        headers["Age"] = {"$ref": "#/components/headers/Age"}
    if replayable:
        headers["Idempotent-Replayed"] = {"$ref": "#/components/headers/IdempotentReplayed"}
    return headers


def _error(description: str, headers: Json | None = None) -> Json:
    return {
        "description": description,
        "headers": headers or {"X-Request-ID": {"$ref": "#/components/headers/XRequestId"}},
        "content": _content("#/components/schemas/Error"),
    }


# -- probes -----------------------------------------------------------------------------------


def _site_paths() -> Json:
    request_id = {"X-Request-ID": {"$ref": "#/components/headers/XRequestId"}}
    return {
        "/healthz": {"get": {
            "tags": ["probes"],
            "operationId": "healthz",
            "summary": "Liveness: the process answers (whatever the store's state)",
            "security": [],
            "responses": {"200": {
                "description": "Alive.",
                "headers": request_id,
                "content": {"application/json": {"schema": {
                    "type": "object", "required": ["status"],
                    "properties": {"status": {"type": "string", "enum": ["ok"]}},
                }}},
            }},
        }},
        "/readyz": {"get": {
            "tags": ["probes"],
            "operationId": "readyz",
            "summary": "Readiness: the config is loaded and the store answers",
            "security": [],
            "responses": {
                "200": {
                    "description": "Ready; `degraded` when the store is unreachable and "
                                   "`store.on_error` is `open`.",
                    "headers": request_id,
                    "content": {"application/json": {"schema": {
                        "type": "object", "required": ["status", "store"],
                        "properties": {
                            "status": {"type": "string", "enum": ["ready", "degraded"]},
                            "store": {"type": "string", "enum": ["ok", "unreachable"]},
                        },
                    }}},
                },
                "503": _error(
                    "`store_unavailable`: the store is unreachable and `store.on_error` is "
                    "`closed`.",
                    {**request_id,
                     "Retry-After": {"$ref": "#/components/headers/RetryAfterRequired"}},
                ),
            },
        }},
        "/metrics": {"get": {
            "tags": ["probes"],
            "operationId": "metrics",
            "summary": "Prometheus metrics (text exposition format)",
            "security": [{}, {"metricsToken": []}],
            "responses": {
                "200": {
                    "description": "The gateway's metrics; budgets are read from the store, "
                                   "so every replica reports the same.",
                    "headers": request_id,
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                "401": _error("`authentication_error`: `metrics.bearer_token` is set and the "
                              "request does not carry it.", request_id),
            },
        }},
        "/openapi.json": {"get": {
            "tags": ["probes"],
            "operationId": "openapi",
            "summary": "This document",
            "security": [],
            "responses": {"200": {
                "description": "The OpenAPI document of the gateway's surface.",
                "headers": request_id,
                "content": {"application/json": {"schema": {
                    "type": "object", "required": ["openapi", "info", "paths"],
                }}},
            }},
        }},
    }


# -- the operators' API -----------------------------------------------------------------------


def _admin_paths() -> Json:
    key_id = {
        "name": "key_id", "in": "path", "required": True,
        "description": "A team key's `id` from the config.",
        "schema": {"type": "string"},
    }
    revoke_errors = _admin_errors(404, 503, not_found="No team key with this id.")
    return {
        f"{ADMIN}/teams": {"get": _admin_operation(
            "listTeams", "Every team: quotas, allowed models, budget, spent and remaining",
            _admin_ok("#/components/schemas/TeamList"), _admin_errors(503),
        )},
        f"{ADMIN}/teams/{{team}}/ledger": {"get": _admin_operation(
            "getTeamLedger", "One team's usage ledger, oldest first, paged (from the PostgreSQL "
            "ledger of record when ledger.url is set)",
            _admin_ok("#/components/schemas/Ledger"),
            _admin_errors(400, 404, 503, bad_request="`limit` is not a whole number, or `after` "
                          "is not an entry id.", not_found="No team with this name."),
            parameters=[
                {"name": "team", "in": "path", "required": True,
                 "description": "A team's name from the config.", "schema": {"type": "string"}},
                *PAGING,
            ],
        )},
        f"{ADMIN}/audit": {"get": _admin_operation(
            "getAudit", "The audit log, oldest first, paged: admin actions (revoke, unrevoke, "
            "cache.flush, reload) with who did them and what changed (key ids, never secrets)",
            _admin_ok("#/components/schemas/Audit"),
            _admin_errors(400, 503, bad_request="`limit` is not a whole number, or `after` "
                          "is not an entry id."),
            parameters=PAGING,
        )},
        f"{ADMIN}/usage": {"get": _admin_operation(
            "getUsage", "Usage totals grouped by team, key, model, route or tag, per day or "
            "month (from the PostgreSQL ledger of record when ledger.url is set, else from the "
            "store's ledger)",
            _admin_ok("#/components/schemas/Usage"),
            _admin_errors(400, 404, 503, bad_request="`by`, `period`, `since` or `until` is "
                          "not valid.", not_found="No team with this name."),
            parameters=[
                {"name": "by", "in": "query", "required": False,
                 "description": "Comma-separated: team, key, model, route, tag:<name>.",
                 "schema": {"type": "string", "default": "team"}},
                {"name": "period", "in": "query", "required": False,
                 "schema": {"type": "string", "enum": ["day", "month"]}},
                {"name": "since", "in": "query", "required": False,
                 "description": "From this day (UTC), included.",
                 "schema": {"type": "string", "format": "date"}},
                {"name": "until", "in": "query", "required": False,
                 "description": "Up to this day (UTC), excluded.",
                 "schema": {"type": "string", "format": "date"}},
                {"name": "team", "in": "query", "required": False,
                 "description": "Only this team.", "schema": {"type": "string"}},
            ],
        )},
        f"{ADMIN}/keys": {"get": _admin_operation(
            "listKeys", "Every team key's id, its team, whether it is revoked, and its lifetime",
            _admin_ok("#/components/schemas/KeyList"),
            _admin_errors(400, 503, bad_request="`expiring_within` is not 1d to 3650d."),
            parameters=[
                {"name": "expiring_within", "in": "query", "required": False,
                 "description": "Only keys whose `expires_at` comes within this many days "
                                "(and has not passed), e.g. `7d`.",
                 "schema": {"type": "string", "pattern": "^[0-9]{1,4}d$"}},
            ],
        )},
        f"{ADMIN}/keys/{{key_id}}/revoke": {
            "post": _admin_operation(
                "revokeKey", "Refuse a team key at once, on every replica",
                _admin_ok("#/components/schemas/KeyState"), revoke_errors, parameters=[key_id],
            ),
            "delete": _admin_operation(
                "restoreKey", "Accept a revoked team key again",
                _admin_ok("#/components/schemas/KeyState"), revoke_errors, parameters=[key_id],
            ),
        },
        f"{ADMIN}/cache": {"delete": _admin_operation(
            "flushCache", "Flush cached answers, all or by route and/or team",
            _admin_ok("#/components/schemas/CacheFlush"),
            _admin_errors(400, 404, 503, bad_request="`route` is not a known route.",
                          not_found="No team with this name."),
            parameters=[
                {"name": "route", "in": "query", "required": False,
                 "description": "Only this route's entries (the `route` metric label).",
                 "schema": {"type": "string", "enum": list(ROUTES)}},
                {"name": "team", "in": "query", "required": False,
                 "description": "Only this team's entries.", "schema": {"type": "string"}},
            ],
        )},
        f"{ADMIN}/accounts": {"get": _admin_operation(
            "listUpstreamAccounts", "Each upstream account as every replica sees it: in "
            "rotation or taken out (until when, and why: 401 or 402), its limits, the teams it "
            "is kept for, its slots in the last minute and the balance watched; never its key",
            _admin_ok("#/components/schemas/UpstreamAccounts"), _admin_errors(503),
        )},
        f"{ADMIN}/webhooks/failed": {"get": _admin_operation(
            "listFailedWebhooks", "Task webhooks given up (after their retries, or at once when "
            "no retry could help), oldest first, paged",
            _admin_ok("#/components/schemas/FailedWebhooks"),
            _admin_errors(400, 503, bad_request="`limit` is not a whole number, or `after` is "
                          "not a cursor of a previous page."),
            parameters=[
                {"name": "after", "in": "query", "required": False,
                 "description": "The `next` of the previous page.",
                 "schema": {"type": "string", "pattern": "^[0-9]{1,15}-msg_[0-9a-f]{32}$"}},
                {"name": "limit", "in": "query", "required": False,
                 "description": "Webhooks per page; values outside 1..1000 are brought into it.",
                 "schema": {"type": "integer", "default": 100}},
            ],
        )},
        f"{ADMIN}/webhooks/{{hook_id}}/redeliver": {"post": _admin_operation(
            "redeliverWebhook", "Put a failed task webhook back to work at once, with the same "
            "webhook-id (its task is polled again if it had not ended)",
            _admin_ok("#/components/schemas/Redelivering"),
            _admin_errors(404, 503, not_found="No failed webhook with this id."),
            parameters=[{"name": "hook_id", "in": "path", "required": True,
                         "description": "The webhook's `id` (its `webhook-id` header).",
                         "schema": {"type": "string"}}],
        )},
        f"{ADMIN}/reload": {"post": _admin_operation(
            "reloadConfig",
            "Re-read the config file here and on every process sharing the store (like SIGHUP); "
            "an invalid file is refused and the running config kept",
            _admin_ok("#/components/schemas/Reloaded"),
            _admin_errors(400, bad_request="The file is invalid (the message names the field; "
                          "the running config is kept), or the gateway was not started from a "
                          "config file."),
        )},
    }


# the `after` / `limit` of a paged stream (a ledger, the audit log)
PAGING: list[Json] = [
    {"name": "after", "in": "query", "required": False,
     "description": "Only entries after this one: the `next` of the previous page "
                    "(`-`, the default, is the beginning).",
     "schema": {"type": "string", "default": "-"}},
    {"name": "limit", "in": "query", "required": False,
     "description": "Entries per page; values outside 1..1000 are brought into it.",
     "schema": {"type": "integer", "default": 100}},
]


def _admin_operation(operation_id: str, summary: str, ok: Json, errors: Json, *,
                     parameters: list[Json] | None = None) -> Json:
    operation: Json = {
        "tags": ["admin"],
        "operationId": operation_id,
        "summary": summary,
        "security": [{"adminKey": []}],
    }
    if parameters:
        operation["parameters"] = parameters
    operation["responses"] = {"200": ok, **errors}
    return operation


def _admin_ok(ref: str) -> Json:
    return {
        "description": "Done.",
        "headers": {"X-Request-ID": {"$ref": "#/components/headers/XRequestId"}},
        "content": _content(ref),
    }


def _admin_errors(*statuses: int, bad_request: str = "", not_found: str = "") -> Json:
    why = {
        400: f"`invalid_request`: {bad_request}",
        401: "`authentication_error`: the admin key is missing or unknown.",
        403: "`permission_denied`: a team key, not an admin key.",
        404: f"`not_found`: {not_found}",
        503: "`store_unavailable`: the store is unreachable.",
    }
    out: Json = {}
    for status in sorted({401, 403, *statuses}):
        headers = {"X-Request-ID": {"$ref": "#/components/headers/XRequestId"}}
        if status == 503:
            headers["Retry-After"] = {"$ref": "#/components/headers/RetryAfterRequired"}
        out[str(status)] = _error(why[status], headers)
    return out


# -- components -------------------------------------------------------------------------------


def _components() -> Json:
    return {
        "securitySchemes": {
            "teamKey": {"type": "http", "scheme": "bearer",
                        "description": "A team's internal key (`aiogw_...`); never the "
                                       "upstream's key."},
            "adminKey": {"type": "http", "scheme": "bearer",
                         "description": "An admin key from the config's `admin.keys`."},
            "metricsToken": {"type": "http", "scheme": "bearer",
                             "description": "`metrics.bearer_token`, when the config sets one."},
        },
        "parameters": {
            "IdempotencyKey": {
                "name": "Idempotency-Key", "in": "header", "required": False,
                "description": (
                    "Retry-safe POSTs (IETF httpapi draft): a retry with the same key and body "
                    "replays the first answer (`Idempotent-Replayed: true`) and is never "
                    "charged twice; the same key with another body answers 422, while the "
                    "first is in flight 409. Scoped per team, kept 24 h."
                ),
                "schema": {"type": "string", "minLength": 1, "maxLength": 255,
                           "pattern": "^[!-~]+$"},
            },
            "CacheControl": {
                "name": "Cache-Control", "in": "header", "required": False,
                "description": "`no-cache`: skip the cache (the fresh answer replaces the cached "
                               "one); `no-store`: leave the cache alone. Other directives are "
                               "ignored.",
                "schema": {"type": "string", "example": "no-cache"},
            },
            "CallbackUrl": {
                "name": "X-Callback-URL", "in": "header", "required": False,
                "description": (
                    "Where to POST the task's final status when it ends, signed as Standard "
                    "Webhooks sign (`webhook-id`, `webhook-timestamp`, `webhook-signature`). "
                    "http(s) only, no credentials or fragment, at most 2048 characters; it must "
                    "match one of the team's `callbacks.allow` patterns."
                ),
                "schema": {"type": "string", "maxLength": 2048,
                           "example": "https://hooks.research.example.com/tasks"},
            },
            "CallbackSecretId": {
                "name": "X-Callback-Secret-Id", "in": "header", "required": False,
                "description": "Sign the webhook with this one of the team's "
                               "`callbacks.secrets` instead of its `callbacks.secret`.",
                "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"},
            },
            "RequestId": {
                "name": "X-Request-ID", "in": "header", "required": False,
                "description": "Your request id, echoed and logged when it is 1 to 128 visible "
                               "ASCII characters; otherwise the gateway makes one.",
                "schema": {"type": "string"},
            },
        },
        "headers": _headers(),
        "schemas": _schemas(),
    }


def _headers() -> Json:
    def header(description: str, schema: Json, *, required: bool = False) -> Json:
        out: Json = {"description": description, "schema": schema}
        if required:
            out["required"] = True
        return out

    x_cache = {"type": "string", "enum": ["HIT", "MISS", "BYPASS", "COALESCED"]}
    retry_after = ("Seconds to wait: a whole number, at least 1, from the gateway; the "
                   "upstream's own value (seconds or an HTTP date) on its 429s and 503s.")
    retry_after_schema = {"type": "string", "pattern": "^([0-9]+|[A-Za-z]{3}, .+ GMT)$"}
    return {
        "XRequestId": header(
            "The client's `X-Request-ID` when it is 1 to 128 visible ASCII characters, else a "
            "new one.",
            {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[!-~]+$"},
            required=True,
        ),
        "XCacheRequired": header("How the cache answered: `HIT` (from the cache), `MISS` "
                                 "(fetched and stored), `BYPASS` (not cacheable, or the client "
                                 "said no), `COALESCED` (shared an identical request in "
                                 "flight).", x_cache, required=True),
        "XCache": header("How the cache answered (once the team is known).", x_cache),
        "RateLimitPolicy": header(
            "The team's quotas (IETF httpapi draft), e.g. `\"minute\";q=120;w=60`; absent when "
            "the team has none.",
            {"type": "string",
             "pattern": '^"[a-z]+";q=[0-9]+;w=[0-9.]+(, "[a-z]+";q=[0-9]+;w=[0-9.]+)*$'},
        ),
        "RateLimit": header(
            "What is left of each quota window and the seconds until it is whole again, e.g. "
            "`\"minute\";r=119;t=1`.",
            {"type": "string",
             "pattern": '^"[a-z]+";r=-?[0-9]+;t=[0-9]+(, "[a-z]+";r=-?[0-9]+;t=[0-9]+)*$'},
        ),
        "CacheControl": header("`private`, unless the upstream said something stricter.",
                               {"type": "string"}),
        "CacheControlNoStore": header("Rate-limit answers are never stored.",
                                      {"type": "string", "enum": ["no-store"]}, required=True),
        "RetryAfterRequired": header(retry_after, retry_after_schema, required=True),
        "RetryAfter": header(retry_after, retry_after_schema),
        "Age": header("Seconds the answer has spent in the cache (answers built from cache).",
                      {"type": "integer", "minimum": 0}),
        "IdempotentReplayed": header("The replay of the first answer to this Idempotency-Key.",
                                     {"type": "string", "enum": ["true"]}),
    }


def _schemas() -> Json:
    number = {"type": "number"}
    string = {"type": "string"}
    nullable_string = {"type": "string", "nullable": True}
    return {
        "Error": {
            "type": "object",
            "description": "The upstream's error shape, also used for every error the gateway "
                           "makes.",
            "required": ["error"],
            "properties": {"error": {
                "type": "object",
                "required": ["code", "message", "type"],
                "properties": {
                    "code": {"type": "integer", "description": "The HTTP status."},
                    "message": {"type": "string"},
                    "type": {"type": "string", "enum": list(ERROR_TYPES)},
                },
            }},
        },
        "TaskRequest": {
            "type": "object",
            "description": "`model` is always required; other parameters vary by model and "
                           "are passed to the upstream as they are.",
            "required": ["model"],
            "properties": {"model": {"type": "string", "minLength": 1, "example": "flux-2"}},
            "additionalProperties": True,
        },
        "ChatCompletionRequest": {
            "type": "object",
            "description": "OpenAI-compatible. The gateway itself checks only `model`; other "
                           "parameters are passed to the upstream as they are.",
            "required": ["model", "messages"],
            "properties": {
                "model": {"type": "string", "minLength": 1, "example": "gemini"},
                "messages": {"type": "array", "items": {
                    "type": "object",
                    "required": ["role", "content"],
                    "properties": {"role": {"type": "string", "example": "user"},
                                   "content": {"description": "Text, or content parts."}},
                }},
                "stream": {"type": "boolean", "default": False,
                           "description": "Answer with server-sent events."},
            },
            "additionalProperties": True,
        },
        "Task": {
            "type": "object",
            "description": "A task just created.",
            "required": ["id", "status", "model", "created_at"],
            "properties": {
                "id": {"type": "string", "example": "task_abc123"},
                "status": {"type": "string", "example": "pending"},
                "model": string,
                "created_at": {"type": "string", "format": "date-time"},
            },
        },
        "TaskStatus": {
            "type": "object",
            "description": "`completed`, `succeeded`, `failed`, `error` and `cancelled` are "
                           "final; anything else is still running. A final status may carry "
                           "`credits_consumed`.",
            "required": ["id", "status"],
            "properties": {
                "id": string,
                "status": {"type": "string", "example": "completed"},
                "model": string,
                "created_at": {"type": "string", "format": "date-time"},
                "completed_at": {"type": "string", "format": "date-time"},
                "result": {"type": "object", "properties": {"url": string}},
                "error": {"type": "object", "properties": {"message": string}},
                "credits_consumed": number,
            },
        },
        "ChatCompletion": {
            "type": "object",
            "required": ["id", "model", "choices", "usage", "credits_consumed"],
            "properties": {
                "id": string,
                "object": {"type": "string", "example": "chat.completion"},
                "model": string,
                "choices": {"type": "array", "items": {
                    "type": "object",
                    "properties": {
                        "index": {"type": "integer"},
                        "finish_reason": nullable_string,
                        "message": {"type": "object", "properties": {
                            "role": string, "content": nullable_string}},
                    },
                }},
                "usage": {
                    "type": "object",
                    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
                    "properties": {name: {"type": "integer", "minimum": 0} for name in
                                   ("prompt_tokens", "completion_tokens", "total_tokens")},
                },
                "credits_consumed": number,
            },
        },
        "ChatEvent": {
            "type": "object",
            "description": "One server-sent event of a streamed completion: `data` is a "
                           "`chat.completion.chunk` in JSON (the last one with `usage` and "
                           "`credits_consumed`), then `[DONE]`.",
            "required": ["data"],
            "properties": {"data": string, "event": string, "id": string,
                           "retry": {"type": "integer"}},
        },
        "TeamList": {
            "type": "object",
            "required": ["teams"],
            "properties": {"teams": {"type": "array",
                                     "items": {"$ref": "#/components/schemas/Team"}}},
        },
        "Team": {
            "type": "object",
            "required": ["team", "quota", "models", "budget", "period", "spent", "reserved"],
            "properties": {
                "team": string,
                "quota": {"type": "object",
                          "description": "Requests allowed per window, e.g. "
                                         "`{\"minute\": 120, \"day\": 20000}`.",
                          "additionalProperties": {"type": "integer", "minimum": 1}},
                "models": {"type": "array", "items": string, "nullable": True,
                           "description": "The allow-list; null when every model is allowed."},
                "budget": {
                    "type": "object",
                    "nullable": True,
                    "description": "null when the team has no budget.",
                    "required": ["credits", "period", "period_ends", "remaining"],
                    "properties": {
                        "credits": number,
                        "period": {"type": "string", "enum": ["day", "week", "month", "total"]},
                        "period_ends": {"type": "string", "format": "date-time",
                                        "nullable": True,
                                        "description": "null for a `total` budget."},
                        "remaining": number,
                    },
                },
                "period": {"type": "string",
                           "description": "The current budget period's id, e.g. `m2026-05`, "
                                          "`w2026-W19`, `d2026-05-08` or `total`."},
                "spent": number,
                "reserved": {"type": "number",
                             "description": "Held for requests and tasks still running."},
            },
        },
        "Ledger": {
            "type": "object",
            "required": ["team", "entries", "next"],
            "properties": {
                "team": string,
                "entries": {"type": "array",
                            "items": {"$ref": "#/components/schemas/LedgerEntry"}},
                "next": {"type": "string", "nullable": True,
                         "description": "`after` for the next page; null on the last page."},
            },
        },
        "LedgerEntry": {
            "type": "object",
            "description": "One charge, refund or cached answer.",
            "required": ["id", "time_ms", "team", "kind", "credits", "cached"],
            "properties": {
                "id": {"type": "string", "pattern": "^[0-9]+-[0-9]+$"},
                "time_ms": {"type": "integer"},
                "team": string,
                "key_id": nullable_string,
                "model": nullable_string,
                "route": string,
                "request_id": string,
                "kind": {"type": "string", "enum": ["charge", "refund"]},
                "credits": number,
                "reserved": number,
                "saved": number,
                "cached": {"type": "boolean"},
                "period": string,
            },
        },
        "KeyList": {
            "type": "object",
            "required": ["keys"],
            "properties": {"keys": {"type": "array",
                                    "items": {"$ref": "#/components/schemas/KeyState"}}},
        },
        "KeyState": {
            "type": "object",
            "required": ["id", "team", "revoked"],
            "properties": {
                "id": string, "team": string, "revoked": {"type": "boolean"},
                "not_before": {**nullable_string, "format": "date-time"},
                "expires_at": {**nullable_string, "format": "date-time"},
                "valid": {"type": "boolean",
                          "description": "The current secret is inside its lifetime now."},
                "previous": {"type": "array", "description": "Earlier secrets of this key id "
                             "(rotation), each accepted until its `expires_at`.",
                             "items": {"type": "object", "required": ["expires_at", "valid"],
                                       "properties": {"expires_at": {"type": "string",
                                                                     "format": "date-time"},
                                                      "valid": {"type": "boolean"}}}},
                "requests_per_minute": {"type": "integer", "nullable": True,
                                        "description": "The key's own quota, inside its team's."},
                "requests_per_day": {"type": "integer", "nullable": True},
                "budget": {
                    "type": "object", "nullable": True,
                    "description": "The key's own budget in its current period, inside its "
                                   "team's; null when it has none.",
                    "required": ["credits", "period", "spent", "reserved", "remaining"],
                    "properties": {"credits": number, "period": string, "spent": number,
                                   "reserved": number, "remaining": number},
                },
            },
        },
        "Audit": {
            "type": "object",
            "required": ["entries", "next"],
            "properties": {
                "entries": {"type": "array", "items": {
                    "type": "object", "required": ["id", "time_ms", "actor", "action"],
                    "properties": {"id": string, "time_ms": {"type": "integer"},
                                   "actor": string, "action": string}}},
                "next": {**string, "nullable": True},
            },
        },
        "Usage": {
            "type": "object",
            "required": ["header", "rows"],
            "properties": {
                "header": {"type": "array", "items": string,
                           "description": "period (if asked), the `by` fields, then requests, "
                                          "cached, refunded, credits, saved."},
                "rows": {"type": "array", "items": {"type": "array", "items": {
                    "oneOf": [string, number]}}},
            },
        },
        "UpstreamAccounts": {
            "type": "object",
            "required": ["accounts"],
            "properties": {"accounts": {"type": "array", "items": {
                "type": "object",
                "required": ["id", "in_rotation", "out_of_rotation", "requests_per_minute",
                             "burst", "teams", "slots_used_last_minute", "credits"],
                "properties": {
                    "id": {"type": "string",
                           "description": "`default` for the one `upstream.api_key`."},
                    "in_rotation": {"type": "boolean"},
                    "out_of_rotation": {
                        "type": "object", "nullable": True,
                        "description": "Why and until when the account is out of rotation; "
                                       "null while it is in.",
                        "required": ["until", "status", "reason"],
                        "properties": {
                            "until": {"type": "string", "format": "date-time",
                                      "description": "Back in rotation then (or sooner, when "
                                                     "a request that had no other account "
                                                     "left goes through it)."},
                            "status": {"type": "integer", "nullable": True,
                                       "description": "The upstream's answer that took it "
                                                      "out: 401 (key) or 402 (credits)."},
                            "reason": {"type": "string"},
                        },
                    },
                    "requests_per_minute": {"type": "integer", "nullable": True,
                                            "description": "null: unpaced."},
                    "burst": {"type": "integer"},
                    "teams": {"type": "array", "items": {"type": "string"}, "nullable": True,
                              "description": "The teams it is kept for; null: every team."},
                    "slots_used_last_minute": {
                        "type": "integer", "nullable": True, "minimum": 0,
                        "description": "Upstream slots granted through it in the last 60 s, "
                                       "an estimate (a sliding window); null for the one "
                                       "unpaced account, which takes no slots."},
                    "credits": {
                        "type": "object", "nullable": True,
                        "description": "The balance watched (`credits`) and what is left of "
                                       "it; null when none is set.",
                        "required": ["balance", "remaining"],
                        "properties": {"balance": number, "remaining": number},
                    },
                },
            }}},
        },
        "FailedWebhooks": {
            "type": "object",
            "required": ["webhooks", "next"],
            "properties": {
                "webhooks": {"type": "array", "items": {
                    "type": "object",
                    "required": ["id", "team", "task_id", "callback", "error", "attempts",
                                 "polls", "task_status", "created_at", "failed_at"],
                    "properties": {
                        "id": {"type": "string", "description": "Its `webhook-id`."},
                        "team": {"type": "string"},
                        "task_id": {"type": "string"},
                        "callback": {"type": "string",
                                     "description": "The callback URL's scheme, host and port "
                                                    "(its path and query are not shown: they "
                                                    "may hold the receiver's own secret)."},
                        "error": {"type": "string",
                                  "description": "Why the last attempt failed, e.g. "
                                                 "`http_500`, `timeout`, `connect`, "
                                                 "`private_address`, `task_not_finished`."},
                        "attempts": {"type": "integer", "minimum": 0},
                        "polls": {"type": "integer", "minimum": 0},
                        "task_status": {"type": "string", "nullable": True,
                                        "description": "The task's final status, if it ended."},
                        "created_at": {"type": "string", "format": "date-time"},
                        "failed_at": {"type": "string", "format": "date-time"},
                    },
                }},
                "next": {"type": "string", "nullable": True,
                         "description": "The `after` of the next page; null on the last."},
            },
        },
        "Redelivering": {
            "type": "object",
            "required": ["id", "redelivering"],
            "properties": {"id": {"type": "string"},
                           "redelivering": {"type": "boolean", "enum": [True]}},
        },
        "CacheFlush": {
            "type": "object",
            "required": ["removed"],
            "properties": {"removed": {"type": "integer", "minimum": 0}},
        },
        "Reloaded": {
            "type": "object",
            "required": ["reloaded", "applied", "restart_needed", "generation", "processes"],
            "properties": {
                "reloaded": {"type": "boolean", "enum": [True]},
                "applied": {"type": "array", "items": {"type": "string"},
                            "description": "Config sections that changed and apply now."},
                "restart_needed": {
                    "type": "array", "items": {"type": "string"},
                    "description": "Sections that changed but keep running as they are until "
                                   "a restart (listen, store, upstream)."},
                "generation": {"type": "integer", "nullable": True,
                               "description": "The config generation every process follows; "
                                              "null when the store is unreachable."},
                "processes": {
                    "type": "object",
                    "required": ["reloaded", "pending"],
                    "properties": {
                        "reloaded": {"type": "array", "items": {"type": "string"}},
                        "pending": {"type": "array", "items": {"type": "string"},
                                    "description": "Live processes that had not reloaded yet "
                                                   "when the wait ended."},
                        "note": {"type": "string"},
                    },
                },
            },
        },
    }
