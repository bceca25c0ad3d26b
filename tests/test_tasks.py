"""Async tasks: ownership, the polling-storm absorber, settlement when a task ends."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import orjson

from gateway.store import open_store
from gateway.store.base import Admission, Reservation
from gateway.tasks import Reconciler

from .conftest import KEYS, GatewayFactory, Mock, RedisServer, RunningGateway, eventually
from .test_limits import teams_with
from .test_proxy import error_of, wait_ledger


def create(gateway: RunningGateway, team: str = "research", **body: Any) -> str:
    answer = gateway.call("POST", "images/generations", team=team,
                          json={"model": "flux-2", "prompt": "x", **body})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["id"])


def poll_until_final(gateway: RunningGateway, task_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = gateway.call("GET", f"tasks/{task_id}").json()
        if status["status"] in ("completed", "failed"):
            return status  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError("task did not finish")


def test_another_teams_task_is_404_without_asking_upstream(gateway: RunningGateway,
                                                           mock: Mock) -> None:
    task_id = create(gateway)
    theirs = gateway.call("GET", f"tasks/{task_id}", team="marketing")
    assert theirs.status_code == 404 and error_of(theirs)["type"] == "not_found"
    unknown = gateway.call("GET", "tasks/task_never_made")
    assert unknown.status_code == 404
    assert mock.count(f"GET tasks/{task_id}") == 0
    assert mock.count("GET tasks/task_never_made") == 0
    assert gateway.call("GET", f"tasks/{task_id}").status_code == 200


def test_polling_storm_costs_one_upstream_call_per_interval(make_gateway: GatewayFactory,
                                                            store_url: str, mock: Mock) -> None:
    gateway = make_gateway(store_url, cache={"pending_task_ttl_s": 1})
    task_id = create(gateway, mock_delay_s=60)

    async def storm() -> list[int]:
        headers = {"Authorization": f"Bearer {KEYS['research']}"}
        statuses = []
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as c:
            for _ in range(5):  # 5 waves of 20 over ~2 s: 100 clients polling one task
                wave = await asyncio.gather(*(c.get(f"{gateway.url}/api/v1/tasks/{task_id}",
                                                    headers=headers) for _ in range(20)))
                statuses += [r.status_code for r in wave]
                await asyncio.sleep(0.4)
        return statuses

    started = time.monotonic()
    statuses = asyncio.run(storm())
    elapsed = time.monotonic() - started
    assert statuses == [200] * 100
    polls = mock.count(f"GET tasks/{task_id}")
    assert 1 <= polls <= int(elapsed / 1) + 1


def test_finished_tasks_are_served_from_cache(gateway: RunningGateway, mock: Mock) -> None:
    task_id = create(gateway, mock_delay_s=0.2)
    final = poll_until_final(gateway, task_id)
    before = mock.count(f"GET tasks/{task_id}")
    for _ in range(5):
        again = gateway.call("GET", f"tasks/{task_id}")
        assert again.json() == final and again.headers["x-cache"] == "HIT"
    assert mock.count(f"GET tasks/{task_id}") == before


def test_credits_settle_when_the_task_finishes(make_gateway: GatewayFactory,
                                              store_url: str) -> None:
    gateway = make_gateway(store_url, teams=teams_with(budget={"credits": 1000}))
    done = create(gateway, mock_delay_s=0.2, mock_credits=7)
    failed = create(gateway, mock_delay_s=0.2, mock_fail=True)
    time.sleep(0.1)
    research = gateway.team()
    assert (research["spent"], research["reserved"]) == (0, 8)  # flux-2 reserves 4 each
    assert poll_until_final(gateway, done)["credits_consumed"] == 7
    assert poll_until_final(gateway, failed)["status"] == "failed"
    entries = wait_ledger(gateway, 2)
    assert sorted((e["kind"], e["credits"]) for e in entries) == [("charge", 7), ("refund", 0)]
    research = gateway.team()
    assert (research["spent"], research["reserved"]) == (7, 0)


def test_shared_answer_makes_the_task_pollable_by_both_teams(make_gateway: GatewayFactory,
                                                             store_url: str, mock: Mock) -> None:
    gateway = make_gateway(store_url, cache={"scope": "organisation",
                                             "endpoints": ["images/generations"]})
    mine = create(gateway, prompt="same picture")
    theirs = create(gateway, team="marketing", prompt="same picture")
    assert mine == theirs
    assert mock.count("POST images/generations") == 1
    time.sleep(0.2)
    assert gateway.call("GET", f"tasks/{mine}", team="marketing").status_code == 200


def test_reconciler_settles_tasks_nobody_polls(make_gateway: GatewayFactory,
                                               store_url: str) -> None:
    gateway = make_gateway(store_url, teams=teams_with(budget={"credits": 1000}),
                           reconcile_interval_s=0.2, task_check_s=0.3)
    create(gateway, mock_delay_s=0.1, mock_credits=9)
    entries = wait_ledger(gateway, 1)
    assert [(e["kind"], e["credits"], e["model"]) for e in entries] == [("charge", 9, "flux-2")]
    assert gateway.team()["reserved"] == 0


def test_reconciler_charges_what_a_dead_replica_reserved(redis_server: RedisServer,
                                                         make_gateway: GatewayFactory) -> None:
    """A replica reserved credits and died before settling: another replica settles it."""
    redis_server.cli("FLUSHALL")
    gateway = make_gateway(redis_server.url, teams=teams_with(budget={"credits": 100}),
                           reconcile_interval_s=0.2, alive_s=0.6)
    context = orjson.dumps({"team": "research", "key_id": "research-key", "model": "gemini",
                            "route": "chat/completions", "request_id": "lost", "cached": False})

    async def reserve_and_die() -> None:
        store = open_store(redis_server.url)
        period = time.strftime("m%Y-%m", time.gmtime())
        await store.admit(Admission(team="research", key_id="research-key", ticket="lost",
                                    hold_ms=100, reservation=Reservation("lost", period, 5000,
                                                                         context),
                                    budget_limit=100_000))
        await store.close()

    asyncio.run(reserve_and_die())
    (entry,) = wait_ledger(gateway, 1)
    assert (entry["kind"], entry["credits"], entry["request_id"]) == ("charge", 5, "lost")
    research = gateway.team()
    assert (research["spent"], research["reserved"]) == (5, 0)


def test_reconciler_leaves_a_live_replicas_reservations(redis_server: RedisServer,
                                                        make_gateway: GatewayFactory) -> None:
    """A replica that still says it is alive is still answering, or its bookkeeping is on the
    way: its reservation is left alone, however late; once it falls silent, it is settled.
    The rounds are driven here (no background rounds), the peer heartbeating between them."""
    redis_server.cli("FLUSHALL")
    gateway = make_gateway(redis_server.url, teams=teams_with(budget={"credits": 100}),
                           alive_s=0.6)
    context = orjson.dumps({"team": "research", "key_id": "research-key", "model": "gemini",
                            "route": "chat/completions", "request_id": "slow"})

    async def as_peer(*, reserve: bool = False) -> None:
        store = open_store(redis_server.url)
        if reserve:
            period = time.strftime("m%Y-%m", time.gmtime())
            await store.admit(Admission(
                team="research", key_id="research-key", ticket="peer.1", hold_ms=10,
                reservation=Reservation("peer.1", period, 5000, context), budget_limit=100_000))
        await store.heartbeat("peer", 0)  # "alive"
        await store.close()

    runtime = gateway.runtime
    eventually(runtime.liveness_known, "the gateway trusting the list of live processes")
    reconciler = Reconciler(runtime)
    asyncio.run(as_peer(reserve=True))
    for _ in range(3):  # overdue (hold_ms=10) but its owner is alive: untouched
        assert gateway.run(reconciler.once()) == 0
        asyncio.run(as_peer())
    assert len(gateway.run(runtime.store.reservations("research"))) == 1
    # fallen silent: settled as reserved once its last word is older than alive_s
    eventually(lambda: gateway.run(reconciler.once()) == 1, "the silent peer's reservation")
    (entry,) = wait_ledger(gateway, 1)
    assert (entry["kind"], entry["credits"], entry["request_id"]) == ("charge", 5, "slow")
