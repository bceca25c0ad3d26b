"""Backends chosen by URL scheme: `memory://` (embedded), or Redis (`redis://`, `rediss://`,
`redis+sentinel://`, `redis+cluster://`; see `redis.py`). Both run the scripts in `lua/`."""

from __future__ import annotations

import time
from collections.abc import Callable

from .base import ScriptFailed, Store, StoreError
from .scripts import ScriptStore

MEMORY_MAX_BYTES = 128 * 1024 * 1024


def open_store(url: str, *, prefix: str = "aio", timeout_s: float = 1.0,
               clock: Callable[[], float] = time.time,
               memory_max_bytes: int = MEMORY_MAX_BYTES) -> ScriptStore:
    if url.startswith("memory://"):
        from .memory import EmbeddedEngine

        return ScriptStore(EmbeddedEngine(clock=clock, max_bytes=memory_max_bytes), prefix=prefix)
    from redis.asyncio import Redis, RedisCluster

    from .multiplex import Multiplexed
    from .redis import RedisEngine, client_from_url

    if url.startswith(("redis+cluster://", "rediss+cluster://")):
        from .cluster import ClusterStore
        from .cluster_link import ClusterLink

        cluster, _ = client_from_url(url, timeout_s=timeout_s)
        assert isinstance(cluster, RedisCluster)
        # a connection per master, each shared by every call to the slots it serves
        return ClusterStore(RedisEngine(cluster, ClusterLink(cluster, timeout_s=timeout_s)),
                            prefix=prefix)
    if url.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://",
                       "rediss+sentinel://")):
        client, sentinels = client_from_url(url, timeout_s=timeout_s)
        # one server, or Sentinel's master: the scripts share one connection
        assert isinstance(client, Redis)
        link = Multiplexed(client.connection_pool.make_connection, timeout_s=timeout_s)
        return ScriptStore(RedisEngine(client, link, also_close=sentinels), prefix=prefix)
    raise ValueError(f"unsupported store URL scheme: {url.split('://')[0]!r}")


__all__ = ["ScriptFailed", "ScriptStore", "Store", "StoreError", "open_store"]
