"""The reconciler: settles reservations nobody came back for.

A task's reservation is held under `task:<id>` until somebody sees the task's final status: the
team's own polls settle it on the way through. The reconciler covers the rest, as
`settlement.reconcile` decides: tasks nobody polls (asked about upstream, then settled like a
poll) and requests whose process died before settling (charged what they reserved). It never
touches the reservations of a live process: those are still being answered, or their
bookkeeping is on its way to the store.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import replace
from typing import TYPE_CHECKING

from .errors import GatewayError
from .settlement import STORE_SETTLE, Answer, Charge, Decision, read_answer, reconcile
from .store import StoreError
from .store.base import Completion, PendingReservation, Settle, process_of

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("gateway.tasks")


class Reconciler:
    """Settles overdue reservations; one replica at a time does a round (a store lock)."""

    def __init__(self, runtime: Runtime, *, interval_s: float = 30.0) -> None:
        self.rt = runtime
        self.interval_s = interval_s
        self._owner = os.urandom(8).hex()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                if await self._hold():
                    await self.once()
            except StoreError:
                continue
            except Exception:  # a bad round must not end the loop
                log.exception("reconciler round failed")

    async def once(self) -> int:
        """Settle what is overdue now; returns how many reservations were settled."""
        store = self.rt.store
        now_ms = await store.now() * 1000
        settled = 0
        alive: set[str] | None = None
        # until every live process has had time to say so (after an outage, or at start-up),
        # none is taken for dead: its requests may still be settling
        trusted = self.rt.liveness_known()
        for team in list(self.rt.policy.teams):
            if not await self._hold():  # the round took longer than its lock: another began
                break
            overdue = [r for r in await store.reservations(team) if r.deadline_ms <= now_ms]
            if not overdue:
                continue
            if alive is None:
                alive = (await store.processes()).alive(self.rt.alive_ms)
            for r in overdue:
                poll: Answer | None = None
                account: str | None = None
                if r.id.startswith("task:"):
                    task_id = r.id.removeprefix("task:")
                    account = await store.task_account(team, task_id)
                    poll = await self._poll(task_id, account)
                owner_alive = not trusted or process_of(r.id) in alive
                decision = reconcile(r.id, owner_alive=owner_alive, poll=poll)
                if decision is None:
                    continue
                if not r.id.startswith("task:"):
                    log.warning("settling a reservation left by a process that is gone",
                                extra={"fields": {"team": team, "period": r.period}})
                result = await store.finish(self._completion(team, r, decision))
                self.rt.settled(team, r.period, result)
                if result.settled and account is not None and decision.charge is Charge.SETTLE:
                    self.rt.health.spent(account, result.charged)
                settled += result.settled and decision.charge is not Charge.HOLD
        return settled

    async def _hold(self) -> bool:
        """Take (or keep) the round's lock: one replica at a time, and rounds never overlap."""
        return await self.rt.store.try_lock("reconciler", self._owner,
                                            int(max(self.interval_s, 60.0) * 1000))

    def _completion(self, team: str, r: PendingReservation, decision: Decision) -> Completion:
        base = Completion(team=team, ticket=self._owner, reservation_id=r.id, period=r.period,
                          ledger=self.rt.policy.ledger_trim(self.rt.clock()))
        if decision.charge is Charge.HOLD:  # still running: ask again later
            return replace(base, settle=Settle.HOLD, hold_id=r.id, hold_ms=self.rt.task_check_ms)
        return replace(base, settle=STORE_SETTLE[decision.charge], charge=decision.credits)

    async def _poll(self, task_id: str, account: str | None) -> Answer | None:
        """The upstream's answer about a task, asked through the account that created it (no
        other key sees it); None when it cannot be asked now."""
        if await self.rt.upstream_slot(account) is not None:
            return None  # the allowance is spent: ask again next round
        try:
            response = await self.rt.upstream.send("GET", f"tasks/{task_id}", b"", [], b"",
                                                   account=account)
        except GatewayError:
            return None  # upstream away: ask again next round
        return read_answer(response.status_code, None, response.content)
