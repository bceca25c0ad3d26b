"""The Redis store: shared by every replica; each operation is one Lua script called by SHA.

URLs: `redis://` and `rediss://` (one server), `redis+sentinel://[:password@]h1:26379,h2:26379/
<service>[/db]` (the master Sentinel names), `redis+cluster://[:password@]h1:6379,h2:6379`
(Redis Cluster; see `cluster.py`). A `rediss+` scheme adds TLS to the last two.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import partial
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import unquote

import hiredis
from redis.asyncio import ConnectionPool, Redis, RedisCluster, Sentinel
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from .base import (
    CANCEL_TTL_MS,
    Admission,
    AdmitResult,
    BudgetUsage,
    CacheRef,
    Completion,
    Flight,
    LedgerEntry,
    Pace,
    PendingReservation,
    Settled,
    StoreError,
    Verdict,
)
from .keys import Keys
from .records import admit_args, finish_args, parse_admit, parse_reservation

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


def _source(name: str) -> str:
    lua = resources.files("gateway.store") / "lua"
    return (lua / "lib.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


class RedisStore:
    scripts: tuple[str, ...] = ("admit", "finish", "pace", "flight", "cancel")

    def __init__(self, client: Client, *, prefix: str = "aio",
                 also_close: Sequence[Redis] = ()) -> None:
        self.keys = Keys(prefix)
        self._redis = client
        self._also_close = also_close
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(_source(name)) for name in self.scripts
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(prefix={self.keys.prefix!r})"

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        try:
            return await operation()
        except (TimeoutError, RedisError, OSError) as exc:
            raise StoreError(f"redis: {type(exc).__name__}") from None

    async def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        script = self._scripts[name]
        return await self._call(lambda: script(keys=keys, args=args))

    async def connect(self) -> None:
        """Load the scripts now, so the first requests do not pay for it (and fail early)."""
        for script in self._scripts.values():
            await self._call(partial(self._redis.script_load, script.script))

    async def close(self) -> None:
        await self._redis.aclose()
        for client in self._also_close:
            await client.aclose()

    async def ping(self) -> None:
        await self._call(self._redis.ping)

    async def now(self) -> float:
        seconds, micros = await self._call(self._redis.time)
        return float(seconds) + micros / 1e6

    # Unused KEYS slots get a name in the team's own hash slot: the script never touches them,
    # and Redis Cluster then sees every key of the call in one slot.

    async def admit(self, a: Admission) -> AdmitResult:
        k = self.keys
        entry_key, flight_key = k.cache(a.team, a.cache) if a.cache else ("", "")
        keys = [
            k.team(a.team, "revoked"),
            k.team(a.team, "quota"),
            k.idempotency(a.team, a.idempotency[0]) if a.idempotency else k.team(a.team, "idem"),
            k.task(a.team, a.task_id) if a.task_id else k.team(a.team, "task"),
            entry_key or k.team(a.team, "cache"),
            flight_key or k.team(a.team, "flight"),
            k.team(a.team, "budget"),
            k.team(a.team, "resv"),
            k.org("pace") if a.pace else k.team(a.team, "pace"),
            k.team(a.team, f"void:{a.ticket}"),
            k.team(a.team, "ledger"),
        ]
        raw = await self._run("admit", keys, admit_args(a))
        return parse_admit(a, raw)

    async def cancel(self, a: Admission) -> None:
        k = self.keys
        flight_key = k.cache(a.team, a.cache)[1] if a.cache else k.team(a.team, "flight")
        keys = [
            k.team(a.team, f"void:{a.ticket}"),
            k.team(a.team, "resv"),
            k.team(a.team, "budget"),
            flight_key,
            k.idempotency(a.team, a.idempotency[0]) if a.idempotency else k.team(a.team, "idem"),
        ]
        args = [a.ticket, a.reservation.id if a.reservation else "", CANCEL_TTL_MS]
        await self._run("cancel", keys, args)

    async def finish(self, c: Completion) -> Settled:
        keys, args = self._finish_call(c)
        return _settled(await self._run("finish", keys, args))

    async def finish_many(self, completions: Sequence[Completion]) -> list[Settled]:
        """Many completions in one round trip (a pipeline, not a transaction: each script is
        atomic on its own, and they need not be atomic together)."""
        script = self._scripts["finish"]
        calls = [self._finish_call(c) for c in completions]

        async def send(todo: list[int]) -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for i in todo:
                    keys, args = calls[i]
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                return await pipe.execute(raise_on_error=False)

        results: list[Any] = await self._call(lambda: send(list(range(len(calls)))))
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:  # the store restarted and lost its scripts: load, then send those again
            await self._call(partial(self._redis.script_load, script.script))
            for i, result in zip(missing, await self._call(lambda: send(missing)), strict=True):
                results[i] = result
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None:
            raise StoreError(f"redis: {type(failed).__name__}")
        return [_settled(r) for r in results]

    def _finish_call(self, c: Completion) -> tuple[list[str], list[Any]]:
        k = self.keys
        entry_key, flight_key = ("", "")
        ref = c.cache_put[0] if c.cache_put else c.release
        if ref is not None:
            entry_key, flight_key = k.cache(c.team, ref)
        keys = [
            k.team(c.team, "resv"),
            k.team(c.team, "budget"),
            k.team(c.team, "ledger"),
            entry_key or k.team(c.team, "cache"),
            flight_key or k.team(c.team, "flight"),
            k.idempotency(c.team, c.idempotency[0]) if c.idempotency else k.team(c.team, "idem"),
            k.task(c.team, c.task_owner[0]) if c.task_owner else k.team(c.team, "task"),
        ]
        return keys, finish_args(c)

    async def pace(self, pace: Pace) -> tuple[bool, float]:
        booked, wait = await self._run(
            "pace", [self.keys.org("pace")], [pace.interval_ms, pace.burst, pace.queue_ms]
        )
        return bool(booked), wait / 1000.0

    async def flight(self, team: str, ref: CacheRef) -> Flight:
        entry, ttl, held = await self._run("flight", list(self.keys.cache(team, ref)), [])
        return Flight(entry or None, max(ttl, 0) / 1000.0, bool(held))

    async def budgets(self, teams: Sequence[tuple[str, str]]) -> list[BudgetUsage]:
        async def read() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for team, period in teams:
                    pipe.hmget(self.keys.team(team, "budget"), f"spent:{period}",
                               f"reserved:{period}")
                return await pipe.execute()

        rows = await self._call(read)
        return [BudgetUsage(int(s or 0), int(r or 0)) for s, r in rows]

    async def reservations(self, team: str) -> list[PendingReservation]:
        raw = await self._call(lambda: self._redis.hgetall(self.keys.team(team, "resv")))
        return [parse_reservation(_text(rid), _bytes(value)) for rid, value in raw.items()]

    async def ledger(self, team: str, *, after: str = "-", limit: int = 100) -> list[LedgerEntry]:
        start = after if after == "-" else f"({after}"
        rows = await self._call(
            lambda: self._redis.xrange(self.keys.team(team, "ledger"), start, "+", count=limit)
        )
        return [LedgerEntry(_text(rid), _bytes((fields or {})[b"e"])) for rid, fields in rows or []]

    async def revoke(self, team: str, key_id: str, revoked: bool) -> None:
        key = self.keys.team(team, "revoked")
        op = self._redis.sadd if revoked else self._redis.srem
        await self._call(lambda: op(key, key_id))

    async def revoked(self, team: str) -> set[str]:
        members = await self._call(lambda: self._redis.smembers(self.keys.team(team, "revoked")))
        return {_text(m) for m in members}

    async def flush_cache(self, *, route: str | None = None, team: str | None = None) -> int:
        pattern = self.keys.cache_pattern(route=route, team=team)

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

    async def try_lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        key = self.keys.org(name)
        return bool(await self._call(lambda: self._redis.eval(_LOCK, 1, key, owner, ttl_ms)))


__all__ = ["RedisStore", "Verdict"]

# take the lock, or extend it if this owner holds it already
_LOCK = """
if redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX') then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0"""


def _settled(reply: Any) -> Settled:
    settled, spent, reserved, charged = reply
    return Settled(bool(settled), int(spent), int(reserved), int(charged))


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
