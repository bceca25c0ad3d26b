"""Usage reports: totals grouped by team, key, model, route or tag, per day or month (UTC),
from the ledger of record (SQL, every value a parameter) or, without one, from the store's
ledger events (`group`). `--by` is checked here."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from ..budget import from_milli
from .postgres import LedgerDB

Period = Literal["day", "month"]
COLUMNS = {"team": "team", "key": "key_id", "model": "model", "route": "route"}
_TAG = re.compile(r"tag:([A-Za-z0-9_.-]{1,64})")
_PERIOD_FORMAT = {"day": "YYYY-MM-DD", "month": "YYYY-MM"}
TOTALS = ("requests", "cached", "refunded", "credits", "saved")


def parse_by(text: str) -> tuple[str, ...]:
    """`team,key,model,tag:project` -> the fields, checked; raises ValueError naming the bad one."""
    fields = tuple(part.strip() for part in text.split(","))
    for name in fields:
        if name not in COLUMNS and not _TAG.fullmatch(name):
            raise ValueError(f"--by: unknown field {name[:70]!r}; use "
                             f"{', '.join(COLUMNS)} or tag:<name>")
    if len(set(fields)) != len(fields):
        raise ValueError("--by: a field is named twice")
    return fields


@dataclass(frozen=True, slots=True)
class Report:
    header: tuple[str, ...]
    rows: list[tuple[Any, ...]]


def query(by: tuple[str, ...], *, period: Period | None, since: datetime | None,
          until: datetime | None, team: str | None) -> tuple[str, list[Any]]:
    """The SQL of one report and its parameters (`by` from `parse_by`: at least one field).
    Rows are grouped on the truncated timestamp (cheap to hash); the period is formatted on the
    groups, not on every row."""
    args: list[Any] = []

    def param(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    keys = []
    if period is not None:
        keys.append(f"date_trunc({param(period)}, event_time AT TIME ZONE 'UTC')")
    for name in by:
        tag = _TAG.fullmatch(name)
        keys.append(f"event->'tags'->>{param(tag.group(1))}" if tag else COLUMNS[name])
    where = []
    if since is not None:
        where.append(f"event_time >= {param(since)}")
    if until is not None:
        where.append(f"event_time < {param(until)}")
    if team is not None:
        where.append(f"team = {param(team)}")
    names = [f"k{i}" for i in range(len(keys))]
    shown = [f"to_char(k0, {param(_PERIOD_FORMAT[period])})" if period else "k0", *names[1:]]
    positions = ", ".join(str(i + 1) for i in range(len(keys)))
    inner = (
        f"SELECT {', '.join(f'{k} AS {n}' for k, n in zip(keys, names, strict=True))}, "
        "count(*) AS requests, count(*) FILTER (WHERE cached) AS cached, "
        "count(*) FILTER (WHERE kind = 'refund') AS refunded, "
        "coalesce(sum(credits), 0)::bigint AS credits, coalesce(sum(saved), 0)::bigint AS saved "
        "FROM ledger_events" + (f" WHERE {' AND '.join(where)}" if where else "")
        + f" GROUP BY {positions}"
    )
    sql = f"SELECT {', '.join([*shown, *TOTALS])} FROM ({inner}) AS g ORDER BY {positions}"
    return sql, args


async def usage(db: LedgerDB, by: tuple[str, ...], *, period: Period | None = None,
                since: datetime | None = None, until: datetime | None = None,
                team: str | None = None) -> Report:
    """Totals per group; `since` is inclusive, `until` exclusive."""
    sql, args = query(by, period=period, since=since, until=until, team=team)
    async with db.connection() as conn, conn.transaction(readonly=True):
        # room to hash a month's groups in memory; JIT compiling costs more than it saves here
        await conn.execute("SET LOCAL work_mem = '64MB'; SET LOCAL jit = off")
        records = await conn.fetch(sql, *args)
    header = (*(("period",) if period else ()), *by, *TOTALS)
    rows = []
    for record in records:
        values = list(record.values())
        values[-2:] = [from_milli(values[-2]), from_milli(values[-1])]
        rows.append(tuple("" if v is None else v for v in values))
    return Report(header, rows)


def group(events: Iterable[dict[str, Any]], by: tuple[str, ...], *,
          period: Period | None = None) -> Report:
    """The same report from ledger events (the store's own ledger, without PostgreSQL); each
    event has its `time_ms`."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for event in events:
        key = []
        if period is not None:
            when = datetime.fromtimestamp(event["time_ms"] / 1000, UTC)
            key.append(when.strftime("%Y-%m-%d" if period == "day" else "%Y-%m"))
        for name in by:
            tag = _TAG.fullmatch(name)
            tags = event.get("tags")
            value = (tags.get(tag.group(1)) if isinstance(tags, dict) else None) if tag else (
                event.get(COLUMNS[name]))
            key.append(value if isinstance(value, str) else "")
        totals = groups.setdefault(tuple(key), [0, 0, 0, 0, 0])
        totals[0] += 1
        totals[1] += bool(event.get("cached"))
        totals[2] += event.get("kind") == "refund"
        totals[3] += _milli(event.get("credits"))
        totals[4] += _milli(event.get("saved"))
    header = (*(("period",) if period else ()), *by, *TOTALS)
    rows = [(*key, n, cached, refunded, from_milli(credits), from_milli(saved))
            for key, (n, cached, refunded, credits, saved) in sorted(groups.items())]
    return Report(header, rows)


def _milli(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
