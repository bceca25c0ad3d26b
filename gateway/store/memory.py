"""The embedded store (`memory://`): the same Lua scripts as Redis, run in-process.

`EmbeddedRedis` (embedded.py) runs them under Lua 5.1 over a bounded Python keyspace with
Redis's semantics, on the injected clock. Each script runs without yielding to the event loop,
so it is atomic, as a script is in Redis.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from .base import ScriptFailed
from .embedded import EmbeddedRedis, ResponseError
from .payload import Args
from .scripts import SCRIPTS, Call, source


class EmbeddedEngine:
    def __init__(self, *, clock: Callable[[], float] = time.time,
                 max_bytes: int | None = None) -> None:
        self.redis = EmbeddedRedis(clock=clock, max_volatile_bytes=max_bytes)
        self._sha = {name: self.redis.script_load(source(name)) for name in SCRIPTS}

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def run(self, name: str, keys: Sequence[str], args: Args) -> Any:
        try:
            return self.redis.evalsha(self._sha[name], keys, args)
        except ResponseError as exc:
            raise ScriptFailed(f"memory: {exc}") from None

    async def run_many(self, calls: Sequence[Call]) -> list[Any]:
        out: list[Any] = []
        for name, keys, args in calls:
            try:
                out.append(await self.run(name, keys, args))
            except ScriptFailed as exc:
                out.append(exc)
        return out

    async def delete_matching(self, pattern: str) -> int:
        keys = self.redis.scan(pattern)
        return int(self.redis.execute("UNLINK", *keys)) if keys else 0
