"""What each script is given (one named JSON payload, plus raw blobs) and what it answers.

The field names here are the ones the scripts read (`p.<name>` in lua/*.lua); a field that is
None is left out, since JSON null would reach Lua as a truthy value. Blobs (cache entries,
remembered answers) travel as raw bytes in ARGV[2..]: they need not be UTF-8.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from ..quota import QuotaState
from .base import (
    CANCEL_TTL_MS,
    GUARD_TTL_MS,
    IDEMPOTENCY_TTL_MS,
    AccountPace,
    AccountState,
    Admission,
    AdmitResult,
    Claim,
    Completion,
    PendingReservation,
    Settled,
    Slot,
    SlotAsk,
    Verdict,
)

Args = list[bytes | str | int]


def _pack(fields: dict[str, Any]) -> bytes:
    return orjson.dumps({k: v for k, v in fields.items() if v is not None})


def _ledger(trim: Any) -> dict[str, str]:
    """As XTRIM and XADD take them: text, which Lua passes on as it is (a number would be
    parsed from the JSON and formatted again, both through the C library)."""
    return {"min_id": f"{trim.min_ms}-0", "max_len": str(trim.max_len)}


def accounts(paces: Sequence[AccountPace]) -> list[list[Any]]:
    """Accounts as lib_slots.lua reads them (no null: it would be truthy in Lua)."""
    return [[a.id, a.interval_ms, a.burst, a.per_minute or 0,
             -1 if a.credits is None else a.credits] for a in paces]


def slot_ask(ask: SlotAsk) -> dict[str, Any]:
    return {"accounts": accounts(ask.accounts), "usable": list(ask.usable),
            "weight": ask.weight, "min_interval_ms": ask.min_interval_ms,
            "max_waiting": ask.max_waiting, "queue_ms": ask.queue_ms}


def admit(a: Admission) -> Args:
    r, idem = a.reservation, a.idempotency
    payload = _pack({
        "ticket": a.ticket,
        "team": a.team,
        "key": a.key_id,
        "hold_ms": a.hold_ms,
        "count": a.count_quota,
        "quotas": [[q.store_field, q.limit, q.period_ms] for q in a.quotas] or None,
        "idem": {"fp": idem[1], "ttl_ms": IDEMPOTENCY_TTL_MS} if idem else None,
        "task": True if a.task_id else None,
        "cache": True if a.cache else None,
        "served_ttl_ms": a.served[1] if a.served else None,
        "resv": {"id": r.id, "period": r.period, "amount": r.amount, "key": r.key}
        if r else None,
        "budget": a.budget_limit if r else None,
        "key_budget": a.key_budget_limit if r and r.key else None,
        "slot": slot_ask(a.slot) if a.slot else None,
        "hit_event": True if a.hit_event else None,
        "ledger": _ledger(a.ledger),
    })
    # the ledger contexts as blobs: JSON inside the payload would be escaped, and decoding it
    # was a fifth of the admission's time in Redis
    return [payload, a.served[0] if a.served else b"", r.context if r else b"",
            a.hit_event or b""]


def parse_admit(a: Admission, raw: list[Any]) -> AdmitResult:
    verdict, now_ms, retry_ms, wait_ms, used, key_used, entry, ttl_ms, account, probe, task = \
        raw[:11]
    states = tuple(
        QuotaState(q, int(raw[11 + 2 * i]), raw[12 + 2 * i] / 1000.0)
        for i, q in enumerate(a.quotas)
    )
    return AdmitResult(
        verdict=Verdict(verdict),
        now=now_ms / 1000.0,
        quotas=states,
        retry_after_s=retry_ms / 1000.0,
        entry=entry or None,
        entry_ttl_s=max(ttl_ms, 0) / 1000.0,
        account=_text(account) if account else None,
        wait_s=wait_ms / 1000.0,
        probe=bool(probe),
        task_account=_text(task) if task else None,
        budget_used=None if used < 0 else int(used),
        key_budget_used=None if key_used < 0 else int(key_used),
    )


def parse_slot(raw: list[Any]) -> Slot:
    verdict, account, wait_ms, probe = raw
    return Slot(Verdict(verdict), _text(account) if account else None, wait_ms / 1000.0,
                bool(probe))


def parse_claims(raw: list[Any]) -> list[Claim]:
    out = []
    for state, account, wait_ms, probe in raw:
        if state == 1:
            out.append(Claim(account=_text(account), probe=bool(probe)))
        else:
            out.append(Claim(wait_s=max(wait_ms, 0) / 1000.0, gone=state == 2))
    return out


def parse_account_states(raw: list[Any]) -> tuple[list[AccountState], bool]:
    """The accounts' states, and whether the account taken down was in rotation until then."""
    states = [AccountState(_text(name), max(down_ms, 0) / 1000.0,
                           None if free is None else int(free),
                           None if left is None else int(left),
                           None if why is None else int(why), int(used))
              for name, down_ms, why, free, left, used in raw[:-1]]
    return states, bool(raw[-1])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def finish(c: Completion) -> Args:
    idem_mode, answer = None, b""
    if c.idempotency:
        idem_mode = "done" if c.idempotency[1] is not None else "drop"
        answer = c.idempotency[1] or b""
    payload = _pack({
        "ticket": c.ticket,
        "settle": c.settle.value if c.settle and c.reservation_id else None,
        "rid": c.reservation_id if c.settle else None,
        "charge": c.charge,
        "hold_id": c.hold_id,
        "hold_ms": c.hold_ms if c.hold_id else None,
        "cache_ttl_ms": c.cache_put[2] if c.cache_put else None,
        "release": True if c.release else None,
        "idem": idem_mode,
        "idem_ttl_ms": c.idempotency[2] if c.idempotency else None,
        "owner_ttl_ms": c.task_owner[1] if c.task_owner else None,
        "task_account": c.task_account if c.task_owner else None,
        "event": c.event.decode() if c.event else None,
        "guard_ms": GUARD_TTL_MS if c.event or c.direct else None,
        "direct": {"period": d.period, "amount": d.amount, "key": d.key,
                   "context": d.context.decode()} if (d := c.direct) else None,
        "ledger": _ledger(c.ledger),
    })
    return [payload, c.cache_put[1] if c.cache_put else b"", answer]


def parse_settled(raw: Any) -> Settled:
    settled, spent, reserved, charged = raw
    return Settled(bool(settled), int(spent), int(reserved), int(charged))


def cancel(a: Admission) -> Args:
    rid = a.reservation.id if a.reservation else None
    return [_pack({"ticket": a.ticket, "rid": rid, "tomb_ms": CANCEL_TTL_MS})]


def parse_reservation(rid: str, value: bytes) -> PendingReservation:
    deadline, period, amount, key, context = value.split(b"|", 4)
    return PendingReservation(rid, int(deadline), period.decode(), int(amount), key.decode(),
                              context)


EMPTY: Args = [b"{}"]
