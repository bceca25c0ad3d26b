"""The Redis engine: shared by every replica; each store operation is one Lua script called by SHA.

URLs: `redis://` and `rediss://` (one server), `redis+sentinel://[:password@]h1:26379,h2:26379/
<service>[/db]` (the master Sentinel names), `redis+cluster://[:password@]h1:6379,h2:6379`
(Redis Cluster; see `cluster.py`). A `rediss+` scheme adds TLS to the last two.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import unquote

import hiredis
from redis.asyncio import ConnectionPool, Redis, RedisCluster, Sentinel
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .base import StoreError
from .multiplex import reply_error
from .payload import Args
from .scripts import SCRIPTS, Call, source

Client = Redis | RedisCluster
MAX_CONNECTIONS = 1024  # per process (per node on a cluster); Redis allows 10000 clients


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
    return master, list(sentinel.sentinels)


def _lost(reply: Any) -> bool:
    """A NOSCRIPT reply: the script is not loaded (the store restarted); the call never ran."""
    return reply.__class__ is hiredis.ReplyError and str(reply).startswith("NOSCRIPT")


class Link(Protocol):
    """The scripts' connection: `Multiplexed` (one server) or `ClusterLink` (a cluster)."""

    async def call(self, command: tuple[Any, ...]) -> Any: ...
    async def execute(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]: ...
    async def close(self) -> None: ...


class RedisEngine:
    """Runs the store's scripts on Redis (one server, Sentinel's master, or a cluster) over
    `link`; redis-py's `client` made the connections and serves the admin's key scans."""

    def __init__(self, client: Client, link: Link, *, also_close: Sequence[Redis] = ()) -> None:
        self._redis = client
        self._link = link
        self._also_close = also_close
        self._scripts = {name: source(name) for name in SCRIPTS}
        self._shas = {name: hashlib.sha1(text.encode()).hexdigest()
                      for name, text in self._scripts.items()}

    async def connect(self) -> None:
        """Load the scripts now, so the first requests do not pay for it (and fail early)."""
        for reply in await self._link.execute([("SCRIPT", "LOAD", text)
                                               for text in self._scripts.values()]):
            if isinstance(reply, hiredis.ReplyError):
                raise reply_error(str(reply))

    async def close(self) -> None:
        await self._link.close()
        await self._redis.aclose()
        for client in self._also_close:
            await client.aclose()

    def _evalsha(self, name: str, keys: Sequence[str], args: Args) -> tuple[Any, ...]:
        return ("EVALSHA", self._shas[name], len(keys), *keys, *args)

    async def _load_and_send(self, names: list[str], commands: list[tuple[Any, ...]]
                             ) -> list[Any]:
        """Scripts the store lost (it restarted) are loaded, and the calls that found them
        missing sent again: they never ran."""
        loads = [("SCRIPT", "LOAD", self._scripts[name]) for name in dict.fromkeys(names)]
        return (await self._link.execute([*loads, *commands]))[len(loads):]

    async def run(self, name: str, keys: Sequence[str], args: Args) -> Any:
        command = self._evalsha(name, keys, args)
        reply = await self._link.call(command)
        if _lost(reply):
            (reply,) = await self._load_and_send([name], [command])
        if reply.__class__ is hiredis.ReplyError:
            raise reply_error(str(reply))
        return reply

    async def run_many(self, calls: Sequence[Call]) -> list[Any]:
        """Each call's reply, or the error it met: sent together (not a transaction: each
        script is atomic on its own)."""
        commands = [self._evalsha(*call) for call in calls]
        replies = await self._link.execute(commands)
        missing = [i for i, r in enumerate(replies) if _lost(r)]
        if missing:
            again = await self._load_and_send([calls[i][0] for i in missing],
                                              [commands[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return [reply_error(str(r)) if isinstance(r, hiredis.ReplyError) else r
                for r in replies]

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

        try:
            return await flush()
        except (TimeoutError, RedisError, OSError) as exc:  # away, slow or refusing: no script
            raise StoreError(f"redis: {type(exc).__name__}") from None
