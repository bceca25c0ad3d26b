"""The webhook scripts (store/hooks.py, lua/hook_*.lua): their rules, on memory and Redis, and
the embedded Redis against a real one for every call they make."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio

from gateway.store import ScriptStore, open_store
from gateway.store.hooks import Hook, State, Step, Update
from gateway.store.redis import RedisEngine

from .conftest import RedisClusterServers, RedisServer
from .test_embedded import (  # noqa: F401 -- `pair` is a fixture
    Pair,
    Recorder,
    close,
    dump_ours,
    dump_theirs,
    pair,
)


def hook(n: int, **kw: Any) -> Hook:
    return Hook(f"msg_{n:032x}", "research", f"task_{n}", f"http://127.0.0.1:9/h?t={n}", **kw)


LONG = 600_000  # ms: never comes within a test
SHORT = 1  # ms: over once `advance(2)` has run


async def walk(store: ScriptStore, advance: Any) -> None:
    """Every script, each outcome at least once. `advance(ms)` moves the store's clock on by
    at least `ms`: every time here is either LONG or SHORT, so that the walk holds however
    slowly it runs on Redis's own clock."""
    await store.connect()
    assert await store.hook_watch(hook(1), 0)
    assert not await store.hook_watch(hook(1), 0)  # once per id
    assert await store.hook_watch(hook(2), 0)
    assert await store.hook_watch(hook(3, secret_id="ci"), LONG)
    await advance(2)
    claimed = await store.hook_claim("a", LONG, 1)
    assert [c.hook.id for c in claimed] == [hook(1).id]
    first = claimed[0].hook
    assert first.lease == "a:1" and first.state is State.POLLING and claimed[0].body is None
    [second] = await store.hook_claim("b", SHORT, 10)
    assert second.hook.id == hook(2).id and second.hook.lease == "b:1"
    await advance(2)  # b's lease is over: its hook is anyone's
    [taken] = await store.hook_claim("c", LONG, 10)
    assert taken.hook.id == hook(2).id and taken.hook.lease == "c:2"
    assert not await store.hook_update(second.hook, Update(Step.POLL, delay_ms=SHORT))  # late
    assert await store.hook_claim("d", LONG, 10) == []  # the rest is leased or not due
    assert await store.hook_update(first, Update(Step.POLL, delay_ms=SHORT, error="running"))
    assert not await store.hook_update(first, Update(Step.POLL, delay_ms=SHORT))  # done with it
    await advance(2)
    [one] = [c.hook for c in await store.hook_claim("a", LONG, 10)]
    two = taken.hook
    assert one.id == hook(1).id and one.polls == 1 and one.error == "running"
    assert await store.hook_update(one, Update(Step.DELIVER, delay_ms=LONG, status="completed",
                                               body=b'{"status":"completed"}'))
    assert await store.hook_update(one, Update(Step.RETRY, delay_ms=SHORT, error="http_500",
                                               attempted=True))
    assert await store.hook_update(two, Update(Step.FAILED, error="task_not_found",
                                               keep_ms=LONG, max_failed=10))
    await advance(2)
    [retried] = await store.hook_claim("a", LONG, 10)
    assert retried.body == b'{"status":"completed"}'
    assert retried.hook.state is State.DELIVERING and retried.hook.attempts == 1
    assert retried.hook.status == "completed" and retried.hook.started_ms > 0
    await advance(2)
    assert await store.hook_update(retried.hook, Update(Step.FAILED, error="http_500",
                                                        attempted=True, keep_ms=LONG,
                                                        max_failed=10))
    failed = await store.hooks_failed()
    assert [h.id for h in failed] == [hook(2).id, hook(1).id]  # oldest failure first
    assert failed[1].attempts == 2 and failed[1].error == "http_500"
    assert failed[1].state is State.FAILED and failed[1].failed_ms > 0
    page = await store.hooks_failed(limit=1)
    assert [h.id for h in page] == [hook(2).id]
    rest = await store.hooks_failed(after=(page[0].failed_ms, page[0].id), limit=1)
    assert [h.id for h in rest] == [hook(1).id]
    assert await store.hooks_failed(after=(rest[0].failed_ms, rest[0].id)) == []
    # redelivery: with its body, delivered again; without (its task never ended), polled again
    assert await store.hook_redeliver(hook(1).id)
    assert not await store.hook_redeliver(hook(1).id)
    assert await store.hook_redeliver(hook(2).id)
    assert not await store.hook_redeliver(hook(9).id)
    assert not await store.hook_redeliver(hook(3).id)  # not failed
    await advance(2)
    back = {c.hook.id: c for c in await store.hook_claim("a", LONG, 10)}
    assert set(back) == {hook(1).id, hook(2).id}
    assert back[hook(1).id].hook.state is State.DELIVERING and back[hook(1).id].body
    assert back[hook(1).id].hook.attempts == 0
    assert back[hook(2).id].hook.state is State.POLLING and back[hook(2).id].body is None
    assert await store.hook_update(back[hook(1).id].hook, Update(Step.DELIVERED))
    assert await store.hooks_failed() == []
    # failed hooks are kept `keep_ms`, and `max_failed` at most, the oldest going first
    assert await store.hook_update(back[hook(2).id].hook, Update(
        Step.FAILED, error="x", keep_ms=SHORT, max_failed=10))
    for n in range(10, 13):
        assert await store.hook_watch(hook(n), 0)
    await advance(2)
    failing = await store.hook_claim("a", LONG, 10)
    for claimed_hook in failing:
        await advance(2)
        assert await store.hook_update(claimed_hook.hook, Update(
            Step.FAILED, error="x", keep_ms=LONG, max_failed=2))
    assert len(failing) == 3
    assert [h.id for h in await store.hooks_failed()] == [hook(11).id, hook(12).id]
    assert await store.hook_claim("a", LONG, 10) == []


@pytest.fixture(params=["memory", "redis", "cluster"])
def hook_store(request: pytest.FixtureRequest) -> tuple[ScriptStore, Any]:
    """Every hook key carries `{org}`: one hash slot, so a cluster runs the same scripts."""
    if request.param == "memory":
        now = [1_700_000_000.0]

        async def advance(ms: float) -> None:
            now[0] += ms / 1000

        return open_store("memory://", clock=lambda: now[0]), advance
    async def wait(ms: float) -> None:  # Redis runs on its own clock
        await asyncio.sleep(ms / 1000 + 0.002)

    if request.param == "cluster":
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        cluster.flush()
        return open_store(cluster.url), wait
    server: RedisServer = request.getfixturevalue("redis_server")
    server.cli("FLUSHALL")
    return open_store(server.url), wait


def test_hooks_are_claimed_under_a_lease_moved_on_by_its_holder_and_failed_for_operators(
        hook_store: tuple[ScriptStore, Any]) -> None:
    store, advance = hook_store

    async def main() -> None:
        try:
            await walk(store, advance)
        finally:
            await store.close()

    asyncio.run(main())


def test_the_webhook_scripts_reply_as_on_redis(pair: Pair,  # noqa: F811
                                               redis_server: RedisServer) -> None:
    async def main() -> int:
        client = redis.asyncio.Redis(host="127.0.0.1", port=redis_server.port)
        recorder = Recorder(pair)

        async def wait(ms: float) -> None:
            await asyncio.sleep(ms / 1000 + 0.002)

        store = ScriptStore(RedisEngine(client, recorder), prefix="test")
        try:
            await walk(store, wait)
        finally:
            await store.close()
        return recorder.scripts

    assert asyncio.run(main()) > 30  # every call compared
    pair.sync()
    ours, theirs = by_field(dump_ours(pair.ours)), by_field(dump_theirs(pair.raw))
    slack = pair.slack()
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert close(ours[key], value, slack), f"{key!r}: ours {ours[key]!r}, redis {value!r}"


def by_field(keyspace: dict[bytes, list[Any]]) -> dict[bytes, list[Any]]:
    """Hashes as field-ordered lists: Redis iterates a hash with long values (records) in its
    hash table's order, the embedded store in insertion order; no script iterates them."""
    out = {}
    for key, (kind, value, ttl) in keyspace.items():
        if kind == b"hash":
            pairs = sorted(zip(value[::2], value[1::2], strict=True))
            value = [item for field in pairs for item in field]
        out[key] = [kind, value, ttl]
    return out
