"""A store ledger entry as a row of `ledger_events`: pure, and strict about what it copies.

The store writes these events itself, but the shipper must never stall on one it cannot read:
a field of the wrong type becomes NULL (or 0 for counts) and the whole event is kept in the
`event` column as it was.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from ..store.base import LedgerEntry

ENTRY_ID = re.compile(r"([0-9]{1,15})-([0-9]{1,20})")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_INT64 = 2**63 - 1
_MAX_TEXT = 512
_MAX_ID = 200


@dataclass(frozen=True, slots=True)
class Row:
    id: str
    team: str
    event_time: datetime
    seq: int
    key_id: str | None
    model: str | None
    route: str | None
    kind: str
    cached: bool
    credits: int
    reserved: int | None
    saved: int
    request_id: str | None
    period: str | None
    event: str  # JSON text for the jsonb column


def entry_order(entry_id: str) -> tuple[int, int]:
    """The store's entry id "<ms>-<seq>" as a sortable pair ("-" = before everything)."""
    if entry_id == "-":
        return (-1, -1)
    match = ENTRY_ID.fullmatch(entry_id)
    if match is None:
        raise ValueError(f"not a ledger entry id: {entry_id[:40]!r}")
    return int(match.group(1)), int(match.group(2))


def entry_time(ms: int) -> datetime:
    """Exact (no float rounding): the row's time must give back the entry id."""
    return _EPOCH + timedelta(milliseconds=ms)


def to_row(team: str, entry: LedgerEntry) -> Row:
    ms, seq = entry_order(entry.id)
    if ms < 0:
        raise ValueError("a ledger entry needs an id")
    try:
        event = orjson.loads(entry.event)
    except orjson.JSONDecodeError:
        event = None
    if not isinstance(event, dict):
        event = {"unreadable": entry.event.decode("utf-8", "replace")[:_MAX_TEXT]}
    own_id = event.get("event_id")  # unique per ledger event (the request's ticket)
    if not isinstance(own_id, str) or not 0 < len(own_id) <= _MAX_ID or "\x00" in own_id:
        own_id = f"{team}/{entry.id}"
    return Row(
        id=own_id,
        team=team,
        event_time=entry_time(ms),
        seq=seq,
        key_id=_text(event.get("key_id")),
        model=_text(event.get("model")),
        route=_text(event.get("route")),
        kind=_text(event.get("kind")) or "unknown",
        cached=event.get("cached") is True,
        credits=_int(event.get("credits")) or 0,
        reserved=_int(event.get("reserved")),
        saved=_int(event.get("saved")) or 0,
        request_id=_text(event.get("request_id")),
        period=_text(event.get("period")),
        # jsonb refuses the NUL character; nothing the gateway writes contains one
        event=orjson.dumps(event).decode().replace("\\u0000", "\\ufffd"),
    )


def _text(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    return value[:_MAX_TEXT].replace("\x00", "\ufffd")


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > _INT64:
        return None
    return value
