"""Credit budgets: calendar periods in UTC and the fixed-point unit the store counts in.

The store keeps credits as integer millicredits so that concurrent reservations, settlements and
refunds add up exactly; `spent` is what was settled and `reserved` what is held for requests in
flight (and for async tasks until their final status is seen).
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta

from .config import Period

MILLI = 1000


def to_milli(credits: float) -> int:
    return round(credits * MILLI)


def from_milli(milli: int) -> float:
    value = milli / MILLI
    return int(value) if value == int(value) else value


def period_id(period: Period, now: float) -> str:
    """The store field suffix of the calendar period that contains `now` (epoch seconds)."""
    return _period_id(period, int(now))


@functools.lru_cache(maxsize=64)  # called twice per request; the answer changes once a day
def _period_id(period: Period, now: int) -> str:
    day = datetime.fromtimestamp(now, UTC)
    if period == "day":
        return day.strftime("d%Y-%m-%d")
    if period == "week":
        year, week, _ = day.isocalendar()
        return f"w{year}-W{week:02d}"
    if period == "month":
        return day.strftime("m%Y-%m")
    return "total"


def period_end(period: Period, now: float) -> datetime | None:
    """When the period that contains `now` ends; `None` for a total budget."""
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day + timedelta(days=1)
    if period == "week":
        return day + timedelta(days=7 - day.weekday())
    if period == "month":
        return (day.replace(day=28) + timedelta(days=4)).replace(day=1)
    return None
