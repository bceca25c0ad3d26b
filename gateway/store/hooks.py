"""Webhook records in the store: the tasks the gateway watches for their `X-Callback-URL`.

Every replica shares them (all under the `{org}` hash tag, one slot on Redis Cluster): a hash of
records (id -> JSON), a sorted set of due times, a hash of final task bodies waiting to be
delivered, and a sorted set of failed hooks. `hook_claim.lua` hands out what is due under a
lease (its due time moves to the lease's end, so a dead replica's hooks come back by
themselves), and only the lease holder moves a hook on (`hook_update.lua`). What the scripts
take and answer is built and read here; `ScriptStore` calls them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import orjson

from .base import ScriptFailed
from .payload import Args

SCRIPTS = ("hook_watch", "hook_claim", "hook_update", "hook_redeliver", "hook_failed")


class State(enum.Enum):
    POLLING = "polling"  # its task is still running, as far as the gateway knows
    DELIVERING = "delivering"  # the task's final body is being delivered
    FAILED = "failed"  # given up: listed for operators (`GET /admin/v1/webhooks/failed`)


class Step(enum.Enum):
    """What a lease holder did with a hook (`hook_update.lua`)."""

    POLL = "poll"  # the task is still running: poll it again after `delay_ms`
    DELIVER = "deliver"  # the task ended: keep its final body, deliver it now
    RETRY = "retry"  # a delivery failed: try again after `delay_ms`
    DELIVERED = "delivered"  # done: forget the hook
    FAILED = "failed"  # given up


@dataclass(frozen=True, slots=True)
class Hook:
    """One watched task and its webhook; `id` is the `webhook-id` of every delivery of it."""

    id: str
    team: str
    task_id: str
    url: str  # as checked when the task was created; checked again at each delivery
    secret_id: str = ""  # '' for the team's `callbacks.secret`
    state: State = State.POLLING
    created_ms: int = 0  # when the gateway started watching (the store's clock)
    started_ms: int = 0  # when the delivery began (0: not yet)
    failed_ms: int = 0
    polls: int = 0
    attempts: int = 0  # delivery attempts that failed
    error: str = ""  # the last failure, a short code
    status: str = ""  # the task's final status word, once known
    lease: str = ""  # the lease it was claimed under ('' when not claimed)

    def __repr__(self) -> str:  # the URL's query may hold the receiver's own token
        return f"Hook({self.id}, team={self.team!r}, task={self.task_id!r}, {self.state.value})"


@dataclass(frozen=True, slots=True)
class Claimed:
    hook: Hook
    body: bytes | None  # the task's final body, once known
    now_ms: int  # the store's clock when it was claimed


def watch(hook: Hook, delay_ms: int) -> Args:
    return [orjson.dumps({"hook": {"id": hook.id, "team": hook.team, "task": hook.task_id,
                                   "url": hook.url, "sid": hook.secret_id},
                          "delay_ms": delay_ms})]


def claim(owner: str, lease_ms: int, limit: int) -> Args:
    return [orjson.dumps({"owner": owner, "lease_ms": lease_ms, "limit": limit})]


@dataclass(frozen=True, slots=True)
class Update:
    """A lease holder's step with a hook, and what it learnt."""

    step: Step
    delay_ms: int = 0  # due again after this (POLL, DELIVER: the lease, RETRY)
    error: str | None = None  # the last failure, a short code
    status: str | None = None  # DELIVER: the task's final status word
    attempted: bool = False  # a delivery attempt failed
    body: bytes = b""  # DELIVER: the task's final body
    keep_ms: int = 0  # FAILED: failed hooks are kept this long ...
    max_failed: int = 0  # ... and at most this many


def update(hook: Hook, u: Update) -> Args:
    fields = {"id": hook.id, "lease": hook.lease, "action": u.step.value, "delay_ms": u.delay_ms,
              "error": u.error, "status": u.status, "attempted": u.attempted or None,
              "keep_ms": u.keep_ms, "max_failed": u.max_failed}
    return [orjson.dumps({k: v for k, v in fields.items() if v is not None}), u.body]


def redeliver(hook_id: str) -> Args:
    return [orjson.dumps({"id": hook_id})]


def failed(after: tuple[int, str] | None, limit: int) -> Args:
    fields: dict[str, Any] = {"limit": limit}
    if after is not None:
        fields["after_ms"], fields["after_id"] = after
    return [orjson.dumps(fields)]


def parse_claimed(reply: list[Any]) -> list[Claimed]:
    now_ms = int(reply[0])
    return [Claimed(parse_hook(reply[i]), reply[i + 1] or None, now_ms)
            for i in range(1, len(reply), 2)]


def parse_hook(raw: bytes) -> Hook:
    """A record as the scripts keep it (read strictly: a malformed one is a defect)."""
    try:
        data = orjson.loads(raw)
        return Hook(
            id=_text(data["id"]), team=_text(data["team"]), task_id=_text(data["task"]),
            url=_text(data["url"]), secret_id=_text(data["sid"]), state=State(data["state"]),
            created_ms=_int(data["created"]), started_ms=_int(data["started"]),
            failed_ms=_int(data["failed"]), polls=_int(data["polls"]),
            attempts=_int(data["attempts"]), error=_text(data["error"]),
            status=_text(data["status"]), lease=_text(data["lease"]),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ScriptFailed(f"a webhook record is malformed: {type(exc).__name__}") from None


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("expected text")
    return value


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise TypeError("expected a whole number")
    return int(value)
