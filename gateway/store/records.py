"""How operations travel to and from the store: script arguments and replies, record formats."""

from __future__ import annotations

from typing import Any

from ..quota import QuotaState
from .base import (
    IDEMPOTENCY_TTL_MS,
    Admission,
    AdmitResult,
    Completion,
    PendingReservation,
    Verdict,
)


def reservation_record(period: str, amount: int, context: bytes) -> bytes:
    """What the reservations hash holds after the deadline: `period|amount|context`."""
    return b"%s|%d|%s" % (period.encode(), amount, context)


def parse_reservation(rid: str, value: bytes) -> PendingReservation:
    deadline, period, amount, context = value.split(b"|", 3)
    return PendingReservation(rid, int(deadline), period.decode(), int(amount), context)


def admit_args(a: Admission) -> list[Any]:
    r = a.reservation
    args: list[Any] = [
        a.key_id,
        a.ticket,
        a.hold_ms,
        "1" if a.count_quota else "0",
        a.idempotency[1] if a.idempotency else "",
        "1" if a.task_id else "0",
        "1" if a.cache else "0",
        r.id if r else "",
        reservation_record(r.period, r.amount, r.context) if r else "",
        r.period if r else "",
        r.amount if r else 0,
        "" if a.budget_limit is None or r is None else a.budget_limit,
        a.pace.interval_ms if a.pace else "",
        a.pace.burst if a.pace else 1,
        a.pace.queue_ms if a.pace else 0,
        a.hit_event or "",
        a.ledger_min_ms,
        IDEMPOTENCY_TTL_MS,
        a.served[0] if a.served else "",
        a.served[1] if a.served else 0,
        len(a.quotas),
    ]
    for q in a.quotas:
        args += [q.name, q.limit, q.period_ms]
    return args


def parse_admit(a: Admission, raw: list[Any]) -> AdmitResult:
    verdict, now_ms, retry_ms, delay_ms, used, entry, ttl_ms = raw[:7]
    states = tuple(
        QuotaState(q, int(raw[7 + 2 * i]), raw[8 + 2 * i] / 1000.0)
        for i, q in enumerate(a.quotas)
    )
    return AdmitResult(
        verdict=Verdict(verdict),
        now=now_ms / 1000.0,
        quotas=states,
        retry_after_s=retry_ms / 1000.0,
        entry=entry or None,
        entry_ttl_s=max(ttl_ms, 0) / 1000.0,
        pace_delay_s=delay_ms / 1000.0,
        budget_used=None if used < 0 else int(used),
    )


def finish_args(c: Completion) -> list[Any]:
    idem_mode, idem_answer, idem_ttl = "", b"", 0
    if c.idempotency:
        idem_mode = "done" if c.idempotency[1] is not None else "drop"
        idem_answer, idem_ttl = c.idempotency[1] or b"", c.idempotency[2]
    return [
        c.settle.value if c.settle else "",
        c.reservation_id or "",
        "" if c.charge is None else c.charge,
        c.hold_id or "",
        c.hold_ms,
        c.cache_put[1] if c.cache_put else "",
        c.cache_put[2] if c.cache_put else 0,
        c.ticket,
        idem_mode,
        idem_answer,
        idem_ttl,
        c.task_owner[1] if c.task_owner else "",
        c.ledger or "",
        c.ledger_min_ms,
        "1" if c.release else "0",
    ]
