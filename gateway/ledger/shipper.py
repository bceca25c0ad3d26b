"""The ledger shipper: copies every team's ledger stream from the store into PostgreSQL.

One replica at a time ships (a store lock, renewed while it works). A pass reads each team's
stream after the team's cursor in pages of `batch_rows` and writes each page with the cursor's
move in one transaction (`LedgerDB.write`): a crash between pages resumes from the cursor, a
retried page skips the rows already there, and a second shipper that slipped in finds the cursor
moved and backs off. When PostgreSQL is away nothing is lost (the stream is the buffer, trimmed
only after `ledger.retention_days`): the shipper retries with backoff and keeps counting what
waits, for `gateway_ledger_pending` and `gateway_ledger_lag_seconds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from ..metrics import Metrics
from ..store import Store, StoreError
from ..store.base import LedgerEntry
from .postgres import CursorMoved, LedgerDB, LedgerUnavailable
from .rows import entry_order, to_row

log = logging.getLogger("gateway.ledger")
LOCK = "ledger-shipper"
_COUNT_PAGES = 50  # pages per team a pass reads ahead, only counting, while PostgreSQL is away
_WARN_EVERY_S = 60.0


class _LostLock(Exception):
    """Another replica holds the shipper lock now."""


@dataclass(slots=True)
class _Waiting:
    """A team's entries beyond PostgreSQL's cursor, as far as the shipper has read."""

    seen: str  # the last entry id read
    count: int = 0  # entries after the cursor, up to `seen`
    oldest_ms: int | None = None  # the store time of the first of them


class Shipper:
    def __init__(self, store: Store, db: LedgerDB, teams: Callable[[], Iterable[str]],
                 metrics: Metrics, *, batch_rows: int = 1000, interval_s: float = 1.0,
                 lock_ttl_s: float = 15.0, max_backoff_s: float = 30.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.db = db
        self._teams = teams
        self.metrics = metrics
        self.batch_rows = batch_rows
        self.interval_s = interval_s
        self.lock_ttl_s = lock_ttl_s
        self.max_backoff_s = max_backoff_s
        self._clock = clock
        self._owner = os.urandom(8).hex()
        self._locked_at = float("-inf")
        # until PostgreSQL has told us a team's cursor, count what arrives from now on
        self._start = f"{int(clock() * 1000) - 1}-{2**64 - 1}"
        self._cursors: dict[str, str] = {}
        self._waiting: dict[str, _Waiting] = {}
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self._warned_at = float("-inf")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self, timeout_s: float) -> None:
        """Ship what the store holds now (a final pass) within `timeout_s`, then stop."""
        self._stopping.set()
        if self._task is None:
            return
        done, _ = await asyncio.wait({self._task}, timeout=timeout_s)
        if not done:
            log.warning("ledger: the shutdown grace ended before the final pass; the rest "
                        "stays in the store for the next shipper")
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def once(self) -> int:
        """One pass over every team; returns the rows written (0 when another replica ships)."""
        try:
            held = await self._lock()
        except StoreError:
            self.metrics.store_errors.labels("ledger").inc()
            raise
        if not held:
            self._waiting.clear()
            self._report()
            return 0
        teams = list(self._teams())
        teams += [t for t in self._cursors if t not in teams]
        written = 0
        try:
            self._cursors.update(await self.db.cursors())
            teams += [t for t in self._cursors if t not in teams]
            for team in teams:
                written += await self._ship(team, self._cursors.get(team, "-"))
        except LedgerUnavailable:
            await self._count(teams)
            raise
        except StoreError:
            self.metrics.store_errors.labels("ledger").inc()
            raise
        except _LostLock:
            self._waiting.clear()
        finally:
            self._report()
        return written

    async def _run(self) -> None:
        delay = self.interval_s
        while True:
            final = self._stopping.is_set()
            try:
                await self.once()
            except LedgerUnavailable as exc:
                self._failed(str(exc))
                delay = min(delay * 2, self.max_backoff_s)
            except StoreError:
                delay = min(delay * 2, self.max_backoff_s)
            except Exception:  # a defect must not end shipping for the life of the process
                log.exception("ledger: shipping pass failed")
                delay = min(delay * 2, self.max_backoff_s)
            else:
                if self._failing:
                    log.info("ledger: PostgreSQL reachable again, shipping resumed")
                    self._failing = False
                delay = self.interval_s
            if final:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _ship(self, team: str, cursor: str) -> int:
        waiting = self._waiting_for(team, cursor)
        written = 0
        after = cursor
        while True:
            await self._renew()
            page = await self.store.ledger(team, after=after, limit=self.batch_rows)
            self._saw(waiting, page)
            waiting.oldest_ms = entry_order(page[0].id)[0] if page else None
            if not page:
                return written
            rows = [to_row(team, entry) for entry in page]
            try:
                inserted = await self.db.write(team, rows, after=after, upto=page[-1].id)
            except CursorMoved:
                log.info("ledger: another shipper copied team %s meanwhile", team)
                del self._cursors[team]
                self._waiting.pop(team, None)
                return written
            self.metrics.ledger_rows.inc(inserted)
            written += inserted
            after = self._cursors[team] = page[-1].id
            waiting.count = max(waiting.count - len(page), 0)
            if len(page) < self.batch_rows:
                waiting.count, waiting.oldest_ms = 0, None
                return written
            self._report()  # a long catch-up shows its progress

    async def _count(self, teams: Sequence[str]) -> None:
        """PostgreSQL is away: read ahead of what was counted, to show the backlog grow."""
        try:
            for team in teams:
                waiting = self._waiting_for(team, self._cursors.get(team, self._start))
                for _ in range(_COUNT_PAGES):
                    page = await self.store.ledger(team, after=waiting.seen,
                                                   limit=self.batch_rows)
                    if waiting.oldest_ms is None and page:
                        waiting.oldest_ms = entry_order(page[0].id)[0]
                    self._saw(waiting, page)
                    if len(page) < self.batch_rows:
                        break
        except StoreError:
            self.metrics.store_errors.labels("ledger").inc()

    def _waiting_for(self, team: str, cursor: str) -> _Waiting:
        waiting = self._waiting.get(team)
        if waiting is None or entry_order(waiting.seen) < entry_order(cursor):
            waiting = self._waiting[team] = _Waiting(seen=cursor)
        return waiting

    @staticmethod
    def _saw(waiting: _Waiting, page: Sequence[LedgerEntry]) -> None:
        seen = entry_order(waiting.seen)
        new = [e for e in page if entry_order(e.id) > seen]
        if new:
            waiting.count += len(new)
            waiting.seen = new[-1].id

    def _report(self) -> None:
        pending = [w for w in self._waiting.values() if w.count > 0]
        self.metrics.ledger_pending.set(sum(w.count for w in pending))
        oldest = [w.oldest_ms for w in pending if w.oldest_ms is not None]
        lag = self._clock() - min(oldest) / 1000 if oldest else 0.0
        self.metrics.ledger_lag.set(max(lag, 0.0))

    async def _lock(self) -> bool:
        held = await self.store.try_lock(LOCK, self._owner, int(self.lock_ttl_s * 1000))
        if held:
            self._locked_at = time.monotonic()
        return held

    async def _renew(self) -> None:
        if time.monotonic() - self._locked_at >= self.lock_ttl_s / 3 and not await self._lock():
            raise _LostLock

    def _failed(self, reason: str) -> None:
        self.metrics.ledger_errors.inc()
        self._failing = True
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            log.warning("ledger: cannot write to PostgreSQL, retrying with backoff (the store "
                        "keeps the entries): %s", reason)
