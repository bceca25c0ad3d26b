"""The services a running gateway shares between requests, and the store failure policy."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from . import audit
from . import config as cfg
from .accounts import Health
from .bookkeeping import Bookkeeper
from .budget import from_milli, period_id
from .errors import StoreUnavailable
from .fairness import Waiters
from .metrics import Metrics
from .policy import Policy
from .singleflight import Flights
from .store import Store, StoreError, open_store
from .store.base import Admission, AdmitResult, Completion, Reservation, Settled, Verdict
from .tracing import Tracing
from .upstream import Upstream

if TYPE_CHECKING:
    from .webhooks import Webhooks

log = logging.getLogger("gateway")
HEARTBEAT_S = 5.0  # a process says it is alive this often ...
ALIVE_S = 30.0  # ... and is taken for dead this long after it last did
RESTART_SECTIONS = ("listen", "store", "upstream", "tracing")  # what a reload cannot change


@dataclass(frozen=True, slots=True)
class Reloaded:
    applied: list[str]  # config sections changed and applied
    restart_needed: list[str]  # changed, but they keep running as they are until a restart
    changes: dict[str, Any]  # what changed, by team and key id (audit.config_changes)

    def asdict(self) -> dict[str, Any]:
        return {"applied": self.applied, "restart_needed": self.restart_needed}


class Runtime:
    def __init__(self, policy: Policy, *, store: Store, upstream: Upstream, metrics: Metrics,
                 clock: Callable[[], float] = time.time, task_check_s: float = 600.0,
                 config_path: str | None = None, alive_s: float = ALIVE_S,
                 tracing: Tracing | None = None) -> None:
        self.policy = policy
        self.config_path = config_path
        # a process not heard from this long is taken for dead (its reservations, settled)
        self.alive_ms = int(alive_s * 1000)
        self.heartbeat_s = min(HEARTBEAT_S, alive_s / 3)
        self.generation: int | None = None  # the config generation this process runs
        self._heard_since: float | None = None  # since when the heartbeats reach the store
        self._refused_generation: int | None = None
        # a task's reservation waits this long for a poll to settle it before the reconciler asks
        self.task_check_ms = int(task_check_s * 1000)
        self.store = store
        self.upstream = upstream
        self.metrics = metrics
        self.tracing = tracing  # None: tracing is off (no `tracing` section)
        self.clock = clock
        self._fallback: Store | None = None
        # `store.on_error: open` refuses what it cannot decide without the store: a key is only
        # served once this process has a copy of the revocations, refreshed with each heartbeat
        self._revocations_known = False
        self.flights = Flights()
        self.health = Health(store, metrics, lambda: self.policy.accounts)
        self._waiters: dict[int, Waiters] = {}  # per store: the shared one, or the fallback
        self._admit_time = metrics.store_duration.labels("admit")  # once, not per request
        self.bookkeeper = Bookkeeper(
            store,
            on_settled=lambda c, settled: self.settled(c.team, c.period, settled),
            on_error=self.metrics.store_errors.labels("finish").inc,
            on_depth=self.metrics.bookkeeping_pending.set,
            on_round_trip=self.metrics.store_duration.labels("finish").observe,
            trace=tracing.bookkeeping if tracing is not None else None,
        )
        # this process's name: every ticket starts with it, and the store knows it is alive
        self.process = os.urandom(6).hex()
        self._tickets = itertools.count()
        self._warned_at = float("-inf")
        self.loop: asyncio.AbstractEventLoop | None = None  # the one it serves on, once started
        self.webhooks: Webhooks | None = None  # task webhooks (set by create_app)

    def ticket(self) -> str:
        """A name for one request that no other request of any process will have: it owns the
        request's locks and reservation (the client's X-Request-ID may be reused)."""
        return f"{self.process}.{next(self._tickets):x}"

    def reload(self) -> Reloaded:
        """Apply the changed config file here; in-flight requests finish under the config they
        started with. Raises `ConfigError` (and keeps the running config) when it is invalid.

        Teams, keys, limits, pricing, cache rules, admin keys and the rest change at once;
        `listen`, `store` and `upstream` (the address, the store, the upstream connection, its
        pacing and timings) keep running as they are until a restart.
        """
        if self.config_path is None:
            raise cfg.ConfigError("this gateway was not started from a config file")
        new, old = cfg.load(self.config_path), self.policy.config
        changed = [f.name for f in dataclasses.fields(cfg.Config)
                   if getattr(new, f.name) != getattr(old, f.name)]
        restart = [name for name in changed if name in RESTART_SECTIONS]
        kept = {name: getattr(old, name) for name in RESTART_SECTIONS}
        self.policy = Policy(replace(new, **kept), previous=self.policy)
        applied = [name for name in changed if name not in RESTART_SECTIONS]
        log.info("config reloaded", extra={"fields": {
            "applied": applied, "restart_needed": restart}})
        if restart:
            log.warning("config reload: changes to %s apply after a restart", ", ".join(restart))
        return Reloaded(applied, restart, audit.config_changes(old, new))

    async def reload_everywhere(self, actor: str, *,
                                wait_s: float = 2 * HEARTBEAT_S + 1) -> dict[str, Any]:
        """Reload here, then have every other process sharing the store reload too: a new
        config generation goes to the store, and each process reloads its own file at its next
        heartbeat. Waits up to `wait_s` for them, and says truthfully who did. `actor` (an
        admin key id, or `SIGHUP`) goes to the audit log with what changed."""
        reloaded = self.reload()
        await audit.record(self.store, actor, "reload", applied=reloaded.applied,
                           restart_needed=reloaded.restart_needed, changes=reloaded.changes)
        try:
            self.generation = await self.store.bump_config()
        except StoreError:
            return {"reloaded": True, **reloaded.asdict(), "generation": None,
                    "processes": {"reloaded": [self.process], "pending": [],
                                  "note": "the store is unreachable: only this process "
                                          "reloaded; the others will not know until it is back"}}
        deadline = time.monotonic() + wait_s
        while True:
            seen = (await self.store.processes()).seen
            alive = {name: gen for name, (gen, age) in seen.items() if age <= self.alive_ms}
            pending = sorted(name for name, gen in alive.items()
                             if gen < self.generation and name != self.process)
            if not pending or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.2)
        done = sorted(name for name in alive if name not in pending) or [self.process]
        return {"reloaded": True, **reloaded.asdict(), "generation": self.generation,
                "processes": {"reloaded": done, "pending": pending}}

    async def drain(self, timeout_s: float) -> None:
        """At shutdown: let the bookkeeping land (within the grace period), then stop it."""
        await self.bookkeeper.drain(timeout_s)
        await self.bookkeeper.close()

    async def keep_alive(self) -> None:
        """Tell the store, every few seconds, that this process is alive (the reconciler only
        settles the reservations of processes that are not); with `store.on_error: open`, also
        refresh this process's copy of the revocations."""
        while True:
            try:
                processes = await self.store.heartbeat(self.process, self.generation or 0)
                if self._heard_since is None:
                    self._heard_since = time.monotonic()
                self._follow_reloads(processes.generation)
                if self.policy.config.store.on_error == "open":
                    await self._copy_revocations()
                await self.health.flush()
            except StoreError:
                self._heard_since = None
                self.metrics.store_errors.labels("heartbeat").inc()
            await asyncio.sleep(self.heartbeat_s)

    def liveness_known(self) -> bool:
        """Whether the store's list of live processes can be trusted: this process has reached
        it for a whole `alive_ms`, so after an outage every live process had time to say so."""
        return (self._heard_since is not None
                and time.monotonic() - self._heard_since >= self.alive_ms / 1000)

    def _follow_reloads(self, generation: int) -> None:
        """Reload when another process did (a new config generation in the store)."""
        if self.generation is None:  # just started: the file read at start-up is current
            self.generation = generation
            return
        if generation <= self.generation or generation == self._refused_generation:
            return
        try:
            self.reload()
        except cfg.ConfigError as exc:
            self._refused_generation = generation  # said once, not at every heartbeat
            log.error("config reload (generation %d) refused: %s", generation, exc)
            return
        self.generation = generation

    async def _copy_revocations(self) -> None:
        teams = list(self.policy.teams)
        for team, revoked in zip(teams, await self.store.revoked_many(teams), strict=True):
            for key_id in await self.fallback.revoked(team) - revoked:
                await self.fallback.revoke(team, key_id, False)
            for key_id in revoked:
                await self.fallback.revoke(team, key_id, True)
        self._revocations_known = True

    async def revoke(self, team: str, key_id: str, revoked: bool) -> None:
        """Revoke (or accept again) a key, on every replica, and in this process's copy."""
        await self.store.revoke(team, key_id, revoked)
        if self._fallback is not None:
            await self._fallback.revoke(team, key_id, revoked)

    async def admit(self, admission: Admission) -> tuple[AdmitResult, Store]:
        """Ask the shared store; when it is away, fail closed or fall back as configured."""
        if self.bookkeeper.saturated:  # the store is not keeping up with what it already has
            self.metrics.store_errors.labels("admit").inc()
            raise StoreUnavailable()
        started = time.perf_counter()
        try:
            try:
                result = await self.store.admit(admission)
            finally:
                self._admit_time.observe(time.perf_counter() - started)
            if (result.verdict is Verdict.NOT_FOUND and self._fallback is not None
                    and self.bookkeeper.pending):
                # a task created while the store was away: its owner may still be on the way
                local = await self._fallback.admit(replace(admission, count_quota=False))
                if local.verdict is not Verdict.NOT_FOUND:
                    return replace(local, quotas=result.quotas), self._fallback
            return result, self.store
        except StoreError as exc:
            self.metrics.store_errors.labels("admit").inc()
            if exc.maybe_ran:  # the script may still run once the store answers: undo it then
                self.bookkeeper.cancel(admission)
            if self.policy.config.store.on_error == "closed":
                raise StoreUnavailable() from None
        return await self._admit_alone(admission), self.fallback

    async def _admit_alone(self, admission: Admission) -> AdmitResult:
        """`store.on_error: open`: decide with this process's own store, and refuse what cannot
        be decided safely without the shared one: a key whose revocation is unknown, an
        Idempotency-Key (it may already have run elsewhere), a task this process has not seen
        (it may be the team's, created elsewhere)."""
        if not self._revocations_known or admission.idempotency is not None:
            raise StoreUnavailable()
        self.metrics.store_fallback.inc()
        now = time.monotonic()
        if now - self._warned_at >= self.policy.config.store.warn_interval_s:
            self._warned_at = now
            log.warning("store unreachable: serving without shared limits (store.on_error: open)")
        result = await self.fallback.admit(replace(admission, budget_limit=None,
                                                   key_budget_limit=None))
        if result.verdict is Verdict.NOT_FOUND:
            raise StoreUnavailable()
        return result

    @property
    def fallback(self) -> Store:
        """`store.on_error: open`: per-process quotas while the shared store is away."""
        if self._fallback is None:
            self._fallback = open_store("memory://", prefix=self.policy.config.store.key_prefix,
                                        clock=self.clock, memory_max_bytes=16 * 1024 * 1024)
        return self._fallback

    def waiters(self, store: Store) -> Waiters:
        """The requests of this process waiting for an upstream slot in `store`."""
        waiters = self._waiters.get(id(store))
        if waiters is None:
            waiters = self._waiters[id(store)] = Waiters(store,
                                                         lambda: self.policy.accounts.paces)
        return waiters

    async def upstream_slot(self, account: str | None) -> float | None:
        """Book `account`'s next upstream slot and wait for it (a call outside `admit`: a
        retry, a reconciler's poll; None: the first account). Returns None once booked, or the
        seconds to wait when the allowance is spent beyond the queue timeout."""
        paces = self.policy.accounts.paces
        pace = next((p for p in paces if p.id == account), paces[0])
        if pace.interval_ms == 0:
            return None
        booked, wait = await self.store.pace(
            pace, self.policy.config.upstream.queue_timeout_s * 1000.0)
        if not booked:
            return wait
        await asyncio.sleep(wait)
        return None

    async def finish(self, store: Store, completion: Completion, *,
                     reservation: Reservation | None = None, first: bool = False) -> None:
        """A request's bookkeeping: written now when `first` (a later request relies on it at
        once), else queued for the next batch; it lands however long the store is away.

        `store` admitted the request. When that was this process's own store (the shared one
        was away, `on_error: open`), it is settled there now, and in the shared store once it
        is back, `reservation` (the request's own) as if it had been held there."""
        if store is not self.store:
            await self.fallback.finish(completion)
            if reservation is not None and completion.reservation_id == reservation.id:
                completion = replace(completion, direct=reservation)
            self.bookkeeper.add(completion)
        elif first:
            await self.bookkeeper.commit(completion)
        else:
            self.bookkeeper.add(completion)
        if completion.task_owner and self.policy.config.store.on_error == "open":
            # this process's own copy of who owns what, for when the shared store is away
            await self.fallback.finish(Completion(completion.team, completion.ticket,
                                                  task_owner=completion.task_owner))

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
