"""The embedded store (`memory://`): one process, no Redis, the same semantics as the Lua scripts.

Every operation runs without an `await` in between, so each is atomic on the event loop just as
a Lua script is atomic in Redis. Keys and record formats are the Redis ones, so key patterns and
reservations behave the same on both backends.
"""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from .. import quota as gcra
from ..quota import QuotaState
from .base import (
    CANCEL_TTL_MS,
    IDEMPOTENCY_TTL_MS,
    Admission,
    AdmitResult,
    BudgetUsage,
    CacheRef,
    Completion,
    Flight,
    LedgerEntry,
    Pace,
    PendingReservation,
    Settle,
    Settled,
    Verdict,
)
from .keys import Keys
from .records import parse_reservation, reservation_record


class _Expiring:
    """A dict whose keys may carry a deadline (ms on the store's clock), like Redis keys."""

    def __init__(self, clock_ms: Callable[[], float]) -> None:
        self._data: dict[str, Any] = {}
        self._deadline: dict[str, float] = {}
        self._clock_ms = clock_ms
        self._writes = 0

    def get(self, key: str) -> Any:
        deadline = self._deadline.get(key)
        if deadline is not None and deadline <= self._clock_ms():
            self.delete(key)
            return None
        return self._data.get(key)

    def set(self, key: str, value: Any, ttl_ms: float | None = None) -> None:
        self._data[key] = value
        if ttl_ms is None:
            self._deadline.pop(key, None)
        else:
            self._deadline[key] = self._clock_ms() + ttl_ms
        self._writes += 1
        if self._writes % 1024 == 0:
            self.sweep()

    def expire(self, key: str, ttl_ms: float) -> None:
        if key in self._data:
            self._deadline[key] = self._clock_ms() + ttl_ms

    def ttl_ms(self, key: str) -> float:
        deadline = self._deadline.get(key)
        return -1.0 if deadline is None else max(deadline - self._clock_ms(), 0.0)

    def delete(self, key: str) -> bool:
        self._deadline.pop(key, None)
        return self._data.pop(key, None) is not None

    def hash(self, key: str) -> dict[str, Any]:
        """The hash stored at `key`, created empty when missing."""
        value = self.get(key)
        if value is None:
            value = {}
            self._data[key] = value
        return value  # type: ignore[no-any-return]

    def match(self, pattern: str) -> list[str]:
        return [k for k in list(self._data) if fnmatch.fnmatchcase(k, pattern) and self.get(k)]

    def sweep(self) -> None:
        now = self._clock_ms()
        for key in [k for k, d in self._deadline.items() if d <= now]:
            self.delete(key)


class MemoryStore:
    def __init__(self, *, prefix: str = "aio", clock: Callable[[], float] = time.time) -> None:
        self.keys = Keys(prefix)
        self._clock = clock
        self._kv = _Expiring(self._now_ms)
        self._ledger_seq = (0, 0)

    def __repr__(self) -> str:
        return "MemoryStore()"

    def _now_ms(self) -> float:
        return math.floor(self._clock() * 1000)

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def now(self) -> float:
        return self._now_ms() / 1000.0

    async def admit(self, a: Admission) -> AdmitResult:
        kv, k, now = self._kv, self.keys, self._now_ms()
        quota_key = k.team(a.team, "quota")
        debts = kv.hash(quota_key)
        steps = [
            (gcra.gcra if a.count_quota else gcra.peek)(q, debts.get(q.name), now)
            for q in a.quotas
        ]
        states = tuple(QuotaState(q, s.remaining, math.ceil(s.reset_ms) / 1000.0)
                       for q, s in zip(a.quotas, steps, strict=True))

        def result(verdict: Verdict, **kw: Any) -> AdmitResult:
            return AdmitResult(verdict, now / 1000.0, states, **kw)

        def count() -> None:
            if a.count_quota and a.quotas:
                for q, s in zip(a.quotas, steps, strict=True):
                    debts[q.name] = (s.debt, now)
                kv.expire(quota_key, max(s.reset_ms for s in steps) + 1000)

        idem_key = k.idempotency(a.team, a.idempotency[0]) if a.idempotency else ""

        def hold_idempotency() -> None:
            if a.idempotency:
                kv.set(idem_key, {"fp": a.idempotency[1], "state": "busy", "owner": a.ticket},
                       a.hold_ms)

        if kv.get(k.team(a.team, f"void:{a.ticket}")) is not None:
            return result(Verdict.CANCELLED)
        if a.key_id in (kv.get(k.team(a.team, "revoked")) or ()):
            return result(Verdict.REVOKED)
        if a.idempotency:
            seen = kv.get(idem_key)
            if seen is not None:
                if seen["fp"] != a.idempotency[1]:
                    return result(Verdict.IDEM_MISMATCH)
                if seen["state"] != "done":
                    return result(Verdict.IDEM_BUSY)
                return result(Verdict.REPLAY, entry=seen["answer"])
        if a.count_quota and not all(s.allowed for s in steps):
            retry = max(s.retry_ms for s in steps)
            return result(Verdict.QUOTA, retry_after_s=math.ceil(retry) / 1000.0)
        if a.task_id and kv.get(k.task(a.team, a.task_id)) is None:
            count()
            return result(Verdict.NOT_FOUND)
        def served(entry: bytes, ttl_ms: float) -> AdmitResult:
            count()
            if a.idempotency:
                kv.set(idem_key, {"fp": a.idempotency[1], "state": "done", "owner": a.ticket,
                                  "answer": entry}, IDEMPOTENCY_TTL_MS)
            if a.hit_event:
                saved = orjson.loads(entry.partition(b"\n")[0]).get("c", 0)
                event = {**orjson.loads(a.hit_event), "kind": "charge", "credits": 0,
                         "cached": True, "saved": saved}
                self._record(k.team(a.team, "ledger"), orjson.dumps(event), a.ledger_min_ms, now)
            return result(Verdict.HIT, entry=entry, entry_ttl_s=ttl_ms / 1000.0)

        if a.served is not None:
            return served(*a.served)
        lock = ""
        if a.cache:
            entry_key, lock = k.cache(a.team, a.cache)
            entry = kv.get(entry_key)
            if entry is not None:
                return served(entry, kv.ttl_ms(entry_key))
            if kv.get(lock) is not None:
                count()
                hold_idempotency()
                return result(Verdict.FOLLOW)
        r = a.reservation
        budget = kv.hash(k.team(a.team, "budget"))
        used = None
        if r is not None and a.budget_limit is not None:
            used = budget.get(f"spent:{r.period}", 0) + budget.get(f"reserved:{r.period}", 0)
            if used + r.amount > a.budget_limit:
                count()
                return result(Verdict.BUDGET, budget_used=used)
        delay = 0.0
        if a.pace is not None:
            booked, wait = self._book(a.pace, now)
            if not booked:
                count()
                return result(Verdict.PACE, retry_after_s=wait, budget_used=used)
            delay = wait
        count()
        hold_idempotency()
        if lock:
            kv.set(lock, a.ticket, a.hold_ms)
        if r is not None:
            resv = kv.hash(k.team(a.team, "resv"))
            resv[r.id] = b"%d|" % (now + a.hold_ms) + reservation_record(r.period, r.amount,
                                                                        r.context)
            _add(budget, f"reserved:{r.period}", r.amount)
            if used is not None:
                used += r.amount
        return result(Verdict.ADMIT, pace_delay_s=delay, budget_used=used)

    async def cancel(self, a: Admission) -> None:
        kv, k = self._kv, self.keys
        kv.set(k.team(a.team, f"void:{a.ticket}"), b"1", CANCEL_TTL_MS)
        if a.reservation is not None:
            held = kv.hash(k.team(a.team, "resv")).pop(a.reservation.id, None)
            if held is not None:
                r = parse_reservation(a.reservation.id, held)
                _add(kv.hash(k.team(a.team, "budget")), f"reserved:{r.period}", -r.amount)
        if a.cache is not None:
            lock = k.cache(a.team, a.cache)[1]
            if kv.get(lock) == a.ticket:
                kv.delete(lock)
        if a.idempotency is not None:
            idem_key = k.idempotency(a.team, a.idempotency[0])
            seen = kv.get(idem_key)
            if seen is not None and seen["owner"] == a.ticket:
                kv.delete(idem_key)

    def _book(self, pace: Pace, now: float) -> tuple[bool, float]:
        key = self.keys.org("pace")
        stored = self._kv.get(key)
        tat = now if stored is None or stored < now else stored
        delay = max(tat - (pace.burst - 1) * pace.interval_ms - now, 0.0)
        if delay > pace.queue_ms:
            return False, math.ceil(delay - pace.queue_ms) / 1000.0
        self._kv.set(key, tat + pace.interval_ms,
                     tat + pace.interval_ms - now + pace.burst * pace.interval_ms + 1000)
        return True, math.ceil(delay) / 1000.0

    async def finish(self, c: Completion) -> Settled:
        kv, k, now = self._kv, self.keys, self._now_ms()
        ledger = k.team(c.team, "ledger")
        settled = Settled(False)
        charge = 0
        if c.settle is not None and c.reservation_id:
            resv = kv.hash(k.team(c.team, "resv"))
            held = resv.pop(c.reservation_id, None)
            if held is not None:
                r = parse_reservation(c.reservation_id, held)
                budget = kv.hash(k.team(c.team, "budget"))
                if c.settle is Settle.HOLD:
                    resv[c.hold_id or ""] = b"%d|" % (now + c.hold_ms) + reservation_record(
                        r.period, r.amount, r.context)
                else:
                    if c.settle is Settle.CHARGE:
                        charge = r.amount if c.charge is None else c.charge
                    _add(budget, f"reserved:{r.period}", -r.amount)
                    _add(budget, f"spent:{r.period}", charge)
                    event = orjson.loads(r.context)
                    event.update(kind=c.settle.value, credits=charge, reserved=r.amount,
                                 period=r.period)
                    self._record(ledger, orjson.dumps(event), c.ledger_min_ms, now)
                settled = Settled(True, budget.get(f"spent:{r.period}", 0),
                                  budget.get(f"reserved:{r.period}", 0), charge)
        ref = c.cache_put[0] if c.cache_put else c.release
        if ref is not None:
            entry_key, lock = k.cache(c.team, ref)
            if c.cache_put:
                kv.set(entry_key, c.cache_put[1], c.cache_put[2])
            if c.release and kv.get(lock) == c.ticket:
                kv.delete(lock)
        if c.idempotency:
            idem_key = k.idempotency(c.team, c.idempotency[0])
            seen = kv.get(idem_key)
            if seen is not None and seen["owner"] == c.ticket:
                if c.idempotency[1] is None:
                    kv.delete(idem_key)
                else:
                    kv.set(idem_key, {**seen, "state": "done", "answer": c.idempotency[1]},
                           c.idempotency[2])
        if c.task_owner:
            kv.set(k.task(c.team, c.task_owner[0]), b"1", c.task_owner[1])
        if c.ledger:
            self._record(ledger, c.ledger, c.ledger_min_ms, now)
        return settled

    async def finish_many(self, completions: Sequence[Completion]) -> list[Settled]:
        return [await self.finish(c) for c in completions]

    def _record(self, key: str, event: bytes, min_ms: int, now: float) -> None:
        last_ms, last_seq = self._ledger_seq
        ms = max(int(now), last_ms)
        seq = last_seq + 1 if ms == last_ms else 0
        self._ledger_seq = (ms, seq)
        entries: list[LedgerEntry] = self._kv.get(key) or []
        entries.append(LedgerEntry(f"{ms}-{seq}", event))
        keep = next((i for i, e in enumerate(entries) if _ms(e.id) >= min_ms), len(entries))
        self._kv.set(key, entries[keep:])

    async def pace(self, pace: Pace) -> tuple[bool, float]:
        return self._book(pace, self._now_ms())

    async def flight(self, team: str, ref: CacheRef) -> Flight:
        entry_key, lock = self.keys.cache(team, ref)
        entry = self._kv.get(entry_key)
        if entry is not None:
            return Flight(entry, self._kv.ttl_ms(entry_key) / 1000.0, True)
        return Flight(None, 0.0, self._kv.get(lock) is not None)

    async def budgets(self, teams: Sequence[tuple[str, str]]) -> list[BudgetUsage]:
        out = []
        for team, period in teams:
            budget = self._kv.get(self.keys.team(team, "budget")) or {}
            out.append(BudgetUsage(budget.get(f"spent:{period}", 0),
                                   budget.get(f"reserved:{period}", 0)))
        return out

    async def reservations(self, team: str) -> list[PendingReservation]:
        resv = self._kv.get(self.keys.team(team, "resv")) or {}
        return [parse_reservation(rid, value) for rid, value in resv.items()]

    async def ledger(self, team: str, *, after: str = "-", limit: int = 100) -> list[LedgerEntry]:
        entries: list[LedgerEntry] = self._kv.get(self.keys.team(team, "ledger")) or []
        if after != "-":
            mark = _order(after)
            entries = [e for e in entries if _order(e.id) > mark]
        return entries[:limit]

    async def revoke(self, team: str, key_id: str, revoked: bool) -> None:
        key = self.keys.team(team, "revoked")
        members: set[str] = self._kv.get(key) or set()
        members = members | {key_id} if revoked else members - {key_id}
        self._kv.set(key, members)

    async def revoked(self, team: str) -> set[str]:
        return set(self._kv.get(self.keys.team(team, "revoked")) or ())

    async def flush_cache(self, *, route: str | None = None, team: str | None = None) -> int:
        keys = self._kv.match(self.keys.cache_pattern(route=route, team=team))
        return sum(self._kv.delete(key) for key in keys)

    async def try_lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        key = self.keys.org(name)
        if self._kv.get(key) not in (None, owner):
            return False
        self._kv.set(key, owner, ttl_ms)
        return True


def _add(counters: dict[str, int], field: str, amount: int) -> None:
    counters[field] = counters.get(field, 0) + amount


def _ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def _order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
