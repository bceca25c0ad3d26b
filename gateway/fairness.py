"""Waiting for an upstream slot, and moving to another account when one refuses its key.

The store decides whose turn it is (`lua/lib_slots.lua`: start-time fair queuing between teams,
across every replica); this module is the waiting side. A request that `admit` let through with
a free slot goes at once. One that was queued waits for the store to grant it a slot: each
process has one `Waiters` loop that asks the store, in one call, about those of its waiting
requests whose turn is expected (the store's estimate), and about the others now and then: a
turn can come sooner than expected when requests ahead leave. Slots are granted when they come
free, by whichever call runs then; the request they went to finds out at its next ask.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .errors import RateLimited
from .store import Store, StoreError
from .store.base import AccountPace, AdmitResult, Claim, SlotAsk, Verdict

if TYPE_CHECKING:
    from .request import ParsedRequest
    from .runtime import Runtime

log = logging.getLogger("gateway")
MIN_POLL_S = 0.005  # never ask again sooner than this
MAX_POLL_S = 0.5  # a turn expected later: asked about again after half the wait, or this
TOGETHER_S = 0.005  # requests whose turn is expected this close together are asked about at once
STORE_RETRY_S = 0.1  # after a failed call
_BUSY = {
    "pace": "The organisation's upstream allowance is spent; retry shortly.",
    "waiting": "Too many of this team's requests are waiting for the upstream; retry shortly.",
}


def busy(wait_s: float, *, reason: str = "pace") -> RateLimited:
    """The 429 of a request whose upstream slot would not come in time (`pace`), or that found
    its team's queue full (`waiting`)."""
    error = RateLimited(_BUSY[reason], wait_s=wait_s)
    error.reason = reason
    return error


def ratelimit_headers(per_minute: int | None, wait_s: float) -> list[tuple[bytes, bytes]]:
    """`RateLimit-Policy` / `RateLimit` items for the upstream allowance, on a 429 that it
    caused: nothing left now, whole again in `wait_s` (the team's own quotas say nothing of it)."""
    wait = max(1, int(-(-wait_s // 1)))
    headers = [(b"ratelimit", b'"upstream";r=0;t=%d' % wait)]
    if per_minute is not None:
        headers.insert(0, (b"ratelimit-policy", b'"upstream";q=%d;w=60' % per_minute))
    return headers


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[Claim]
    wake: float  # loop time at which to ask the store again
    deadline: float  # loop time at which it stops waiting


class Waiters:
    """This process's requests waiting for a slot in one store; one store call per wake-up."""

    def __init__(self, store: Store, accounts: Callable[[], tuple[AccountPace, ...]]) -> None:
        self._store = store
        self._accounts = accounts
        self._waiting: dict[str, _Waiter] = {}
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._leaving: set[asyncio.Task[Claim]] = set()

    def __len__(self) -> int:
        return len(self._waiting)

    async def wait(self, ticket: str, expect_s: float, timeout_s: float) -> Claim:
        """The slot granted to `ticket` (queued by the store, its turn expected in `expect_s`),
        or a Claim without one, with the wait it still had: once `timeout_s` has passed, or as
        soon as the store expects its turn later than that. The ticket has left the queue then
        (unless its slot came at the last moment: then it is taken)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        waiter = _Waiter(loop.create_future(), now + next_ask(expect_s), now + timeout_s)
        self._waiting[ticket] = waiter
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())
        self._kick.set()
        try:
            async with asyncio.timeout(timeout_s):
                claim = await asyncio.shield(waiter.future)
            if claim.account is not None or claim.gone:
                return claim
        except TimeoutError:
            pass
        except BaseException:  # cancelled: give the place up, in the background
            leaving = loop.create_task(self._leave(ticket))
            self._leaving.add(leaving)
            leaving.add_done_callback(self._leaving.discard)
            raise
        finally:
            self._waiting.pop(ticket, None)
        return await self._leave(ticket)

    async def _leave(self, ticket: str) -> Claim:
        try:
            (claim,) = await self._store.claim([ticket], self._accounts(), leave=True)
        except StoreError:
            return Claim(gone=True)  # its place expires by itself
        return claim

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            due = min(w.wake for w in self._waiting.values())
            if due > loop.time():
                self._kick.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(due):
                        await self._kick.wait()
                continue
            soon = loop.time() + TOGETHER_S
            tickets = [t for t, w in self._waiting.items() if w.wake <= soon]
            try:
                claims = await self._store.claim(tickets, self._accounts())
            except StoreError:
                for waiter in self._waiting.values():
                    waiter.wake = loop.time() + STORE_RETRY_S
                continue
            except Exception as exc:  # a defect: every waiter hears of it, not just a timeout
                log.exception("waiting for upstream slots failed")
                for waiter in self._waiting.values():
                    if not waiter.future.done():
                        waiter.future.set_exception(exc)
                self._waiting.clear()
                return
            now = loop.time()
            for ticket, claim in zip(tickets, claims, strict=True):
                found = self._waiting.get(ticket)
                if found is None:
                    continue
                if claim.account is not None or claim.gone or now + claim.wait_s > found.deadline:
                    del self._waiting[ticket]  # granted, gone, or its turn comes too late
                    if not found.future.done():
                        found.future.set_result(claim)
                else:
                    found.wake = now + next_ask(claim.wait_s)


def next_ask(expect_s: float) -> float:
    """When to ask again about a request whose turn the store expects in `expect_s`."""
    if expect_s <= MAX_POLL_S:
        return max(expect_s, MIN_POLL_S)
    return max(expect_s / 2, MAX_POLL_S)


class Passage:
    """One request's way to the upstream: the account whose slot it holds (waited for when
    the store queued it), and another account's slot when one refuses its key."""

    __slots__ = ("_account", "_admitted", "_expect_s", "_pinned", "_queued", "_req", "_rt",
                 "_store", "_tried", "account", "probe")

    def __init__(self, rt: Runtime, req: ParsedRequest, result: AdmitResult,
                 store: Store) -> None:
        self._rt = rt
        self._req = req
        self._store = store
        self._account = result.account
        self._queued = result.verdict is Verdict.QUEUED
        self._expect_s = result.wait_s
        self._admitted = time.monotonic()
        self._tried: tuple[str, ...] = ()  # accounts that refused (rare: no list for each)
        # a task is polled through the account that created it: another key would not see it
        self._pinned = result.task_account is not None
        self.probe = result.probe  # the account is out of rotation: nothing else was left
        self.account: str | None = None  # the one taken, once taken

    @property
    def _ask(self) -> SlotAsk | None:
        return self._req.admission.slot

    async def take(self) -> str:
        """The account to send through, once its slot is granted; raises `RateLimited` (429)
        when the turn does not come within `upstream.queue_timeout_s`."""
        team = self._req.team.name
        account = self._account
        if self._queued:
            account = await self._wait(self._expect_s, self._admitted)
        if account is None:  # one account, unpaced: no slot to take
            account = self._rt.policy.accounts.only or self._rt.policy.accounts.paces[0].id
        m = self._rt.metrics
        waited = time.monotonic() - self._admitted
        m.upstream_wait.labels(team).observe(waited)
        m.upstream_account_wait.labels(account).observe(waited)
        m.upstream_slots.labels(account, team).inc()
        self.account = account
        return account

    async def _wait(self, expect_s: float, since: float) -> str:
        """The account of the slot the store queued this request for (at `since`)."""
        ask = self._ask
        assert ask is not None  # only a request asking for a slot is queued
        team = self._req.team.name
        left = ask.queue_ms / 1000.0 - (time.monotonic() - since)
        gauge = self._rt.metrics.upstream_waiting.labels(team)
        gauge.inc()
        try:
            claim = await self._rt.waiters(self._store).wait(
                self._req.admission.ticket, expect_s, max(left, 0.0))
        finally:
            gauge.dec()
        if claim.account is None:  # a retry would wait this long, less what it may wait
            raise busy(max(claim.wait_s - ask.queue_ms / 1000.0, 0.0))
        self.probe = claim.probe
        return claim.account

    async def refused(self, account: str, status: int) -> str | None:
        """`account` refused the organisation's key (401) or has no credits (402): it leaves
        the rotation; returns the account of a new slot (waited for if queued), or None when
        no other account is left for this request."""
        await self._rt.health.refused(account, status)
        self._tried += (account,)
        ask = self._ask
        if ask is None or self._pinned:
            return None
        usable = tuple(a for a in ask.usable if a not in self._tried)
        if not usable:
            return None
        try:
            slot = await self._store.slot(self._req.team.name, self._req.admission.ticket,
                                          replace(ask, usable=usable))
        except StoreError:
            return None
        if slot.verdict is Verdict.QUEUED:
            account_ = await self._wait(slot.wait_s, time.monotonic())
        elif slot.verdict is Verdict.ADMIT and slot.account is not None:
            account_, self.probe = slot.account, slot.probe
        elif slot.verdict in (Verdict.PACE, Verdict.QUEUE_FULL):
            raise busy(slot.wait_s)
        else:
            return None
        self._rt.metrics.upstream_slots.labels(account_, self._req.team.name).inc()
        self.account = account_
        return account_

    async def recovered(self) -> None:
        """The account taken as a probe answered: it is back in rotation."""
        if self.probe and self.account is not None:
            self.probe = False
            await self._rt.health.recovered(self.account)
