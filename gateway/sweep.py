"""Timeouts that many waiting requests share: one timer per event loop looks them over.

A request held on a slow upstream keeps its timeout for as long as it waits, and an asyncio timer
(`loop.call_at`, `asyncio.timeout`) holds about 0.55 KB while it does (uvloop's handle, its libuv
timer, the copied context), a fortieth of the request (bench/SCALE.md). Here a waiting item costs
a dictionary entry, and starting or ending a wait no timer operation. The price is precision:
items are looked at every `interval_s`, so one ends up to that much after its time.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Protocol

DEADLINE_INTERVAL_S = 0.05  # how late a request's deadline may end it


class Overdue(Protocol):
    def overdue(self) -> None: ...


class Sweep:
    """Items waiting for a time on one loop, looked over every `interval_s` while any waits."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval_s: float) -> None:
        self._loop = loop
        self.interval_s = interval_s
        self._due: dict[Overdue, float] = {}
        self._timer: asyncio.TimerHandle | None = None

    def wait(self, item: Overdue, due: float) -> None:
        """`item.overdue()` is called once the loop's time passes `due`, unless stopped first."""
        self._due[item] = due
        if self._timer is None:
            self._timer = self._loop.call_later(self.interval_s, self._run)

    def stop(self, item: Overdue) -> None:
        self._due.pop(item, None)

    def _run(self) -> None:
        now = self._loop.time()
        for item in [item for item, due in self._due.items() if due <= now]:
            if self._due.pop(item, None) is not None:  # an earlier one may have stopped it
                item.overdue()
        self._timer = self._loop.call_later(self.interval_s, self._run) if self._due else None


_SWEEPS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Sweep]] = (
    weakref.WeakKeyDictionary())


def sweep_of(loop: asyncio.AbstractEventLoop, purpose: str, interval_s: float) -> Sweep:
    """The loop's sweep for `purpose` (made on first use), looking over its items at least
    every `interval_s`: the shortest interval any of its users asked for."""
    sweeps = _SWEEPS.get(loop)
    if sweeps is None:
        sweeps = _SWEEPS[loop] = {}
    sweep = sweeps.get(purpose)
    if sweep is None:
        sweep = sweeps[purpose] = Sweep(loop, interval_s)
    elif interval_s < sweep.interval_s:
        sweep.interval_s = interval_s
    return sweep


class Deadline:
    """`asyncio.timeout_at(due)`, kept by the loop's deadline sweep: when it expires the task is
    cancelled, and that cancellation leaves the block as `TimeoutError` (one that came from
    elsewhere stays a cancellation). `expire()` ends the block at once (a client that left)."""

    __slots__ = ("_cancelling", "_expired", "_sweep", "_task")

    def __init__(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        task = asyncio.current_task(loop)
        assert task is not None, "a deadline is for a task"
        self._task, self._cancelling, self._expired = task, task.cancelling(), False
        sweep = sweep_of(loop, "deadlines", DEADLINE_INTERVAL_S)
        self._sweep: Sweep | None = sweep
        sweep.wait(self, due)

    def overdue(self) -> None:
        self.expire()

    def expire(self) -> None:
        if self._sweep is not None and not self._expired:  # within the block, once
            self._expired = True
            self._task.cancel()

    def __enter__(self) -> Deadline:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if self._sweep is not None:
            self._sweep.stop(self)
            self._sweep = None
        if (self._expired and self._task.uncancel() <= self._cancelling
                and kind is asyncio.CancelledError):
            raise TimeoutError from exc
