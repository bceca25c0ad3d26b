"""The bookkeeping after each response, sent to the store in batches.

Completions are queued as answers go out; one task sends them, each batch in one round trip
(`Store.finish_many`). A completion waits at most for the round trip already in flight, and
under load every round trip carries every completion that piled up meanwhile. A store blip is
retried with backoff; what still fails is left to the reconciler, which settles every
reservation whose deadline passes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from .store import Store, StoreError
from .store.base import Completion, Settled

log = logging.getLogger("gateway")
MAX_BATCH = 256


class Bookkeeper:
    def __init__(self, on_settled: Callable[[Completion, Settled], None],
                 on_error: Callable[[], None], *, attempts: int = 5) -> None:
        self._on_settled = on_settled
        self._on_error = on_error
        self._attempts = attempts
        self._queues: dict[Store, list[Completion]] = {}
        self._wake = asyncio.Event()
        self._sending = False
        self._task: asyncio.Task[None] | None = None

    def add(self, store: Store, completion: Completion) -> None:
        self._queues.setdefault(store, []).append(completion)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()

    async def drain(self, timeout_s: float) -> None:
        """Wait until everything queued has been sent (or the time is up)."""
        deadline = time.monotonic() + timeout_s
        while (self._queues or self._sending) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queues:
                store, queue = next(iter(self._queues.items()))
                batch, rest = queue[:MAX_BATCH], queue[MAX_BATCH:]
                if rest:
                    self._queues[store] = rest
                else:
                    del self._queues[store]
                self._sending = True
                try:
                    await self._send(store, batch)
                finally:
                    self._sending = False

    async def _send(self, store: Store, batch: list[Completion]) -> None:
        delay = 0.2
        for attempt in range(self._attempts):
            try:
                results = await store.finish_many(batch)
            except StoreError:
                self._on_error()
                if attempt + 1 == self._attempts:
                    log.error("store unreachable: bookkeeping of %d requests left to the "
                              "reconciler", len(batch))
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            else:
                for completion, settled in zip(batch, results, strict=True):
                    self._on_settled(completion, settled)
                return
