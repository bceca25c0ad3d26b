"""The bookkeeping of finished requests: applied at least once, idempotently, in batches.

Completions are queued as answers go out; one task sends them to the shared store, each batch in
one round trip (`Store.finish_many`): under load every round trip carries every completion that
piled up while the previous one was in flight. A completion is idempotent per ticket (see
`store.base.Completion`), so one whose reply was lost is simply sent again, and a store outage is
waited out, however long it lasts: nothing is dropped after a few seconds, and nothing is left to
a reconciler that would charge what should have been refunded.

`commit` is for what a later request relies on at once (a task's owner, an idempotent answer):
it is written before the answer is released, and queued like the rest if the store is away.
Beyond `soft_limit` queued completions the gateway refuses new work (the store is not keeping
up), while what is queued still lands. The depth is `gateway_bookkeeping_pending`.

The same queue carries cancellations: an admission whose store call timed out may still run
once the store answers, so `cancel.lua` is sent after it (it leaves a tombstone that makes the
late admission do nothing). Only admissions that may have run are cancelled.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .store import ScriptFailed, Store, StoreError
from .store.base import Admission, Completion, Settled

if TYPE_CHECKING:
    from .tracing import BookkeepingTrace

Work = Completion | Admission  # an Admission in the queue is to be cancelled

log = logging.getLogger("gateway")
MAX_BATCH = 256


class Bookkeeper:
    def __init__(self, store: Store, *, on_settled: Callable[[Completion, Settled], None],
                 on_error: Callable[[], None], on_depth: Callable[[int], None],
                 on_round_trip: Callable[[float], None],
                 soft_limit: int = 100_000, max_backoff_s: float = 2.0,
                 trace: BookkeepingTrace | None = None) -> None:
        self.store = store
        self._trace = trace  # links each batch to the requests it carries (tracing on)
        self.soft_limit = soft_limit
        self._on_settled = on_settled
        self._on_error = on_error
        self._on_depth = on_depth
        self._on_round_trip = on_round_trip  # the seconds each call to the store took
        self._max_backoff_s = max_backoff_s
        self._queue: collections.deque[Work] = collections.deque()
        self._sending = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        return len(self._queue) + self._sending

    @property
    def saturated(self) -> bool:
        return len(self._queue) >= self.soft_limit

    def add(self, completion: Completion) -> None:
        """Queue a completion; it lands in the next batch, or as soon as the store is back."""
        self._push(completion)

    def cancel(self, admission: Admission) -> None:
        """Undo an admission that may have run although its answer never came back."""
        self._push(admission)

    def _push(self, work: Work) -> None:
        if self._trace is not None:
            self._trace.queued(work)
        self._queue.append(work)
        self._idle.clear()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()

    async def commit(self, completion: Completion) -> None:
        """Apply a completion now; if the store is away, queue it (the answer still goes out:
        holding it back would lose it, while the queue makes sure the state lands)."""
        started = time.perf_counter()
        try:
            settled = await self.store.finish(completion)
        except StoreError:
            self._on_error()
            self.add(completion)
        except ScriptFailed:
            log.exception("bookkeeping failed for one request; it was not applied")
        else:
            self._on_settled(completion, settled)
        finally:
            self._on_round_trip(time.perf_counter() - started)

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued has landed; False if the time ran out first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._queue:
            log.error("shutdown: the bookkeeping of %d requests could not reach the store",
                      len(self._queue), extra={"fields": {"pending": len(self._queue)}})

    async def _run(self) -> None:
        delay = 0.0
        while True:
            if not self._queue:
                self._on_depth(0)
                self._idle.set()
                await self._wake.wait()
                self._wake.clear()
                continue
            if delay:
                await asyncio.sleep(delay)
            batch = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
            self._sending = len(batch)
            self._on_depth(self.pending)
            try:
                retry = await (self._send(batch) if self._trace is None
                               else self._trace.send(batch, self._send))
            finally:
                self._sending = 0
            if retry:
                self._queue.extendleft(reversed(retry))
                delay = min(max(delay * 2, 0.05), self._max_backoff_s)
            else:
                delay = 0.0

    async def _send(self, batch: list[Work]) -> list[Work]:
        """Send a batch; returns what must be sent again."""
        retry: list[Work] = []
        for admission in [w for w in batch if isinstance(w, Admission)]:
            try:
                await self.store.cancel(admission)
            except StoreError:
                retry.append(admission)
            except ScriptFailed:
                log.exception("cancelling a timed-out admission failed")
        completions = [w for w in batch if isinstance(w, Completion)]
        if not completions:
            return retry
        started = time.perf_counter()
        try:
            results = await self.store.finish_many(completions)
        except StoreError:
            self._on_error()
            return retry + completions
        finally:
            self._on_round_trip(time.perf_counter() - started)
        for completion, result in zip(completions, results, strict=True):
            if isinstance(result, StoreError):
                retry.append(completion)
            elif isinstance(result, Exception):
                log.error("bookkeeping failed for one request; it was not applied: %s", result,
                          extra={"fields": {"team": completion.team}})
            else:
                self._on_settled(completion, result)
        if retry:
            self._on_error()
        return retry
