"""The services a running gateway shares between requests, and the store failure policy."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace

from . import config as cfg
from .bookkeeping import Bookkeeper
from .budget import from_milli, period_id
from .errors import StoreUnavailable
from .metrics import Metrics
from .policy import Policy
from .singleflight import Flights
from .store import Store, StoreError, open_store
from .store.base import Admission, AdmitResult, Completion, Settled
from .upstream import Upstream

log = logging.getLogger("gateway")
HEARTBEAT_S = 5.0  # a process says it is alive this often ...
ALIVE_MS = 30_000  # ... and is taken for dead this long after it last did


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
        self._fallback: Store | None = None
        self.flights = Flights()
        self.bookkeeper = Bookkeeper(
            store,
            on_settled=lambda c, settled: self.settled(c.team, c.period, settled),
            on_error=self.metrics.store_errors.labels("finish").inc,
            on_depth=self.metrics.bookkeeping_pending.set,
        )
        # this process's name: every ticket starts with it, and the store knows it is alive
        self.process = os.urandom(6).hex()
        self._tickets = itertools.count()
        self._warned_at = float("-inf")
        self.loop: asyncio.AbstractEventLoop | None = None  # the one it serves on, once started

    def ticket(self) -> str:
        """A name for one request that no other request of any process will have: it owns the
        request's locks and reservation (the client's X-Request-ID may be reused)."""
        return f"{self.process}.{next(self._tickets):x}"

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

    async def drain(self, timeout_s: float) -> None:
        """At shutdown: let the bookkeeping land (within the grace period), then stop it."""
        await self.bookkeeper.drain(timeout_s)
        await self.bookkeeper.close()

    async def keep_alive(self) -> None:
        """Tell the store, every few seconds, that this process is alive: the reconciler only
        settles the reservations of processes that are not."""
        while True:
            try:
                await self.store.heartbeat(self.process, ALIVE_MS)
            except StoreError:
                self.metrics.store_errors.labels("heartbeat").inc()
            await asyncio.sleep(HEARTBEAT_S)

    async def admit(self, admission: Admission) -> tuple[AdmitResult, Store]:
        """Ask the shared store; when it is away, fail closed or fall back as configured."""
        if self.bookkeeper.saturated:  # the store is not keeping up with what it already has
            self.metrics.store_errors.labels("admit").inc()
            raise StoreUnavailable()
        try:
            return await self.store.admit(admission), self.store
        except StoreError as exc:
            self.metrics.store_errors.labels("admit").inc()
            if exc.maybe_ran:  # the script may still run once the store answers: undo it then
                self.bookkeeper.cancel(admission)
            if self.policy.config.store.on_error == "closed":
                raise StoreUnavailable() from None
        self.metrics.store_fallback.inc()
        now = time.monotonic()
        if now - self._warned_at >= self.policy.config.store.warn_interval_s:
            self._warned_at = now
            log.warning("store unreachable: serving without shared limits (store.on_error: open)")
        return await self.fallback.admit(replace(admission, budget_limit=None,
                                                 key_budget_limit=None)), self.fallback

    @property
    def fallback(self) -> Store:
        """`store.on_error: open`: per-process quotas while the shared store is away."""
        if self._fallback is None:
            self._fallback = open_store("memory://", prefix=self.policy.config.store.key_prefix,
                                        clock=self.clock, memory_max_bytes=16 * 1024 * 1024)
        return self._fallback

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
        """Queue a request's bookkeeping; it lands in the next batch (or when the store is back).
        """
        if store is self.store:
            self.bookkeeper.add(completion)
        else:
            asyncio.get_running_loop().create_task(self._local(store, completion))

    async def commit(self, store: Store, completion: Completion) -> None:
        """Write a request's bookkeeping before its answer is released."""
        if store is self.store:
            await self.bookkeeper.commit(completion)
        else:
            await self._local(store, completion)

    async def _local(self, store: Store, completion: Completion) -> None:
        self.settled(completion.team, completion.period, await store.finish(completion))

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
