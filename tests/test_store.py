"""One behaviour suite for both stores: the Lua scripts and their Python twin must agree."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvloop

from gateway.quota import Quota, gcra
from gateway.store import Store, open_store, scripts
from gateway.store.base import (
    AccountPace,
    Admission,
    CacheRef,
    Completion,
    LedgerTrim,
    Reservation,
    Settle,
    SlotAsk,
    Verdict,
)

from .conftest import RedisClusterServers, RedisServer, SentinelServers, eventually


@pytest.fixture(params=["memory", "redis", "cluster", "sentinel"])
def store_url(request: pytest.FixtureRequest) -> str:
    """The behaviour suite also runs on a 3-master Redis Cluster and through Sentinel."""
    if request.param == "memory":
        return "memory://"
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        server.cli("FLUSHALL")
        return server.url
    if request.param == "cluster":
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        cluster.flush()
        return cluster.url
    sentinel: SentinelServers = request.getfixturevalue("redis_sentinel")
    sentinel.master.cli("FLUSHALL")
    return sentinel.url

CONTEXT = orjson.dumps({"team": "t", "key_id": "k", "model": "m", "route": "chat/completions",
                        "request_id": "r", "cached": False})


def run(store_url: str, body: Callable[[Store], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        store = open_store(store_url, prefix="test")
        await store.connect()
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


def admission(ticket: str = "t1", **kw: Any) -> Admission:
    return Admission(team="t", key_id="k", ticket=ticket, hold_ms=10_000, **kw)


def reserve(ticket: str, amount: int, period: str = "m2026-11") -> Reservation:
    return Reservation(ticket, period, amount, CONTEXT)


def test_each_script_that_uses_the_slot_library_is_loaded_with_it() -> None:
    """lib_slots.lua is prepended only to the scripts listed for it: a script calling one of
    its functions without it would fail at run time, on its first call. admit.lua calls them
    only for a request that takes an upstream slot, which the store sends to `admit_paced`."""
    lua = Path(scripts.__file__).parent / "lua"
    library = (lua / "lib_slots.lua").read_text()
    defined = set(re.findall(r"^(?:local )?function (\w+)", library, re.MULTILINE))
    assert {"decide_slot", "load_accounts"} <= defined
    for name in scripts.SCRIPTS:
        path = lua / f"{scripts._FILES.get(name, name)}.lua"
        used = {fn for fn in defined if re.search(rf"\b{fn}\(", path.read_text())}
        loaded = "local function decide_slot" in scripts.source(name)
        assert loaded == (name in scripts._SLOT_SCRIPTS), name
        assert loaded == bool(used) or name == "admit", (name, used)
    admit = (lua / "admit.lua").read_text()
    assert scripts.source("admit").endswith(admit) and scripts.source("admit_paced").endswith(admit)


def test_each_script_that_works_on_the_clock_reads_it() -> None:
    """TIME is read on first use (`clock()` in lib.lua): a script that uses `now` without
    `local now = clock()` in its source would fail at run time, on its first call."""
    lua = Path(scripts.__file__).parent / "lua"
    for name in scripts.SCRIPTS:
        code = re.sub(r"--[^\n]*", "", (lua / f"{scripts._FILES.get(name, name)}.lua").read_text())
        source = re.sub(r"--[^\n]*", "", scripts.source(name))
        if re.search(r"\bnow\b", code):
            defined = source.find("local now = clock()")
            assert 0 <= defined < re.search(r"\bnow\b(?! = clock)", source).start(), name
    assert "redis.call('TIME')" not in re.sub(r"function clock\(\).*?\nend", "",
                                               scripts.source("finish"), flags=re.S)


# -- GCRA maths (pure) -----------------------------------------------------------------------


def test_gcra_allows_the_limit_then_spaces_requests() -> None:
    quota = Quota("minute", 3, 60.0)
    state = None
    for remaining in (2, 1, 0):
        step = gcra(quota, state, 1000.0)
        assert step.allowed and step.remaining == remaining
        state = (step.debt, 1000.0)
    denied = gcra(quota, state, 1000.0)
    assert not denied.allowed
    assert denied.retry_ms == pytest.approx(20_000)  # one slot every 20 s
    later = gcra(quota, state, 1000.0 + 20_000)
    assert later.allowed and later.remaining == 0


def test_usage_keeps_its_meaning_when_the_limit_changes() -> None:
    state = None
    for _ in range(2):
        step = gcra(Quota("minute", 2, 60.0), state, 0.0)
        state = (step.debt, 0.0)
    raised = gcra(Quota("minute", 100, 60.0), state, 0.0)
    assert raised.allowed and raised.remaining == 97


# -- quotas ------------------------------------------------------------------------------------


def test_quota_rolls_over_with_the_window(store_url: str) -> None:
    quota = Quota("second", 2, 1.0)

    async def body(store: Store) -> None:
        results = [await store.admit(admission(f"q{i}", quotas=(quota,))) for i in range(3)]
        assert [r.verdict for r in results] == [Verdict.ADMIT, Verdict.ADMIT, Verdict.QUOTA]
        assert [r.quotas[0].remaining for r in results] == [1, 0, 0]
        assert 0 < results[2].retry_after_s <= 0.5
        await asyncio.sleep(results[2].retry_after_s + 0.02)
        again = await store.admit(admission("q4", quotas=(quota,)))
        assert again.verdict is Verdict.ADMIT

    run(store_url, body)


def test_quota_is_exact_under_concurrency(store_url: str) -> None:
    quota = Quota("minute", 25, 60.0)

    async def body(store: Store) -> None:
        results = await asyncio.gather(*(store.admit(admission(f"c{i}", quotas=(quota,)))
                                         for i in range(100)))
        verdicts = [r.verdict for r in results]
        assert verdicts.count(Verdict.ADMIT) == 25
        assert verdicts.count(Verdict.QUOTA) == 75

    run(store_url, body)


def test_rejected_requests_do_not_consume_quota(store_url: str) -> None:
    quota = Quota("second", 1, 1.0)

    async def body(store: Store) -> None:
        assert (await store.admit(admission("a", quotas=(quota,)))).verdict is Verdict.ADMIT
        for i in range(5):
            assert (await store.admit(admission(f"b{i}", quotas=(quota,)))).verdict is Verdict.QUOTA
        await asyncio.sleep(1.05)
        assert (await store.admit(admission("c", quotas=(quota,)))).verdict is Verdict.ADMIT

    run(store_url, body)


# -- budgets -----------------------------------------------------------------------------------


def test_budget_holds_exactly_what_fits(store_url: str) -> None:
    async def body(store: Store) -> None:
        results = await asyncio.gather(*(
            store.admit(admission(f"b{i}", reservation=reserve(f"b{i}", 10_000),
                                  budget_limit=370_000))
            for i in range(200)))
        admitted = [r for r in results if r.verdict is Verdict.ADMIT]
        assert len(admitted) == 37
        assert all(r.verdict is Verdict.BUDGET for r in results if r.verdict is not Verdict.ADMIT)
        (usage,) = await store.budgets([("t", "m2026-11")])
        assert (usage.spent, usage.reserved) == (0, 370_000)

    run(store_url, body)


def test_settle_up_down_and_refund(store_url: str) -> None:
    async def body(store: Store) -> None:
        for ticket in ("up", "down", "gone"):
            result = await store.admit(admission(ticket, reservation=reserve(ticket, 10_000),
                                                 budget_limit=100_000))
            assert result.verdict is Verdict.ADMIT
        up = await store.finish(Completion("t", "up", Settle.CHARGE, "up", charge=15_000))
        down = await store.finish(Completion("t", "down", Settle.CHARGE, "down", charge=2_000))
        gone = await store.finish(Completion("t", "gone", Settle.REFUND, "gone"))
        assert (up.charged, down.charged, gone.charged) == (15_000, 2_000, 0)
        assert (gone.spent, gone.reserved) == (17_000, 0)
        twice = await store.finish(Completion("t", "up", Settle.CHARGE, "up", charge=15_000))
        assert not twice.settled  # settling is idempotent
        events = [orjson.loads(e.event) for e in await store.ledger("t")]
        assert [(e["kind"], e["credits"], e["reserved"]) for e in events] == [
            ("charge", 15_000, 10_000), ("charge", 2_000, 10_000), ("refund", 0, 10_000)]

    run(store_url, body)


def test_many_completions_in_one_call(store_url: str) -> None:
    async def body(store: Store) -> None:
        for i in range(20):
            await store.admit(admission(f"m{i}", reservation=reserve(f"m{i}", 1_000)))
        batch = [Completion("t", f"m{i}", Settle.CHARGE, f"m{i}", charge=i) for i in range(20)]
        results = await store.finish_many(batch)
        assert [r.charged for r in results] == list(range(20))
        assert results[-1].spent == sum(range(20)) and results[-1].reserved == 0
        assert not any(r.settled for r in await store.finish_many(batch))  # idempotent

    run(store_url, body)


def test_a_batch_survives_a_store_that_lost_its_scripts(redis_server: RedisServer) -> None:
    async def body(store: Store) -> None:
        await store.admit(admission("s", reservation=reserve("s", 1_000)))
        redis_server.cli("SCRIPT", "FLUSH")
        (result,) = await store.finish_many([Completion("t", "s", Settle.REFUND, "s")])
        assert result.settled and result.reserved == 0

    redis_server.cli("FLUSHALL")
    run(redis_server.url, body)


def test_a_new_period_starts_from_zero(store_url: str) -> None:
    async def body(store: Store) -> None:
        for i in range(3):
            await store.admit(admission(f"n{i}", budget_limit=30_000,
                                        reservation=reserve(f"n{i}", 10_000, "d2026-11-24")))
        full = await store.admit(admission("n3", reservation=reserve("n3", 10_000, "d2026-11-24"),
                                           budget_limit=30_000))
        assert full.verdict is Verdict.BUDGET and full.budget_used == 30_000
        fresh = await store.admit(admission("n4", reservation=reserve("n4", 10_000, "d2026-11-25"),
                                            budget_limit=30_000))
        assert fresh.verdict is Verdict.ADMIT and fresh.budget_used == 10_000

    run(store_url, body)


def test_a_task_keeps_its_reservation_until_settled(store_url: str) -> None:
    async def body(store: Store) -> None:
        await store.admit(admission("p", reservation=reserve("p", 100_000), budget_limit=10**9))
        held = await store.finish(Completion("t", "p", Settle.HOLD, "p", hold_id="task:abc",
                                             hold_ms=60_000, task_owner=("abc", 60_000)))
        assert held.settled and held.reserved == 100_000
        (pending,) = await store.reservations("t")
        assert pending.id == "task:abc" and pending.amount == 100_000
        poll = await store.admit(admission("poll", task_id="abc"))
        assert poll.verdict is Verdict.ADMIT
        settled = await store.finish(Completion("t", "poll", Settle.CHARGE, "task:abc",
                                                charge=90_000))
        assert (settled.spent, settled.reserved, settled.charged) == (90_000, 0, 90_000)
        assert await store.reservations("t") == []

    run(store_url, body)


# -- tasks, cache, idempotency -----------------------------------------------------------------


def test_task_ownership(store_url: str) -> None:
    async def body(store: Store) -> None:
        assert (await store.admit(admission(task_id="nope"))).verdict is Verdict.NOT_FOUND
        await store.finish(Completion("t", "x", task_owner=("mine", 60_000)))
        assert (await store.admit(admission(task_id="mine"))).verdict is Verdict.ADMIT
        other = Admission(team="u", key_id="k", ticket="y", hold_ms=1000, task_id="mine")
        assert (await store.admit(other)).verdict is Verdict.NOT_FOUND

    run(store_url, body)


def test_cache_entry_flight_lock_and_hit(store_url: str) -> None:
    ref = CacheRef("chat/completions", "d" * 64)

    async def body(store: Store) -> None:
        lead = await store.admit(admission("lead", cache=ref))
        follow = await store.admit(admission("follow", cache=ref))
        assert (lead.verdict, follow.verdict) == (Verdict.ADMIT, Verdict.FOLLOW)
        assert (await store.flight("t", ref)).held
        await store.finish(Completion("t", "lead", cache_put=(ref, b"entry", 60_000), release=ref))
        flight = await store.flight("t", ref)
        assert flight.entry == b"entry" and 59 < flight.entry_ttl_s <= 60
        hit = await store.admit(admission("again", cache=ref))
        assert hit.verdict is Verdict.HIT and hit.entry == b"entry"
        assert await store.flush_cache(route="chat/completions") == 1
        assert (await store.admit(admission("after", cache=ref))).verdict is Verdict.ADMIT

    run(store_url, body)


def test_a_hit_writes_its_own_bookkeeping(store_url: str) -> None:
    """One round trip for a hit: the ledger entry and the idempotent answer come with it."""
    ref = CacheRef("chat/completions", "a" * 64)
    entry = b'{"s": 200, "h": [], "c": 2500, "t": 60}\n{"answer": 1}'

    async def body(store: Store) -> None:
        await store.admit(admission("lead", cache=ref))
        await store.finish(Completion("t", "lead", cache_put=(ref, entry, 60_000), release=ref))
        hit = await store.admit(admission("hit", cache=ref, hit_event=CONTEXT,
                                          idempotency=("idem", "fp")))
        assert hit.verdict is Verdict.HIT and hit.entry == entry
        (event,) = [orjson.loads(e.event) for e in await store.ledger("t")]
        assert (event["kind"], event["credits"], event["cached"], event["saved"]) == (
            "charge", 0, True, 2500)
        replay = await store.admit(admission("retry", idempotency=("idem", "fp")))
        assert replay.verdict is Verdict.REPLAY and replay.entry == entry

    run(store_url, body)


def test_only_the_lock_owner_releases_it(store_url: str) -> None:
    ref = CacheRef("chat/completions", "e" * 64)

    async def body(store: Store) -> None:
        await store.admit(admission("owner", cache=ref))
        await store.finish(Completion("t", "intruder", release=ref))
        assert (await store.flight("t", ref)).held
        await store.finish(Completion("t", "owner", release=ref))
        assert not (await store.flight("t", ref)).held

    run(store_url, body)


def test_idempotency_states(store_url: str) -> None:
    async def body(store: Store) -> None:
        first = await store.admit(admission("i1", idempotency=("key", "fp1")))
        assert first.verdict is Verdict.ADMIT
        busy = await store.admit(admission("i2", idempotency=("key", "fp1")))
        other = await store.admit(admission("i3", idempotency=("key", "fp2")))
        assert (busy.verdict, other.verdict) == (Verdict.IDEM_BUSY, Verdict.IDEM_MISMATCH)
        await store.finish(Completion("t", "i1", idempotency=("key", b"answer", 60_000)))
        replay = await store.admit(admission("i4", idempotency=("key", "fp1")))
        assert replay.verdict is Verdict.REPLAY and replay.entry == b"answer"
        # a failed first attempt frees the key for a retry
        await store.admit(admission("j1", idempotency=("key2", "fp")))
        await store.finish(Completion("t", "j1", idempotency=("key2", None, 0)))
        retry = await store.admit(admission("j2", idempotency=("key2", "fp")))
        assert retry.verdict is Verdict.ADMIT

    run(store_url, body)


def test_idempotency_lock_expires(store_url: str) -> None:
    async def body(store: Store) -> None:
        crashed = Admission(team="t", key_id="k", ticket="c", hold_ms=200, idempotency=("k", "f"))
        assert (await store.admit(crashed)).verdict is Verdict.ADMIT
        await asyncio.sleep(0.3)
        assert (await store.admit(admission("r", idempotency=("k", "f")))).verdict is Verdict.ADMIT

    run(store_url, body)


def test_revoked_keys(store_url: str) -> None:
    async def body(store: Store) -> None:
        await store.revoke("t", "k", True)
        assert (await store.admit(admission())).verdict is Verdict.REVOKED
        assert await store.revoked("t") == {"k"}
        await store.revoke("t", "k", False)
        assert (await store.admit(admission())).verdict is Verdict.ADMIT

    run(store_url, body)


def test_shared_cache_pacing_and_team_keys_together(store_url: str) -> None:
    """On a cluster these live in three hash slots; the outcome must be the same everywhere."""
    ref = CacheRef("chat/completions", "f" * 64, shared=True)
    pace = one_account(interval_ms=60_000.0, burst=1, queue_ms=0.0)
    quota = Quota("minute", 100, 60.0)

    async def body(store: Store) -> None:
        lead = await store.admit(admission("lead", cache=ref, slot=pace, quotas=(quota,),
                                           reservation=reserve("lead", 10_000),
                                           budget_limit=100_000))
        assert lead.verdict is Verdict.ADMIT and lead.account == "main"
        follow = await store.admit(Admission(team="u", key_id="k2", ticket="f", hold_ms=10_000,
                                             cache=ref, quotas=(quota,)))
        assert follow.verdict is Verdict.FOLLOW  # another team, same shared entry
        paced = await store.admit(admission("paced", slot=pace, quotas=(quota,),
                                            reservation=reserve("paced", 10_000),
                                            budget_limit=100_000))
        assert paced.verdict is Verdict.PACE  # the slot is taken and the queue is 0 ms long
        (usage,) = await store.budgets([("t", "m2026-11")])
        assert usage.reserved == 10_000  # the refused request holds nothing
        await store.finish(Completion("t", "lead", Settle.CHARGE, "lead", charge=3_000,
                                      cache_put=(ref, b"shared entry", 60_000), release=ref))
        hit = await store.admit(Admission(team="u", key_id="k2", ticket="h", hold_ms=10_000,
                                          cache=ref, quotas=(quota,)))
        assert hit.verdict is Verdict.HIT and hit.entry == b"shared entry"
        assert hit.quotas[0].remaining == 98  # the follower and the hit both counted
        assert await store.flush_cache() == 1

    run(store_url, body)


# -- pacing ------------------------------------------------------------------------------------


def one_account(*, interval_ms: float, burst: int, queue_ms: float) -> SlotAsk:
    return SlotAsk((AccountPace("main", interval_ms, burst, 60),), ("main",), queue_ms=queue_ms)


def test_pacing_grants_the_burst_then_queues_then_refuses(store_url: str) -> None:
    """Minutes between slots: nothing frees up while the test runs, whatever the clock."""
    pace = one_account(interval_ms=60_000.0, burst=2, queue_ms=150_000.0)

    async def body(store: Store) -> None:
        results = [await store.admit(admission(f"p{i}", slot=pace)) for i in range(5)]
        assert [r.verdict for r in results] == [Verdict.ADMIT] * 2 + [Verdict.QUEUED] * 2 + [
            Verdict.PACE]
        assert [r.account for r in results] == ["main", "main", None, None, None]
        assert [round(r.wait_s) for r in results[2:4]] == [60, 120]
        assert results[4].retry_after_s == pytest.approx(30, abs=0.1)  # 180 s away, 150 allowed
        claims = await store.claim(["p2", "p3"], pace.accounts)
        assert [round(c.wait_s) for c in claims] == [60, 120] and not any(c.gone for c in claims)
        # a retry outside the queue takes the next slot: the waiting requests come after it
        booked, wait = await store.pace(pace.accounts[0], 10**6)
        assert booked and wait == pytest.approx(60, abs=0.1)
        claims = await store.claim(["p2", "p3"], pace.accounts)
        assert [round(c.wait_s) for c in claims] == [120, 180]
        left = await store.claim(["p2", "p3"], pace.accounts, leave=True)
        assert all(c.gone for c in left)
        assert all(c.gone for c in await store.claim(["p2"], pace.accounts))

    run(store_url, body)


# -- ledger -------------------------------------------------------------------------------------


def test_ledger_pages_and_retention(store_url: str) -> None:
    async def body(store: Store) -> None:
        for i in range(5):
            await store.finish(Completion("t", f"l{i}", event=b'{"n": %d}' % i))
        first = await store.ledger("t", limit=2)
        rest = await store.ledger("t", after=first[-1].id, limit=10)
        assert [orjson.loads(e.event)["n"] for e in first + rest] == [0, 1, 2, 3, 4]
        await asyncio.sleep(0.01)
        cutoff = int(rest[-1].id.split("-")[0]) + 1  # retention ends just after entry 4
        await asyncio.sleep(0.01)
        await store.finish(Completion("t", "l5", event=b'{"n": 5}',
                                      ledger=LedgerTrim(min_ms=cutoff)))
        kept = await store.ledger("t")
        assert [orjson.loads(e.event)["n"] for e in kept] == [5]

    run(store_url, body)


def test_a_lock_is_held_by_one_owner_who_may_extend_it(store_url: str) -> None:
    async def body(store: Store) -> None:
        assert await store.try_lock("job", "a", 60_000)
        assert not await store.try_lock("job", "b", 60_000)
        assert await store.try_lock("job", "a", 60_000)  # the holder renews it
        assert await store.try_lock("other", "b", 60_000)
        assert await store.try_lock("short", "a", 1)
        await asyncio.sleep(0.05)
        assert await store.try_lock("short", "b", 60_000)  # expired: another may take it
        assert not await store.try_lock("short", "a", 60_000)

    run(store_url, body)


def test_redis_down_raises_store_error(private_redis: RedisServer) -> None:
    from gateway.store import StoreError

    async def body(store: Store) -> None:
        assert (await store.admit(admission())).verdict is Verdict.ADMIT
        private_redis.stop()
        with pytest.raises(StoreError):  # on the connection the server closed: it may have run
            await store.admit(admission("down"))
        with pytest.raises(StoreError) as refused:
            await store.admit(admission("down"))
        assert not refused.value.maybe_ran  # refused a new connection: nothing to cancel later
        private_redis.start()
        # scripts are gone after the restart: they are loaded again on demand
        assert (await store.admit(admission("back"))).verdict is Verdict.ADMIT

    run(private_redis.url, body)


# -- one connection shared by every call (one server, Sentinel's master) ----------------------


def _connections_received(server: RedisServer) -> int:
    stats = server.cli("INFO", "stats")
    return int(re.search(r"total_connections_received:(\d+)", stats).group(1))  # type: ignore[union-attr]


def test_concurrent_calls_share_one_connection_and_get_their_own_replies(
        private_redis: RedisServer) -> None:
    """500 admissions at once over one connection, each answered with its own reservation
    (a reply matched to the wrong caller would show as the wrong ticket's verdict)."""
    async def body(store: Store) -> None:
        limits = [reserve(f"r{i}", 1_000 * (i % 2)) for i in range(500)]
        results = await asyncio.gather(*(
            store.admit(admission(f"r{i}", reservation=limits[i], budget_limit=250_000))
            for i in range(500)))
        admitted = [i for i, r in enumerate(results) if r.verdict is Verdict.ADMIT]
        refused = [i for i, r in enumerate(results) if r.verdict is Verdict.BUDGET]
        # the free half always fits; the paid half fits 250 times
        assert all(i in admitted for i in range(0, 500, 2))
        assert len(admitted) == 250 + 250 and all(i % 2 for i in refused)
        (usage,) = await store.budgets([("t", "m2026-11")])
        assert usage.reserved == 250_000

    before = _connections_received(private_redis)
    run(private_redis.url, body)
    assert _connections_received(private_redis) - before <= 2  # the store's (and redis-py's)


def test_a_cancelled_call_does_not_take_the_next_ones_reply(private_redis: RedisServer) -> None:
    async def body(store: Store) -> None:
        private_redis.pause()
        slow = asyncio.ensure_future(store.budgets([("t", "m2026-11")]))
        await asyncio.sleep(0)  # it runs until it waits for its reply: written by then
        slow.cancel()
        private_redis.resume()
        result = await store.admit(admission("after", reservation=reserve("after", 7_000),
                                             budget_limit=10**9))
        assert result.verdict is Verdict.ADMIT
        (usage,) = await store.budgets([("t", "m2026-11")])
        assert (usage.spent, usage.reserved) == (0, 7_000)

    run(private_redis.url, body)


def test_a_hung_redis_times_out_every_waiting_call_then_serves_again(
        private_redis: RedisServer) -> None:
    from gateway.store import StoreError

    async def main() -> None:
        store = open_store(private_redis.url, prefix="test", timeout_s=0.3)
        await store.connect()
        try:
            private_redis.pause()
            try:
                hung = await asyncio.gather(*(store.admit(admission(f"h{i}")) for i in range(5)),
                                            return_exceptions=True)
            finally:
                private_redis.resume()
            assert all(isinstance(e, StoreError) and e.maybe_ran for e in hung)
            assert (await store.admit(admission("back"))).verdict is Verdict.ADMIT
        finally:
            await store.close()

    asyncio.run(main())


def test_a_busy_event_loop_is_not_taken_for_a_hung_redis(private_redis: RedisServer) -> None:
    """Redis answers while the gateway's event loop is busy past the store's timeout (a burst
    on a loaded machine): the loop then runs its timers before it reads the reply. The reply
    is read, not thrown away as a timeout (a 503 for a request Redis had answered)."""
    timeout_s = 0.2

    def scripts_run() -> int:
        stats = private_redis.cli("INFO", "commandstats")
        found = re.search(r"cmdstat_evalsha:calls=(\d+)", stats)
        return int(found.group(1)) if found else 0

    async def main() -> None:
        store = open_store(private_redis.url, prefix="test", timeout_s=timeout_s)
        await store.connect()
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        sent, before = 0.0, 0

        class Busy(asyncio.Protocol):
            """The loop's work that does not end in time, on purpose: it lets Redis answer the
            call, waits for that, and holds the loop until the call is overdue."""

            def data_received(self, data: bytes) -> None:
                private_redis.resume()
                eventually(lambda: scripts_run() > before, "Redis to run the call")
                while time.monotonic() < sent + timeout_s * 2:
                    pass

        transport, _ = await loop.create_connection(Busy, sock=ours)
        try:
            await store.budgets([("t", "m2026-11")])  # connected
            before = scripts_run()
            private_redis.pause()
            sent = time.monotonic()
            call = asyncio.ensure_future(store.admit(admission("busy")))
            for _ in range(3):  # turns of the loop, not time: the call runs, its command leaves
                await asyncio.sleep(0)
            theirs.send(b"x")
            assert (await call).verdict is Verdict.ADMIT
        finally:
            private_redis.resume()
            transport.close()
            theirs.close()
            await store.close()

    uvloop.run(main())  # the gateway's loop: asyncio's own reads before it runs timers


def test_a_demoted_master_is_left_for_the_next_connection(private_redis: RedisServer,
                                                         redis_server: RedisServer) -> None:
    """A failover turns the server into a replica: its READONLY answer is a store error, and the
    connection is dropped so that the next call connects again (through Sentinel: to the new
    master) instead of asking the replica forever."""
    from gateway.store import StoreError

    async def body(store: Store) -> None:
        assert (await store.admit(admission("before"))).verdict is Verdict.ADMIT
        connected = _connections_received(private_redis)
        private_redis.cli("REPLICAOF", "127.0.0.1", str(redis_server.port))
        try:
            with pytest.raises(StoreError):  # a reservation is a write
                await store.admit(admission("demoted", reservation=reserve("demoted", 1_000),
                                            budget_limit=10**9))
        finally:
            private_redis.cli("REPLICAOF", "NO", "ONE")
        assert (await store.admit(admission("promoted"))).verdict is Verdict.ADMIT
        # redis-cli's three (REPLICAOF twice, INFO), and the store's one new connection
        assert _connections_received(private_redis) == connected + 3 + 1

    run(private_redis.url, body)


def test_scripts_the_store_lost_are_loaded_again_for_one_call_and_a_batch(
        private_redis: RedisServer) -> None:
    async def body(store: Store) -> None:
        await store.admit(admission("r", reservation=reserve("r", 5_000), budget_limit=10**9))
        private_redis.cli("SCRIPT", "FLUSH")
        batch = [Completion("t", "r", Settle.CHARGE, "r", charge=4_000)]
        assert [getattr(r, "settled", None) for r in await store.finish_many(batch)] == [True]
        private_redis.cli("SCRIPT", "FLUSH")
        assert (await store.admit(admission("again"))).verdict is Verdict.ADMIT
        (usage,) = await store.budgets([("t", "m2026-11")])
        assert (usage.spent, usage.reserved) == (4_000, 0)

    run(private_redis.url, body)


# -- bookkeeping sent again ------------------------------------------------------------------


def test_a_completion_sent_again_is_applied_once(store_url: str) -> None:
    """The bookkeeping retries a batch whose reply was lost: nothing is applied twice, not even
    a ledger event that no reservation stands behind (a coalesced answer's)."""
    async def body(store: Store) -> None:
        await store.admit(admission("r", reservation=reserve("r", 5_000), budget_limit=10**9))
        batch = [Completion("t", "r", Settle.CHARGE, "r", charge=4_000),
                 Completion("t", "c", event=CONTEXT[:-1] + b',"kind":"charge","credits":0}')]
        first = await store.finish_many(batch)
        again = await store.finish_many(batch)
        assert [getattr(r, "settled", None) for r in first] == [True, False]
        assert [getattr(r, "settled", None) for r in again] == [False, False]
        assert len(await store.ledger("t")) == 2
        (usage,) = await store.budgets([("t", "m2026-11")])
        assert (usage.spent, usage.reserved) == (4_000, 0)

    run(store_url, body)


def test_a_bad_charge_changes_nothing(store_url: str) -> None:
    """A script refuses what it cannot apply before it writes anything: the reservation stays
    for a correct settlement (the bookkeeping validates numbers first; this is the backstop)."""
    from gateway.store import ScriptFailed

    async def body(store: Store) -> None:
        await store.admit(admission("b", reservation=reserve("b", 5_000), budget_limit=10**9))
        for charge in (-5, 1.5):
            bad = Completion("t", "b", Settle.CHARGE, "b", charge=charge)  # type: ignore[arg-type]
            with pytest.raises(ScriptFailed):
                await store.finish(bad)
        (pending,) = await store.reservations("t")
        assert (pending.id, pending.amount) == ("b", 5_000)
        assert (await store.finish(Completion("t", "b", Settle.CHARGE, "b", charge=1))).settled

    run(store_url, body)


def test_processes_report_liveness_and_config_generation(store_url: str) -> None:
    async def body(store: Store) -> None:
        assert (await store.heartbeat("p1", 0)).generation == 0
        assert await store.bump_config() == 1
        seen = await store.heartbeat("p2", 1)
        assert seen.generation == 1
        assert {name: gen for name, (gen, _) in seen.seen.items()} == {"p1": 0, "p2": 1}
        await asyncio.sleep(0.05)
        processes = await store.processes()
        assert processes.alive(30_000) == {"p1", "p2"}
        assert processes.alive(10) == set()  # neither was heard from in the last 10 ms

    run(store_url, body)
