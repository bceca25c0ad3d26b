"""An embedded Redis for the `memory://` store: the gateway's own Lua scripts run in-process
under lupa (Lua 5.1, as in Redis) over a small keyspace with Redis's semantics, so the memory
store and Redis cannot drift apart. See `engine.EmbeddedRedis`."""

from __future__ import annotations

from .engine import EmbeddedRedis
from .errors import ResponseError
from .keyspace import Info

__all__ = ["EmbeddedRedis", "Info", "ResponseError"]
