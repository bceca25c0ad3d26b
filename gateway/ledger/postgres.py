"""The PostgreSQL side of the ledger: one small asyncpg pool, the batch write and the reads.

Every failure (refused, cut, timed out, refused by the server) surfaces as `LedgerUnavailable`,
with a message that never carries the URL's password.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg

from ..store.base import LedgerEntry
from .rows import Row, entry_order, entry_time


class LedgerUnavailable(Exception):
    """PostgreSQL could not be reached, timed out, or refused the statement."""


class CursorMoved(Exception):
    """Another shipper copied this team's entries meanwhile: read the cursors again."""


_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)

_LOCK_CURSOR = """
INSERT INTO ledger_cursors (team) VALUES ($1)
ON CONFLICT (team) DO UPDATE SET team = EXCLUDED.team
RETURNING after_id"""

_INSERT = """
INSERT INTO ledger_events (id, team, event_time, seq, key_id, model, route, kind, cached,
                           credits, reserved, saved, request_id, period, event)
SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::bigint[], $5::text[],
                     $6::text[], $7::text[], $8::text[], $9::boolean[], $10::bigint[],
                     $11::bigint[], $12::bigint[], $13::text[], $14::text[], $15::jsonb[])
ON CONFLICT (id) DO NOTHING"""

_MOVE_CURSOR = "UPDATE ledger_cursors SET after_id = $2, updated_at = now() WHERE team = $1"

_PAGE = """
SELECT (extract(epoch FROM event_time) * 1000)::bigint AS ms, seq, event::text AS event
FROM ledger_events
WHERE team = $1 AND (event_time, seq) > ($2, $3)
ORDER BY event_time, seq
LIMIT $4"""


def redacted(url: str) -> str:
    """The URL without its password, for logs and `repr`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username}:***@{host}").geturl()


def url_secrets(url: str | None) -> list[str]:
    """The URL's password as written and as decoded: what log redaction must mask."""
    password = urlsplit(url).password if url else None
    return [s for s in {password, unquote(password or "")} if s]


class LedgerDB:
    def __init__(self, url: str, *, timeout_s: float = 10.0, max_connections: int = 4) -> None:
        self._url = url
        self._secrets = url_secrets(url)
        self.timeout_s = timeout_s
        self._max = max_connections
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()

    def __repr__(self) -> str:
        return f"LedgerDB({redacted(self._url)!r})"

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy]:
        """A pooled connection; every driver or server error becomes `LedgerUnavailable`."""
        try:
            pool = await self._get_pool()
            async with pool.acquire(timeout=self.timeout_s) as conn:
                yield conn
        except _ERRORS as exc:
            raise LedgerUnavailable(self._describe(exc)) from None

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self.timeout_s)
        except (TimeoutError, *_ERRORS):
            pool.terminate()

    async def cursors(self) -> dict[str, str]:
        """Each team's cursor: the last store entry id already copied."""
        async with self.connection() as conn:
            rows = await conn.fetch("SELECT team, after_id FROM ledger_cursors")
        return {r["team"]: r["after_id"] for r in rows}

    async def write(self, team: str, rows: Sequence[Row], *, after: str, upto: str) -> int:
        """Copy one page in one transaction and move the team's cursor from `after` to `upto`.

        Raises `CursorMoved` (and writes nothing) when the cursor is not at `after`; rows whose
        id is already there are skipped. Returns the rows inserted.
        """
        columns: list[list[Any]] = [[] for _ in range(15)]
        for row in rows:
            for i, value in enumerate((
                    row.id, row.team, row.event_time, row.seq, row.key_id, row.model, row.route,
                    row.kind, row.cached, row.credits, row.reserved, row.saved, row.request_id,
                    row.period, row.event)):
                columns[i].append(value)
        async with self.connection() as conn, conn.transaction():
            current = await conn.fetchval(_LOCK_CURSOR, team)
            if current != after:
                raise CursorMoved(team)
            status = await conn.execute(_INSERT, *columns)
            await conn.execute(_MOVE_CURSOR, team, upto)
        return int(status.rsplit(" ", 1)[1])

    async def ledger(self, team: str, *, after: str = "-", limit: int = 100) -> list[LedgerEntry]:
        """One team's entries after a store entry id, in the store's order (as `Store.ledger`)."""
        ms, seq = entry_order(after)
        async with self.connection() as conn:
            rows = await conn.fetch(_PAGE, team, entry_time(max(ms, 0)), seq, limit)
        return [LedgerEntry(f"{r['ms']}-{r['seq']}", r["event"].encode()) for r in rows]

    async def _get_pool(self) -> asyncpg.Pool:
        async with self._opening:
            if self._pool is None:
                # min_size 0: nothing connects until used, so a down PostgreSQL delays nothing
                self._pool = await asyncpg.create_pool(
                    self._url, min_size=0, max_size=self._max, timeout=self.timeout_s,
                    command_timeout=self.timeout_s,
                    server_settings={"application_name": "aio-gateway"})
            return self._pool

    def _describe(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        for secret in self._secrets:
            text = text.replace(secret, "***")
        if isinstance(exc, asyncpg.UndefinedTableError):
            text += " (run `aio-gateway ledger migrate --config FILE`)"
        return text
