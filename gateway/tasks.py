"""Async tasks: reading their status, and settling reservations nobody came back for.

A task's reservation is held under `task:<id>` until somebody sees the task's final status: the
team's own polls settle it on the way through. The reconciler covers the rest: requests whose
gateway died before settling (charged what they reserved, since the upstream may have done the
work) and tasks nobody polls (asked about upstream, then settled).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import orjson

from . import routes
from .budget import to_milli
from .errors import GatewayError
from .store import StoreError
from .store.base import Completion, PendingReservation, Settle

if TYPE_CHECKING:
    from .runtime import Runtime

FINAL = frozenset({"completed", "succeeded", "failed", "error", "cancelled"})
FAILED = frozenset({"failed", "error", "cancelled"})

_CREDITS = re.compile(rb'"credits_consumed"\s*:\s*([0-9][0-9.eE+-]*)')
log = logging.getLogger("gateway.tasks")


@dataclass(frozen=True, slots=True)
class TaskOutcome:
    charge: int | None  # millicredits the upstream reported, None when it did not say
    created_task: str | None = None  # an async POST answered with a task still running
    final: bool = False  # a final status (or a synchronous answer)
    failed: bool = False


def task_outcome(method: str, path: str, task_id: str | None, body: bytes) -> TaskOutcome:
    """What a successful upstream answer means for billing."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):  # an event stream: credits, if any, are in its last events
        found = _CREDITS.findall(body)
        return TaskOutcome(to_milli(float(found[-1])) if found else None, final=True)
    charge = _credits(data)
    status = data.get("status")
    final = not isinstance(status, str) or status.lower() in FINAL
    failed = isinstance(status, str) and status.lower() in FAILED
    if method == "POST" and path in routes.ASYNC_ENDPOINTS and not final:
        created = data.get("id")
        if isinstance(created, str) and routes.task_id_of(f"tasks/{created}"):
            return TaskOutcome(charge, created_task=created)
    if task_id is not None and not final:
        return TaskOutcome(charge)
    return TaskOutcome(charge, final=True, failed=failed)


def _credits(data: dict[str, Any]) -> int | None:
    value = data.get("credits_consumed")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return None
    return to_milli(value)


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
                if await self.rt.store.try_lock("reconciler", self._owner,
                                                int(self.interval_s * 1000)):
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
        for team in list(self.rt.policy.teams):
            for r in await store.reservations(team):
                if r.deadline_ms > now_ms:
                    continue
                completion = await self._settlement(team, r)
                if completion is not None:
                    result = await store.finish(completion)
                    self.rt.settled(team, r.period, result)
                    settled += result.settled and completion.settle is not Settle.HOLD
        return settled

    async def _settlement(self, team: str, r: PendingReservation) -> Completion | None:
        base = Completion(team=team, ticket=self._owner, reservation_id=r.id, period=r.period)
        if not r.id.startswith("task:"):
            log.warning("settling a reservation left by an interrupted request",
                        extra={"fields": {"team": team, "period": r.period}})
            return replace(base, settle=Settle.CHARGE)
        task_id = r.id.removeprefix("task:")
        if await self.rt.upstream_slot() is not None:
            return None  # the allowance is spent: ask again next round
        try:
            response = await self.rt.upstream.send("GET", f"tasks/{task_id}", b"", [], b"")
        except GatewayError:
            return None  # upstream away: ask again next round
        if response.status_code == 404:
            return replace(base, settle=Settle.CHARGE)
        if response.status_code != 200:
            return None
        outcome = task_outcome("GET", f"tasks/{task_id}", task_id, response.content)
        if not outcome.final:
            return replace(base, settle=Settle.HOLD, hold_id=r.id, hold_ms=self.rt.task_check_ms)
        if outcome.failed:
            return replace(base, settle=Settle.REFUND)
        return replace(base, settle=Settle.CHARGE, charge=outcome.charge)
