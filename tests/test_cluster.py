"""The gateway on a 3-master Redis Cluster and through Sentinel: same answers as on one Redis."""

from __future__ import annotations

import asyncio
from collections import Counter

from .conftest import GatewayFactory, Mock, RedisClusterServers, SentinelServers
from .test_cache import CHAT, storm
from .test_limits import burst, teams_with
from .test_proxy import wait_ledger


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
