"""The services a running gateway shares between requests, and the store failure policy."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

from . import config as cfg
from .asgi import Reply
from .bookkeeping import Bookkeeper
from .budget import from_milli, period_id
from .errors import StoreUnavailable
from .metrics import Metrics
from .policy import Policy
from .store import MemoryStore, Store, StoreError
from .store.base import Admission, AdmitResult, Completion, Settled
from .upstream import Upstream

log = logging.getLogger("gateway")


class Runtime:
    def __init__(self, policy: Policy, *, store: Store, upstream: Upstream, metrics: Metrics,
                 clock: Callable[[], float] = time.time, task_check_s: float = 600.0) -> None:
        self.policy = policy
        # a task's reservation waits this long for a poll to settle it before the reconciler asks
        self.task_check_ms = int(task_check_s * 1000)
        self.store = store
        self.upstream = upstream
        self.metrics = metrics
        self.clock = clock
        # `store.on_error: open`: per-process quotas while the shared store is away
        self.fallback = MemoryStore(prefix=policy.config.store.key_prefix, clock=clock)
        self.flights: dict[str, asyncio.Future[Reply]] = {}
        self.bookkeeper = Bookkeeper(
            lambda c, settled: self.settled(c.team, c.period, settled),
            self.metrics.store_errors.labels("finish").inc)
        self._ticket_prefix = os.urandom(6).hex()
        self._tickets = itertools.count()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._warned_at = float("-inf")

    def ticket(self) -> str:
        """A name for one request that no other request of any process will have: it owns the
        request's locks and reservation (the client's X-Request-ID may be reused)."""
        return f"{self._ticket_prefix}{next(self._tickets):x}"

    def reload(self, path: str) -> cfg.Config:
        """Apply a changed config file; in-flight requests finish under the one they started with.

        Teams, keys, limits, pricing, cache rules and admin keys change at once; the listen
        address, the store and the upstream connection need a restart (a warning says so).
        Raises `ConfigError` (and keeps the running config) when the file is invalid.
        """
        config = cfg.load(path)
        old = self.policy.config
        for section in ("listen", "store", "upstream"):
            if getattr(config, section) != getattr(old, section):
                log.warning("config reload: changes to %r apply after a restart", section)
        self.policy = Policy(config, previous=self.policy)
        log.info("config reloaded")
        return config

    def submit(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run bookkeeping after the response; `drain` waits for it at shutdown."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout_s: float) -> None:
        """At shutdown: wait for the background work and the bookkeeping queue to finish."""
        deadline = time.monotonic() + timeout_s
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
        await self.bookkeeper.drain(max(deadline - time.monotonic(), 0.0))
        await self.bookkeeper.close()

    async def admit(self, admission: Admission) -> tuple[AdmitResult, Store]:
        """Ask the shared store; when it is away, fail closed or fall back as configured."""
        try:
            return await self.store.admit(admission), self.store
        except StoreError:
            self.metrics.store_errors.labels("admit").inc()
            # the script may still run once the store answers again: make sure it does nothing
            self.submit(self._cancel(admission))
            if self.policy.config.store.on_error == "closed":
                raise StoreUnavailable() from None
        self.metrics.store_fallback.inc()
        now = time.monotonic()
        if now - self._warned_at >= self.policy.config.store.warn_interval_s:
            self._warned_at = now
            log.warning("store unreachable: serving without shared limits (store.on_error: open)")
        return await self.fallback.admit(replace(admission, budget_limit=None)), self.fallback

    async def _cancel(self, admission: Admission, *, attempts: int = 40) -> None:
        delay = 0.25
        for _ in range(attempts):
            try:
                await self.store.cancel(admission)
                return
            except StoreError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        log.error("store unreachable: a timed-out admission could not be cancelled",
                  extra={"fields": {"team": admission.team, "message": "cancel failed"}})

    async def upstream_slot(self) -> float | None:
        """Book the organisation's next upstream slot and wait for it (a call outside `admit`:
        a retry, a reconciler's poll). Returns None once booked, or the seconds to wait when the
        allowance is spent beyond the queue timeout."""
        pace = self.policy.pace
        if pace is None:
            return None
        booked, wait = await self.store.pace(pace)
        if not booked:
            return wait
        await asyncio.sleep(wait)
        return None

    def finish(self, store: Store, completion: Completion) -> None:
        """Queue a request's bookkeeping; it reaches the store in the next batch."""
        self.bookkeeper.add(store, completion)

    def settled(self, team: str, period: str | None, settled: Settled) -> None:
        if not settled.settled:
            return
        if settled.charged:
            self.metrics.credits_charged.labels(team).inc(from_milli(settled.charged))
        self.budget_seen(team, period, settled.spent + settled.reserved)

    def budget_seen(self, team: str, period: str | None, used: int | None) -> None:
        """Keep the remaining-budget gauge in step with the shared store's numbers."""
        policy = self.policy.teams.get(team)
        if policy is None or policy.budget is None or used is None or policy.budget_limit is None:
            return
        if period is not None and period != period_id(policy.budget.period, self.clock()):
            return
        self.metrics.budget_remaining.labels(team).set(from_milli(policy.budget_limit - used))
