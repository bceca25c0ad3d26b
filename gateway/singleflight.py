"""In-process single-flight: identical requests in flight at once wait for one leader's answer.

The store's flight lock decides who leads across replicas; this is the leader's in-process side.
`lead` is the only way to put an entry in, and only the leader that put it removes it, whatever
happens to the call (an exception, a cancellation): followers are never left waiting on a dead
leader, and a second leader (whose lock was granted after the first one's expired) can neither
overwrite nor remove the first one's entry.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from .asgi import Reply


class Flight:
    """A leader's promise of an answer to its followers."""

    __slots__ = ("_future",)

    def __init__(self, future: asyncio.Future[Reply | None]) -> None:
        self._future = future

    def publish(self, reply: Reply | None) -> None:
        """Hand the answer (None: there is none) to every follower, each its own copy."""
        if not self._future.done():
            self._future.set_result(
                None if reply is None else Reply(reply.status, list(reply.headers), reply.body))


class Flights:
    def __init__(self) -> None:
        self._entries: dict[str, asyncio.Future[Reply | None]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @contextlib.contextmanager
    def lead(self, key: str) -> Iterator[Flight]:
        future: asyncio.Future[Reply | None] = asyncio.get_running_loop().create_future()
        owned = key not in self._entries
        if owned:
            self._entries[key] = future
        try:
            yield Flight(future)
        finally:
            if not future.done():
                future.set_result(None)  # no answer: followers ask again
            if owned and self._entries.get(key) is future:
                del self._entries[key]

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    async def follow(self, key: str, timeout_s: float) -> Reply | None:
        """A copy of the leader's answer; None when it had none (or none leads here)."""
        future = self._entries.get(key)
        if future is None:
            return None
        try:
            reply = await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            return None
        if reply is None:
            return None
        return Reply(reply.status, list(reply.headers), reply.body)
