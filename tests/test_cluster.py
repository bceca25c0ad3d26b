"""The gateway on a 3-master Redis Cluster and through Sentinel: same answers as on one Redis."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterator

import pytest
from redis.crc import key_slot

from gateway.quota import Quota
from gateway.store import Store, open_store
from gateway.store.base import Admission, StoreError, Verdict

from .conftest import (
    GatewayFactory,
    Mock,
    RedisClusterServers,
    RedisServer,
    SentinelServers,
    eventually,
)
from .test_cache import CHAT, storm
from .test_limits import burst, teams_with
from .test_proxy import wait_ledger
from .test_store import admission, run


def test_budget_race_on_a_cluster(redis_cluster: RedisClusterServers,
                                  make_gateway: GatewayFactory, mock: Mock) -> None:
    redis_cluster.flush()
    # The race, not the store's timeout, is under test (as in test_limits): 200 requests and
    # their client share one process, whose event loop can be busy longer than the suite's
    # 0.5 s on a loaded machine (503 store_unavailable, seen in CI).
    gateway = make_gateway(redis_cluster.url, teams=teams_with(budget={"credits": 74}),
                           store={"timeout_s": 5})
    answers = asyncio.run(burst([gateway.url], 200))
    assert Counter(a.status_code for a in answers) == {200: 37, 402: 163}
    assert mock.count("POST chat/completions") == 37
    entries = wait_ledger(gateway, 37)
    assert sum(e["credits"] for e in entries) == 74


def test_shared_cache_and_pacing_span_slots(redis_cluster: RedisClusterServers,
                                            make_gateway: GatewayFactory, mock: Mock) -> None:
    """Team keys, the shared cache entry and the upstream schedule sit in three different slots."""
    redis_cluster.flush()
    gateway = make_gateway(redis_cluster.url, cache={"scope": "organisation"},
                           upstream={"requests_per_minute": 6000, "burst": 10})
    mock.fault(delay_s=0.5)
    answers = asyncio.run(storm([gateway.url], 40, CHAT))
    assert {a.status_code for a in answers} == {200}
    assert mock.count("POST chat/completions") == 1
    other_team = gateway.chat("cache me", team="marketing")
    assert other_team.headers["x-cache"] == "HIT"
    keys = "\n".join(n.cli("--scan") for n in redis_cluster.nodes)
    assert "{org}:sched" in keys and "{c:" in keys and "{t:research}" in keys


def test_pacing_refusal_gives_back_the_reservation(redis_cluster: RedisClusterServers,
                                                   make_gateway: GatewayFactory,
                                                   mock: Mock) -> None:
    redis_cluster.flush()
    gateway = make_gateway(redis_cluster.url, teams=teams_with(budget={"credits": 100}),
                           upstream={"requests_per_minute": 60, "burst": 2,
                                     "queue_timeout_s": 0})
    answers = asyncio.run(burst([gateway.url], 5))
    assert Counter(a.status_code for a in answers) == {200: 2, 429: 3}
    wait_ledger(gateway, 2)
    research = gateway.team()
    assert (research["spent"], research["reserved"]) == (4, 0)


def test_gateway_through_sentinel(redis_sentinel: SentinelServers, make_gateway: GatewayFactory,
                                  mock: Mock) -> None:
    redis_sentinel.master.cli("FLUSHALL")
    gateway = make_gateway(redis_sentinel.url, teams=teams_with(requests_per_minute=2))
    assert [gateway.chat(f"s{i}").status_code for i in range(3)] == [200, 200, 429]
    assert gateway.client.get("/readyz").json()["status"] == "ready"


# -- the cluster's slot map changing under the store ------------------------------------------

QUOTA = Quota("minute", 1000, 60.0)


def _owner(node: RedisServer, slot: int) -> int:
    """The port of the master that `node` says serves `slot` (CLUSTER NODES)."""
    for line in node.cli("CLUSTER", "NODES").splitlines():
        fields = line.split()
        for part in fields[8:]:  # "low-high" or "slot"; "[slot->-id]" while migrating
            low, _, high = part.partition("-")
            if low.isdigit() and int(low) <= slot <= int(high or low):
                return int(fields[1].split("@")[0].rpartition(":")[2])
    raise AssertionError(f"no master serves slot {slot}")


def _owner_and_other(cluster: RedisClusterServers, slot: int) -> tuple[RedisServer, RedisServer]:
    port = _owner(cluster.nodes[0], slot)
    owner = next(n for n in cluster.nodes if n.port == port)
    return owner, next(n for n in cluster.nodes if n is not owner)


def _give(cluster: RedisClusterServers, slot: int, to: RedisServer) -> None:
    """Hand an empty slot to `to`, as a finished resharding does, and wait until every node
    says so."""
    node_id = to.cli("CLUSTER", "MYID")
    for node in sorted(cluster.nodes, key=lambda n: n is not to):  # the new owner first
        node.cli("CLUSTER", "SETSLOT", str(slot), "NODE", node_id)
    eventually(lambda: all(_owner(n, slot) == to.port for n in cluster.nodes),
               f"every node to see slot {slot} on port {to.port}")


def _migrate(slot: int, source: RedisServer, target: RedisServer) -> None:
    """Start moving `slot` from `source` to `target`, as a resharding does before MIGRATE."""
    target.cli("CLUSTER", "SETSLOT", str(slot), "IMPORTING", source.cli("CLUSTER", "MYID"))
    source.cli("CLUSTER", "SETSLOT", str(slot), "MIGRATING", target.cli("CLUSTER", "MYID"))


def _settle(slot: int, *nodes: RedisServer) -> None:
    """Call off a migration of `slot`: it stays where it was."""
    for node in nodes:
        node.cli("CLUSTER", "SETSLOT", str(slot), "STABLE")


@contextlib.contextmanager
def _slot_owners(cluster: RedisClusterServers,
                 slot: int) -> Iterator[tuple[RedisServer, RedisServer]]:
    """The master serving `slot` and another master, on an emptied cluster; afterwards the slot
    is empty, no longer moving and served by its master again, whatever the test did to it."""
    cluster.flush()
    source, target = _owner_and_other(cluster, slot)
    try:
        yield source, target
    finally:
        cluster.flush()
        _settle(slot, source, target)
        _give(cluster, slot, source)


def test_a_slot_moved_to_another_master_is_followed(redis_cluster: RedisClusterServers) -> None:
    """Resharding moved the team's slot: its old master answers MOVED (the script did not run),
    the call goes again to the new one, and the store reads the slot map again."""
    slot = key_slot(b"t:t")  # the team's keys, {t:t}
    with _slot_owners(redis_cluster, slot) as (source, target):

        async def body(store: Store) -> None:
            first = await store.admit(Admission(team="t", key_id="k", ticket="a", hold_ms=10_000,
                                                quotas=(QUOTA,)))
            assert first.verdict is Verdict.ADMIT
            redis_cluster.flush()  # an empty slot moves without MIGRATE
            _give(redis_cluster, slot, target)
            moved = await store.admit(Admission(team="t", key_id="k", ticket="b", hold_ms=10_000,
                                                quotas=(QUOTA,)))
            assert moved.verdict is Verdict.ADMIT
            assert int(target.cli("CLUSTER", "COUNTKEYSINSLOT", str(slot))) > 0
            assert int(source.cli("CLUSTER", "COUNTKEYSINSLOT", str(slot))) == 0

        run(redis_cluster.url, body)


def test_a_slot_being_migrated_is_asked_for_on_its_new_master(
        redis_cluster: RedisClusterServers) -> None:
    """Mid-migration, the old master answers ASK for a key it no longer holds: the call goes to
    the importing master after ASKING, on the same connection, and runs there. (A script over
    several keys of which some are missing gets TRYAGAIN there instead, as Redis answers while
    a slot moves: a store error, see the README.)"""
    slot = key_slot(b"org")  # the organisation's keys, {org}
    with _slot_owners(redis_cluster, slot) as (source, target):

        async def body(store: Store) -> None:
            assert await store.try_lock("job", "me", 60_000)
            redis_cluster.flush()
            _migrate(slot, source, target)
            assert await store.try_lock("job", "me", 60_000)
            assert int(target.cli("CLUSTER", "COUNTKEYSINSLOT", str(slot))) == 1
            assert int(source.cli("CLUSTER", "COUNTKEYSINSLOT", str(slot))) == 0

        run(redis_cluster.url, body)


def test_a_script_over_keys_split_by_a_migration_is_a_store_error(
        redis_cluster: RedisClusterServers) -> None:
    """Mid-migration, a script over a team's keys of which some are on the old master and some
    are missing gets TRYAGAIN: it did not run (nothing to undo), and it is a store error that
    `store.on_error` decides, until the slot has moved."""
    slot = key_slot(b"t:t")
    with _slot_owners(redis_cluster, slot) as (source, target):
        quota = Quota("minute", 2, 60.0)

        async def body(store: Store) -> None:
            assert (await store.admit(admission("a", quotas=(quota,)))).verdict is Verdict.ADMIT
            _migrate(slot, source, target)
            with pytest.raises(StoreError, match="TRYAGAIN") as refused:
                await store.admit(admission("b", quotas=(quota,)))
            assert refused.value.maybe_ran is False
            _settle(slot, source, target)
            second = await store.admit(admission("b", quotas=(quota,)))
            assert second.verdict is Verdict.ADMIT
            assert second.quotas[0].remaining == 0  # the refused call counted nothing

        run(redis_cluster.url, body)


def _replicated(master: RedisServer, replica: RedisServer) -> None:
    """Wait until `replica` has applied all that `master` has written so far. Not `WAIT`: it
    waits only for the writes of the connection that sends it, and redis-cli's has written
    nothing, so it answers at once, whether the replica has the writes or not."""
    def offset(node: RedisServer, name: str) -> int:
        info = node.cli("INFO", "replication")
        return int(info.split(f"{name}:", 1)[1].split()[0])

    written = offset(master, "master_repl_offset")
    eventually(lambda: offset(replica, "slave_repl_offset") >= written,
               "the replica to apply the master's writes")


@pytest.fixture
def replicated_cluster() -> Iterator[RedisClusterServers]:
    """A cluster of its own, a replica to each master: the test kills a master."""
    cluster = RedisClusterServers(replicas=1, node_timeout_ms=1000)
    yield cluster
    cluster.close()


def test_a_dead_master_is_replaced_by_its_replica(
        replicated_cluster: RedisClusterServers) -> None:
    """The team's master dies: its calls are store errors until the cluster promotes its
    replica, then the store finds the new master by reading the slot map again, with the
    team's state (replicated before the failure) there."""
    cluster = replicated_cluster
    slot = key_slot(b"t:t")
    port = _owner(cluster.nodes[0], slot)
    master = next(n for n in cluster.nodes if n.port == port)
    master_id = master.cli("CLUSTER", "MYID")
    replica = next(n for n in cluster.nodes
                   if f"slave {master_id}" in n.cli("CLUSTER", "NODES").split("myself")[1]
                   .splitlines()[0])
    quota = Quota("day", 2, 86400.0)  # drains 1 per 12 h: however long the failover takes

    async def body(store: Store) -> None:
        first = await store.admit(admission("a", quotas=(quota,)))
        assert first.verdict is Verdict.ADMIT and first.quotas[0].remaining == 1
        _replicated(master, replica)
        master.stop()
        with pytest.raises(StoreError):
            await store.admit(admission("b", quotas=(quota,)))
        eventually(lambda: "role:master" in replica.cli("INFO", "replication")
                   and cluster.serving(), "the replica to take over")
        second = await store.admit(admission("b", quotas=(quota,)))
        assert second.verdict is Verdict.ADMIT and second.quotas[0].remaining == 0
        third = await store.admit(admission("c", quotas=(quota,)))
        assert third.verdict is Verdict.QUOTA
        assert _owner(replica, slot) == replica.port

    run(cluster.url, body)


def test_a_burst_on_a_cluster_shares_one_connection_per_master(
        redis_cluster: RedisClusterServers) -> None:
    """200 concurrent admissions over teams in every master's slots open no connection beyond
    the one per master that loading the scripts opened (redis-py's cluster client took one per
    concurrent call)."""
    redis_cluster.flush()
    teams = [f"team{i}" for i in range(12)]
    assert len({_owner(redis_cluster.nodes[0], key_slot(f"t:{t}".encode()))
                for t in teams}) == 3

    def received() -> list[int]:
        return [int(n.cli("INFO", "stats").split("total_connections_received:")[1].split()[0])
                for n in redis_cluster.nodes]

    async def main() -> list[Verdict]:
        store = open_store(redis_cluster.url, prefix="test", timeout_s=5)
        await store.connect()
        try:
            before = received()
            results = await asyncio.gather(*(
                store.admit(Admission(team=teams[i % 12], key_id="k", ticket=f"b{i}",
                                      hold_ms=10_000, quotas=(QUOTA,)))
                for i in range(200)))
            # redis-cli's own connection to each node, for INFO: one each
            assert [b - a for a, b in zip(before, received(), strict=True)] == [1, 1, 1]
            return [r.verdict for r in results]
        finally:
            await store.close()

    assert set(asyncio.run(main())) == {Verdict.ADMIT}
