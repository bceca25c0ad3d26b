"""The Redis engine: shared by every replica; each store operation is one Lua script called by SHA.

URLs: `redis://` and `rediss://` (one server), `redis+sentinel://[:password@]h1:26379,h2:26379/
<service>[/db]` (the master Sentinel names), `redis+cluster://[:password@]h1:6379,h2:6379`
(Redis Cluster; see `cluster.py`). A `rediss+` scheme adds TLS to the last two.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import partial
from typing import Any, TypeVar
from urllib.parse import unquote

import hiredis
from redis.asyncio import ConnectionPool, Redis, RedisCluster, Sentinel
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AskError,
    ClusterDownError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)

from .base import ScriptFailed, StoreError
from .multiplex import Multiplexed, reply_error
from .payload import Args
from .scripts import SCRIPTS, Call, source

T = TypeVar("T")
Client = Redis | RedisCluster
MAX_CONNECTIONS = 1024  # per process (per node on a cluster); Redis allows 10000 clients


class _HiredisPacking:
    """Packs commands with hiredis, in C. redis-py's sync connection does so already; its asyncio
    connection packs in Python, which for a script call of some forty arguments was most of the
    store's CPU (0.2 ms of a 0.25 ms call in the profile)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # "SCRIPT LOAD": two words, two args
            args = (*args[0].split(), *args[1:])
        return [hiredis.pack_command(args)]

    def pack_commands(self, commands: Iterable[Sequence[Any]]) -> list[bytes]:
        return [b"".join(self.pack_command(*command)[0] for command in commands)]


_FAST_CLASSES: dict[type, type] = {}


def _fast(connection_class: type) -> type:
    """The same connection class, packing with hiredis."""
    if connection_class not in _FAST_CLASSES:
        _FAST_CLASSES[connection_class] = type(
            f"Hiredis{connection_class.__name__}", (_HiredisPacking, connection_class), {})
    return _FAST_CLASSES[connection_class]


def client_from_url(url: str, *, timeout_s: float) -> tuple[Client, list[Redis]]:
    """A redis-py asyncio client for any of the URL forms above, and the Sentinel connections
    to close with it (the password never reaches a log or an error)."""
    # A script that timed out may still have run, so no command is ever sent twice: the caller
    # cancels what a timed-out admission may have done (cancel.lua) instead.
    never_again = Retry(NoBackoff(), 0)
    scheme, _, rest = url.partition("://")
    if scheme not in ("redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster"):
        pool = ConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, health_check_interval=30, retry=never_again,
            socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        pool.connection_class = _fast(pool.connection_class)
        return Redis.from_pool(pool), []  # from_pool: closing the client closes the pool
    credentials, _, location = rest.rpartition("@")
    user, _, secret = credentials.partition(":")
    username, password = unquote(user) or None, unquote(secret) or None
    tls = scheme.startswith("rediss")
    hosts_part, _, path = location.partition("/")
    hosts = []
    for host in hosts_part.split(","):
        name, _, port = host.rpartition(":")
        hosts.append((name, int(port)))
    if scheme.endswith("+cluster"):
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in hosts], username=username,
            password=password, ssl=tls, max_connections=MAX_CONNECTIONS, retry=never_again,
            socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        return cluster, []
    service, _, db = path.partition("/")
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        hosts, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
        sentinel_kwargs={"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
                         "password": password, "max_connections": MAX_CONNECTIONS})
    master = sentinel.master_for(service, db=int(db or 0), username=username, password=password,
                                 ssl=tls, max_connections=MAX_CONNECTIONS, retry=never_again)
    pool = master.connection_pool
    pool.connection_class = _fast(pool.connection_class)
    return master, list(sentinel.sentinels)


def _lost(reply: Any) -> bool:
    """A NOSCRIPT reply: the script is not loaded (the store restarted); the call never ran."""
    return reply.__class__ is hiredis.ReplyError and str(reply).startswith("NOSCRIPT")


def store_error(exc: BaseException) -> StoreError | ScriptFailed:
    """What a redis-py failure means: the script failed (a defect), or the store is away (and
    whether the command may still have run: not when the connection could not be made)."""
    # redis-py takes the prefix off these replies' words; the others keep it for reply_error
    transient = (ReadOnlyError, TryAgainError, ClusterDownError, AskError, NoScriptError)
    if isinstance(exc, ResponseError) and not isinstance(exc, transient):
        return reply_error(str(exc))
    never_sent = "connecting to" in str(exc)  # redis-py's words for a connection not made
    return StoreError(f"redis: {type(exc).__name__}", maybe_ran=not never_sent)


class RedisEngine:
    """Runs the store's scripts on Redis (one server, Sentinel's master, or a cluster)."""

    def __init__(self, client: Client, *, direct: Multiplexed | None = None,
                 also_close: Sequence[Redis] = ()) -> None:
        self._redis = client
        self._also_close = also_close
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(source(name)) for name in SCRIPTS
        }
        self._direct = direct  # the scripts' path when given; redis-py's client otherwise

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        try:
            return await operation()
        except (TimeoutError, RedisError, OSError) as exc:
            raise store_error(exc) from None

    async def connect(self) -> None:
        """Load the scripts now, so the first requests do not pay for it (and fail early)."""
        if self._direct is not None:
            loads = [("SCRIPT", "LOAD", s.script) for s in self._scripts.values()]
            for reply in await self._direct.execute(loads):
                if isinstance(reply, hiredis.ReplyError):
                    raise reply_error(str(reply))
            return
        for script in self._scripts.values():
            await self._call(partial(self._redis.script_load, script.script))

    async def close(self) -> None:
        if self._direct is not None:
            await self._direct.close()
        await self._redis.aclose()
        for client in self._also_close:
            await client.aclose()

    def _evalsha(self, name: str, keys: Sequence[str], args: Args) -> tuple[Any, ...]:
        return ("EVALSHA", self._scripts[name].sha, len(keys), *keys, *args)

    async def _execute(self, calls: Sequence[Call]) -> list[Any]:
        """Each call's reply or error reply, over the shared connection."""
        assert self._direct is not None
        commands = [self._evalsha(*call) for call in calls]
        replies = await self._direct.execute(commands)
        missing = [i for i, r in enumerate(replies) if _lost(r)]
        if missing:
            again = await self._load_and_send([calls[i][0] for i in missing],
                                              [commands[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _load_and_send(self, names: list[str], commands: list[tuple[Any, ...]]
                             ) -> list[Any]:
        """Scripts the store lost (it restarted) are loaded, and the calls that found them
        missing sent again: they never ran."""
        assert self._direct is not None
        loads = [("SCRIPT", "LOAD", self._scripts[name].script) for name in dict.fromkeys(names)]
        return (await self._direct.execute([*loads, *commands]))[len(loads):]

    async def run(self, name: str, keys: Sequence[str], args: Args) -> Any:
        if self._direct is not None:
            command = self._evalsha(name, keys, args)
            reply = await self._direct.call(command)
            if _lost(reply):
                (reply,) = await self._load_and_send([name], [command])
            if reply.__class__ is hiredis.ReplyError:
                raise reply_error(str(reply))
            return reply
        script = self._scripts[name]
        return await self._call(lambda: script(keys=keys, args=args))

    async def run_many(self, calls: Sequence[Call]) -> list[Any]:
        """One pipeline (not a transaction: each script is atomic on its own). Scripts the store
        lost (it restarted) are loaded and only those calls sent again: they never ran. A
        cluster has no pipelines for scripts: there, the calls go out together instead."""
        if self._direct is not None:
            return [reply_error(str(r)) if isinstance(r, hiredis.ReplyError) else r
                    for r in await self._execute(calls)]
        if isinstance(self._redis, RedisCluster):
            replies = await asyncio.gather(*(self.run(*call) for call in calls),
                                           return_exceptions=True)
            for reply in replies:
                if isinstance(reply, BaseException) and not isinstance(reply, Exception):
                    raise reply  # cancelled
            return list(replies)

        async def send(todo: list[int]) -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for i in todo:
                    name, keys, args = calls[i]
                    pipe.evalsha(self._scripts[name].sha, len(keys), *keys, *args)
                return await pipe.execute(raise_on_error=False)

        results: list[Any] = await self._call(lambda: send(list(range(len(calls)))))
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            for name in {calls[i][0] for i in missing}:
                await self._call(partial(self._redis.script_load, self._scripts[name].script))
            for i, result in zip(missing, await self._call(lambda: send(missing)), strict=True):
                results[i] = result
        return [store_error(r) if isinstance(r, Exception) else r for r in results]

    async def delete_matching(self, pattern: str) -> int:
        async def flush() -> int:
            removed = 0
            batch: list[bytes] = []
            async for key in self._redis.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    removed += await self._redis.unlink(*batch)
                    batch.clear()
            if batch:
                removed += await self._redis.unlink(*batch)
            return removed

        return await self._call(flush)
