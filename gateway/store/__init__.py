"""Backends chosen by URL scheme: `memory://` (embedded), or Redis (`redis://`, `rediss://`,
`redis+sentinel://`, `redis+cluster://`; see `redis.py`)."""

from __future__ import annotations

import time
from collections.abc import Callable

from .base import Store, StoreError
from .memory import MemoryStore


def open_store(url: str, *, prefix: str = "aio", timeout_s: float = 1.0,
               clock: Callable[[], float] = time.time) -> Store:
    if url.startswith("memory://"):
        return MemoryStore(prefix=prefix, clock=clock)
    if url.startswith(("redis+cluster://", "rediss+cluster://")):
        from .cluster import ClusterStore
        from .redis import client_from_url

        client, _ = client_from_url(url, timeout_s=timeout_s)
        return ClusterStore(client, prefix=prefix)
    if url.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://",
                       "rediss+sentinel://")):
        from .redis import RedisStore, client_from_url

        client, sentinels = client_from_url(url, timeout_s=timeout_s)
        return RedisStore(client, prefix=prefix, also_close=sentinels)
    raise ValueError(f"unsupported store URL scheme: {url.split('://')[0]!r}")


__all__ = ["MemoryStore", "Store", "StoreError", "open_store"]
