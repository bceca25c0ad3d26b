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
    """A leader's promise of an answer to its followers. Nothing is made for a request that
    nobody follows: the future (and the copy of the answer) only once a follower asks."""

    __slots__ = ("_answer", "_published", "_waiter")

    def __init__(self) -> None:
        self._waiter: asyncio.Future[Reply | None] | None = None
        self._published = False
        self._answer: Reply | None = None

    def publish(self, reply: Reply | None) -> None:
        """Hand the answer (None: there is none) to every follower, each its own copy. The
        leader changes `reply` only after it has left `lead` (a follower that comes before then
        copies it as published)."""
        if self._published:
            return
        self._published, self._answer = True, reply
        if self._waiter is not None:
            self._waiter.set_result(_copy(reply))  # before the leader decorates its own

    def waiter(self) -> asyncio.Future[Reply | None]:
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
            if self._published:
                self._waiter.set_result(_copy(self._answer))
        return self._waiter


class Flights:
    def __init__(self) -> None:
        self._entries: dict[str, Flight] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @contextlib.contextmanager
    def lead(self, key: str) -> Iterator[Flight]:
        flight = Flight()
        owned = key not in self._entries
        if owned:
            self._entries[key] = flight
        try:
            yield flight
        finally:
            flight.publish(None)  # no answer (unless one was published): followers ask again
            if owned and self._entries.get(key) is flight:
                del self._entries[key]

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    async def follow(self, key: str, timeout_s: float) -> Reply | None:
        """A copy of the leader's answer; None when it had none (or none leads here)."""
        flight = self._entries.get(key)
        if flight is None:
            return None
        try:
            reply = await asyncio.wait_for(asyncio.shield(flight.waiter()), timeout_s)
        except TimeoutError:
            return None
        if reply is None:
            return None
        return _copy(reply)


def _copy(reply: Reply | None) -> Reply | None:
    return None if reply is None else Reply(reply.status, list(reply.headers), reply.body)
