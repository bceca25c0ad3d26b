"""The store, as the Lua scripts in `lua/`: one implementation for every backend.

An `Engine` runs a named script (Redis, over the network; the embedded store, in-process); this
class builds the keys and payloads and reads the replies, so `memory://` and Redis cannot drift.
Unused KEYS slots get a name in the team's own hash slot: the script never touches them, and
Redis Cluster then sees every key of a call in one slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any, Protocol

import orjson

from . import hooks, payload
from .base import (
    FORGET_PROCESS_MS,
    AccountPace,
    AccountState,
    Admission,
    AdmitResult,
    BudgetUsage,
    CacheRef,
    Claim,
    Completion,
    Flight,
    LedgerEntry,
    PendingReservation,
    Processes,
    Settled,
    Slot,
    SlotAsk,
)
from .keys import Keys

SCRIPTS = ("admit", "admit_paced", "finish", "cancel", "pace", "slot", "claim", "accounts",
           "flight", "lookup", "store_entry", "processes", "lock", "command", "now", *hooks.SCRIPTS)

SLOT_KEYS = ("sched", "queue", "due", "waiters", "minq")  # lib_slots.lua's S
# lib_slots.lua's users; admit.lua is loaded twice: with it only for a request that takes an
# upstream slot (defining its functions and passing its keys took 6% of a miss's instructions
# in Redis)
_SLOT_SCRIPTS = frozenset({"admit_paced", "accounts", "claim", "pace", "slot"})
_FILES = {"admit_paced": "admit"}
# admit.lua's keys that are the team's own whatever the request (placeholders where it has none)
_ADMIT_FIXED = ("revoked", "quota", "idem", "task", "cache", "flight", "budget", "resv", "ledger")

Call = tuple[str, Sequence[str], payload.Args]


class Engine(Protocol):
    """Runs the scripts; raises `StoreError` (unreachable, slow) or `ScriptFailed`."""

    async def connect(self) -> None: ...
    async def close(self) -> None: ...
    async def run(self, name: str, keys: Sequence[str], args: payload.Args) -> Any: ...
    async def run_many(self, calls: Sequence[Call]) -> list[Any]:
        """Each reply, or the exception that call raised (in a pipeline: one round trip)."""
        ...
    async def delete_matching(self, pattern: str) -> int: ...


def source(name: str) -> str:
    """A script as it is loaded: lib.lua first, and lib_slots.lua for the scripts that use it
    (Redis scripts cannot include files; each call runs its prelude, 1.5 us more in Redis with
    lib_slots)."""
    lua = resources.files("gateway.store") / "lua"
    file = _FILES.get(name, name)
    parts = ("lib", "lib_slots", file) if name in _SLOT_SCRIPTS else ("lib", file)
    return "\n".join((lua / f"{part}.lua").read_text() for part in parts)


class ScriptStore:
    def __init__(self, engine: Engine, *, prefix: str = "aio") -> None:
        self.keys = Keys(prefix)
        self.engine = engine
        self._fixed: dict[str, tuple[str, ...]] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(prefix={self.keys.prefix!r})"

    async def connect(self) -> None:
        await self.engine.connect()

    async def close(self) -> None:
        await self.engine.close()

    async def ping(self) -> None:
        await self.now()

    async def now(self) -> float:
        return int(await self.engine.run("now", [self.keys.org("clock")], payload.EMPTY)) / 1000

    async def _command(self, key: str, cmd: str, *args: Any) -> Any:
        return await self.engine.run("command", [key], [orjson.dumps({"cmd": cmd,
                                                                       "args": list(args)})])

    # -- the request path ----------------------------------------------------------------------

    async def admit(self, a: Admission) -> AdmitResult:
        return payload.parse_admit(a, await self.engine.run(*self._admit_call(a)))

    def _admit_call(self, a: Admission) -> Call:
        """`admit_paced` with the slot keys for a request that takes an upstream slot, else
        `admit` without them."""
        k, team = self.keys, a.team
        fixed = self._fixed.get(team)
        if fixed is None:  # a team's own key names, made once (teams are few, and configured)
            fixed = self._fixed[team] = tuple(k.team(team, name) for name in _ADMIT_FIXED)
        revoked, quota, idem, task, cache, flight, budget, resv, ledger = fixed
        if a.cache:
            cache, flight = k.cache(team, a.cache)
        keys = [
            revoked,
            quota,
            k.idempotency(team, a.idempotency[0]) if a.idempotency else idem,
            k.task(team, a.task_id) if a.task_id else task,
            cache,
            flight,
            budget,
            resv,
            k.team(team, f"void:{a.ticket}"),
            ledger,
        ]
        if a.slot:
            return "admit_paced", keys + self._slot_keys(), payload.admit(a)
        return "admit", keys, payload.admit(a)

    async def cancel(self, a: Admission) -> None:
        k, team = self.keys, a.team
        keys = [
            k.team(team, f"void:{a.ticket}"),
            k.team(team, "resv"),
            k.team(team, "budget"),
            k.cache(team, a.cache)[1] if a.cache else k.team(team, "flight"),
            k.idempotency(team, a.idempotency[0]) if a.idempotency else k.team(team, "idem"),
        ]
        await self.engine.run("cancel", keys, payload.cancel(a))

    async def finish(self, completion: Completion) -> Settled:
        return payload.parse_settled(await self.engine.run(*self._finish_call(completion)))

    async def finish_many(self, completions: Sequence[Completion]) -> list[Settled | Exception]:
        replies = await self.engine.run_many([self._finish_call(c) for c in completions])
        return [r if isinstance(r, Exception) else payload.parse_settled(r) for r in replies]

    def _finish_call(self, c: Completion) -> Call:
        k, team = self.keys, c.team
        entry_key, flight_key = ("", "")
        ref = c.cache_put[0] if c.cache_put else c.release
        if ref is not None:
            entry_key, flight_key = k.cache(team, ref)
        keys = [
            k.team(team, "resv"),
            k.team(team, "budget"),
            k.team(team, "ledger"),
            entry_key or k.team(team, "cache"),
            flight_key or k.team(team, "flight"),
            k.idempotency(team, c.idempotency[0]) if c.idempotency else k.team(team, "idem"),
            k.task(team, c.task_owner[0]) if c.task_owner else k.team(team, "task"),
            k.team(team, f"done:{c.ticket}"),
        ]
        return "finish", keys, payload.finish(c)

    # -- upstream slots ----------------------------------------------------------------------

    def _slot_keys(self) -> list[str]:
        """The upstream schedule and the queue in front of it (lib_slots.lua), in `{org}`."""
        return [self.keys.org(name) for name in SLOT_KEYS]

    async def slot(self, team: str, ticket: str, ask: SlotAsk, *,
                   task_account: str | None = None) -> Slot:
        fields = {"ticket": ticket, "team": team, "slot": payload.slot_ask(ask),
                  "task_account": task_account}
        raw = await self.engine.run("slot", self._slot_keys(), [orjson.dumps(
            {k: v for k, v in fields.items() if v is not None})])
        return payload.parse_slot(raw)

    async def claim(self, tickets: Sequence[str], accounts: Sequence[AccountPace], *,
                    leave: bool = False) -> list[Claim]:
        raw = await self.engine.run("claim", self._slot_keys(), [orjson.dumps(
            {"tickets": list(tickets), "accounts": payload.accounts(accounts), "leave": leave})])
        return payload.parse_claims(raw)

    async def pace(self, account: AccountPace, queue_ms: float) -> tuple[bool, float]:
        booked, wait = await self.engine.run("pace", [self.keys.org("sched")], [orjson.dumps(
            {"account": payload.accounts([account])[0], "queue_ms": queue_ms})])
        return bool(booked), wait / 1000.0

    async def account_states(self, accounts: Sequence[AccountPace], *,
                             down: tuple[str, float, int] | None = None,
                             up: str | None = None, spend: Sequence[tuple[str, int]] = ()
                             ) -> tuple[list[AccountState], bool]:
        fields = {"accounts": payload.accounts(accounts),
                  "down": [down[0], down[1] * 1000.0, down[2]] if down else None, "up": up,
                  "spend": [list(item) for item in spend] or None}
        raw = await self.engine.run("accounts", [self.keys.org("sched")], [orjson.dumps(
            {k: v for k, v in fields.items() if v is not None})])
        return payload.parse_account_states(raw)

    async def task_account(self, team: str, task_id: str) -> str | None:
        """The account a team's task was created on (its polls go through it), if recorded."""
        owner = await self._command(self.keys.task(team, task_id), "GET")
        text = _text(owner) if owner else ""
        return text.removeprefix("a:") if text.startswith("a:") else None

    async def flight(self, team: str, ref: CacheRef) -> Flight:
        entry, ttl, held = await self.engine.run("flight", list(self.keys.cache(team, ref)),
                                                 payload.EMPTY)
        return Flight(entry or None, max(ttl, 0) / 1000.0, bool(held))

    # -- processes -------------------------------------------------------------------------------

    async def heartbeat(self, process: str, generation: int) -> Processes:
        """This process is alive and runs config `generation`; returns what the others said."""
        return await self._processes({"process": process, "generation": generation})

    async def processes(self) -> Processes:
        return await self._processes({})

    async def _processes(self, fields: dict[str, Any]) -> Processes:
        reply = await self.engine.run(
            "processes", [self.keys.org("processes"), self.keys.org("config")],
            [orjson.dumps({**fields, "forget_ms": FORGET_PROCESS_MS})])
        seen = {_text(reply[i]): (int(reply[i + 1]), int(reply[i + 2]))
                for i in range(1, len(reply), 3)}
        return Processes(int(reply[0]), seen)

    async def bump_config(self) -> int:
        """A new config generation: every process reloads its config file when it sees it."""
        return int(await self._command(self.keys.org("config"), "INCR"))

    # -- operators' reads and writes -------------------------------------------------------------

    async def budgets(self, teams: Sequence[tuple[str, str]]) -> list[BudgetUsage]:
        """(team, period) -> what the team spent and holds in that period."""
        return await self._usage([(team, f"spent:{period}", f"reserved:{period}")
                                  for team, period in teams])

    async def key_budgets(self, keys: Sequence[tuple[str, str, str]]) -> list[BudgetUsage]:
        """(team, key id, period) -> what the key spent and holds from its own budget."""
        return await self._usage([(team, f"k:{key}/{period}:spent", f"k:{key}/{period}:reserved")
                                  for team, key, period in keys])

    async def _usage(self, fields: Sequence[tuple[str, str, str]]) -> list[BudgetUsage]:
        calls: list[Call] = [
            ("command", [self.keys.team(team, "budget")],
             [orjson.dumps({"cmd": "HMGET", "args": [spent, reserved]})])
            for team, spent, reserved in fields
        ]
        out = []
        for reply in await self.engine.run_many(calls):
            if isinstance(reply, Exception):
                raise reply
            spent, reserved = reply
            out.append(BudgetUsage(int(spent or 0), int(reserved or 0)))
        return out

    async def reservations(self, team: str) -> list[PendingReservation]:
        flat = await self._command(self.keys.team(team, "resv"), "HGETALL")
        return [payload.parse_reservation(_text(flat[i]), flat[i + 1])
                for i in range(0, len(flat), 2)]

    async def ledger(self, team: str, *, after: str = "-", limit: int = 100) -> list[LedgerEntry]:
        start = after if after == "-" else f"({after}"
        rows = await self._command(self.keys.team(team, "ledger"), "XRANGE", start, "+",
                                   "COUNT", limit)
        return [LedgerEntry(_text(rid), _field(fields, b"e")) for rid, fields in rows or []]

    async def revoke(self, team: str, key_id: str, revoked: bool) -> None:
        await self._command(self.keys.team(team, "revoked"), "SADD" if revoked else "SREM",
                            key_id)

    async def revoked(self, team: str) -> set[str]:
        members = await self._command(self.keys.team(team, "revoked"), "SMEMBERS")
        return {_text(m) for m in members}

    async def revoked_many(self, teams: Sequence[str]) -> list[set[str]]:
        """Every team's revoked keys, in one round trip."""
        calls: list[Call] = [("command", [self.keys.team(team, "revoked")],
                              [orjson.dumps({"cmd": "SMEMBERS"})]) for team in teams]
        out = []
        for reply in await self.engine.run_many(calls):
            if isinstance(reply, Exception):
                raise reply
            out.append({_text(m) for m in reply})
        return out

    async def flush_cache(self, *, route: str | None = None, team: str | None = None) -> int:
        return await self.engine.delete_matching(self.keys.cache_pattern(route=route, team=team))

    async def audit(self, entry: bytes, max_entries: int) -> None:
        """Append to the audit stream (organisation-wide, bounded)."""
        await self._command(self.keys.org("audit"), "XADD", "MAXLEN", max_entries, "*", "e",
                            entry.decode())

    async def audit_log(self, *, after: str = "-", limit: int = 100) -> list[LedgerEntry]:
        start = after if after == "-" else f"({after}"
        rows = await self._command(self.keys.org("audit"), "XRANGE", start, "+", "COUNT", limit)
        return [LedgerEntry(_text(rid), _field(fields, b"e")) for rid, fields in rows or []]

    async def try_lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        """Take the lock, or extend it if `owner` holds it already."""
        held = await self.engine.run("lock", [self.keys.org(name)],
                                     [orjson.dumps({"owner": owner, "ttl_ms": ttl_ms})])
        return bool(held)

    # -- task webhooks (store/hooks.py) ----------------------------------------------------------

    def _hook_keys(self) -> list[str]:
        org = self.keys.org
        return [org("hooks"), org("hooks:due"), org("hooks:body"), org("hooks:failed")]

    async def hook_watch(self, hook: hooks.Hook, delay_ms: int) -> bool:
        """Watch a task for its webhook, first polled after `delay_ms`; False if already so."""
        return bool(await self.engine.run("hook_watch", self._hook_keys()[:2],
                                          hooks.watch(hook, delay_ms)))

    async def hook_claim(self, owner: str, lease_ms: int, limit: int) -> list[hooks.Claimed]:
        """Up to `limit` hooks whose time has come, each leased to `owner` for `lease_ms`."""
        return hooks.parse_claimed(await self.engine.run(
            "hook_claim", self._hook_keys()[:3], hooks.claim(owner, lease_ms, limit)))

    async def hook_update(self, hook: hooks.Hook, update: hooks.Update) -> bool:
        """Move a claimed hook on; False when its lease was taken over meanwhile (nothing
        changed)."""
        return bool(await self.engine.run("hook_update", self._hook_keys(),
                                          hooks.update(hook, update)))

    async def hook_redeliver(self, hook_id: str) -> bool:
        """A failed hook, due again at once; False when no failed hook has that id."""
        return bool(await self.engine.run("hook_redeliver", self._hook_keys(),
                                          hooks.redeliver(hook_id)))

    async def hooks_failed(self, *, after: tuple[int, str] | None = None,
                           limit: int = 100) -> list[hooks.Hook]:
        """Failed hooks, oldest first, after (failed ms, id) of the previous page's last."""
        keys = self._hook_keys()
        raw = await self.engine.run("hook_failed", [keys[3], keys[0]], hooks.failed(after, limit))
        return [hooks.parse_hook(record) for record in raw]


def _field(fields: Sequence[bytes], name: bytes) -> bytes:
    for i in range(0, len(fields), 2):
        if fields[i] == name:
            return fields[i + 1]
    return b""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
