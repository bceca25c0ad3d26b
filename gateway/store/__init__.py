"""Backends chosen by URL scheme: `memory://` (embedded) or `redis://`, `rediss://`."""

from __future__ import annotations

import time
from collections.abc import Callable

from .base import Store, StoreError
from .memory import MemoryStore


def open_store(url: str, *, prefix: str = "aio", timeout_s: float = 1.0,
               clock: Callable[[], float] = time.time) -> Store:
    if url.startswith("memory://"):
        return MemoryStore(prefix=prefix, clock=clock)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis import RedisStore

        return RedisStore(url, prefix=prefix, timeout_s=timeout_s)
    raise ValueError(f"unsupported store URL scheme: {url.split('://')[0]!r}")


__all__ = ["MemoryStore", "Store", "StoreError", "open_store"]
