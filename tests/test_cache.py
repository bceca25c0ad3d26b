"""The request cache and single-flight, on both stores and across replicas."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from typing import Any

import httpx

from .conftest import (
    KEYS,
    GatewayFactory,
    Mock,
    RedisServer,
    RunningGateway,
    base_config,
)
from .test_proxy import wait_ledger

CHAT = {"model": "gemini", "messages": [{"role": "user", "content": "cache me"}]}


def post(gateway: RunningGateway, body: Any = CHAT, team: str = "research",
         **headers: str) -> httpx.Response:
    return gateway.call("POST", "chat/completions", team=team, json=body, headers=headers)


def test_identical_posts_make_one_upstream_call(gateway: RunningGateway, mock: Mock) -> None:
    first, second = post(gateway), post(gateway)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert second.content == first.content
    assert int(second.headers["age"]) >= 0 and "age" not in first.headers
    assert mock.count("POST chat/completions") == 1


def test_canonical_json_ignores_key_order_and_whitespace(gateway: RunningGateway,
                                                         mock: Mock) -> None:
    a = gateway.call("POST", "chat/completions",
                     content=b'{"model":"gemini","messages":[{"role":"user","content":"x"}]}')
    b = gateway.call("POST", "chat/completions",
                     content=b'{ "messages" : [ {"content": "x", "role": "user"} ],\n'
                             b' "model": "gemini" }')
    assert (a.headers["x-cache"], b.headers["x-cache"]) == ("MISS", "HIT")
    assert mock.count("POST chat/completions") == 1


def test_different_body_or_team_misses(gateway: RunningGateway, mock: Mock) -> None:
    post(gateway)
    other_body = post(gateway, {**CHAT, "temperature": 0.5})
    other_team = post(gateway, team="marketing")
    assert other_body.headers["x-cache"] == other_team.headers["x-cache"] == "MISS"
    assert mock.count("POST chat/completions") == 3


def test_organisation_scope_shares_across_teams(make_gateway: GatewayFactory, store_url: str,
                                                mock: Mock) -> None:
    gateway = make_gateway(store_url, cache={"scope": "organisation"})
    assert post(gateway).headers["x-cache"] == "MISS"
    shared = post(gateway, team="marketing")
    assert shared.headers["x-cache"] == "HIT"
    assert mock.count("POST chat/completions") == 1


def test_client_cache_control(gateway: RunningGateway, mock: Mock) -> None:
    first = post(gateway)
    refreshed = post(gateway, **{"Cache-Control": "no-cache"})
    assert refreshed.headers["x-cache"] == "BYPASS"
    assert refreshed.content != first.content  # a fresh answer...
    assert post(gateway).content == refreshed.content  # ...that replaced the cached one
    untouched = post(gateway, **{"Cache-Control": "no-store"})
    assert untouched.headers["x-cache"] == "BYPASS"
    assert post(gateway).content == refreshed.content
    assert mock.count("POST chat/completions") == 3


def test_only_2xx_is_stored(gateway: RunningGateway, mock: Mock) -> None:
    mock.fault(status=500)
    assert post(gateway).status_code == 500
    retry = post(gateway)
    assert retry.status_code == 200 and retry.headers["x-cache"] == "MISS"
    assert mock.count("POST chat/completions") == 2


def test_streams_and_big_answers_are_not_stored(make_gateway: GatewayFactory, store_url: str,
                                                mock: Mock) -> None:
    gateway = make_gateway(store_url, cache={"max_entry_bytes": 100})
    assert post(gateway).headers["x-cache"] == "MISS"
    assert post(gateway).headers["x-cache"] == "MISS"  # the answer is above 100 bytes
    stream = {**CHAT, "stream": True, "mock_chunk_delay_s": 0}
    assert post(gateway, stream).headers["x-cache"] == "BYPASS"
    assert post(gateway, stream).headers["x-cache"] == "BYPASS"
    assert mock.count("POST chat/completions") == 4


def test_uncached_endpoints_bypass(gateway: RunningGateway, mock: Mock) -> None:
    body = {"model": "flux-2", "prompt": "same"}
    answers = [gateway.call("POST", "images/generations", json=body) for _ in range(2)]
    assert [a.headers["x-cache"] for a in answers] == ["BYPASS", "BYPASS"]
    assert answers[0].json()["id"] != answers[1].json()["id"]


def test_a_hit_is_charged_nothing_and_counted_as_saved(make_gateway: GatewayFactory,
                                                       store_url: str) -> None:
    gateway = make_gateway(store_url, teams={
        "research": {"keys": base_config("http://x")["teams"]["research"]["keys"],
                     "budget": {"credits": 100}},
        "marketing": base_config("http://x")["teams"]["marketing"]})
    post(gateway, {**CHAT, "mock_credits": 3})
    post(gateway, {**CHAT, "mock_credits": 3})
    entries = wait_ledger(gateway, 2)
    assert [(e["credits"], e["cached"], e.get("saved")) for e in entries] == [
        (3, False, None), (0, True, 3)]
    metrics = gateway.metrics()
    assert 'gateway_credits_saved_total{team="research"} 3.0' in metrics
    assert 'gateway_credits_charged_total{team="research"} 3.0' in metrics
    assert 'gateway_cache_events_total{result="hit",route="chat/completions"} 1.0' in metrics


async def storm(urls: list[str], n: int, body: dict[str, Any]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n)) as client:
        return await asyncio.gather(*(
            client.post(f"{urls[i % len(urls)]}/api/v1/chat/completions", json=body,
                        headers={"Authorization": f"Bearer {KEYS['research']}"})
            for i in range(n)))


def test_50_concurrent_identical_requests_make_one_call(gateway: RunningGateway,
                                                        mock: Mock) -> None:
    mock.fault(delay_s=0.5)  # keep the leader in flight while the others arrive
    answers = asyncio.run(storm([gateway.url], 50, CHAT))
    assert {a.status_code for a in answers} == {200}
    assert len({a.content for a in answers}) == 1
    kinds = Counter(a.headers["x-cache"] for a in answers)
    assert kinds["MISS"] == 1 and kinds["COALESCED"] + kinds["HIT"] == 49
    assert mock.count("POST chat/completions") == 1


def test_single_flight_across_replicas(redis_server: RedisServer, mock: Mock,
                                       gateway_process: Any) -> None:
    redis_server.cli("FLUSHALL")
    config = base_config(mock.api_url, redis_server.url)
    first, second = gateway_process(config), gateway_process(config)
    mock.fault(delay_s=0.5)
    answers = asyncio.run(storm([first.url, second.url], 50, CHAT))
    assert {a.status_code for a in answers} == {200}
    assert len({a.content for a in answers}) == 1
    assert mock.count("POST chat/completions") == 1


def test_a_leader_that_fails_does_not_strand_followers(make_gateway: GatewayFactory,
                                                       store_url: str, mock: Mock) -> None:
    gateway = make_gateway(store_url, upstream={"timeout_s": 0.3, "retries": 0})
    mock.fault(delay_s=1.0)  # the leader times out; the next upstream call answers at once
    answers = asyncio.run(storm([gateway.url], 10, CHAT))
    assert all(a.status_code in (200, 504) for a in answers)
    follow_up = post(gateway)
    assert follow_up.status_code == 200
    assert mock.count("POST chat/completions") <= 2


def test_a_dead_leader_replica_does_not_strand_followers(redis_server: RedisServer, mock: Mock,
                                                         gateway_process: Any) -> None:
    """The replica fetching the answer is killed; the other one takes over when its lock ends."""
    redis_server.cli("FLUSHALL")
    config = base_config(mock.api_url, redis_server.url,
                         upstream={"timeout_s": 1, "retries": 0, "queue_timeout_s": 0})
    leader, survivor = gateway_process(config), gateway_process(config)
    mock.fault(delay_s=30)  # the leader's upstream call hangs
    headers = {"Authorization": f"Bearer {KEYS['research']}"}
    lost = threading.Thread(target=lambda: _quietly(lambda: httpx.post(
        f"{leader.url}/api/v1/chat/completions", json=CHAT, headers=headers, timeout=30)))
    lost.start()
    mock.wait_for("POST chat/completions")  # the leader holds the flight lock
    leader.kill()  # ... and dies with it: the lock stays until it expires
    started = time.monotonic()
    follower: list[httpx.Response] = []
    waiting = threading.Thread(target=lambda: follower.append(httpx.post(
        f"{survivor.url}/api/v1/chat/completions", json=CHAT, headers=headers, timeout=30)))
    waiting.start()
    waiting.join(20)
    assert follower and follower[0].status_code == 200
    assert time.monotonic() - started < 15  # the lock lives timeout + 5 s, not forever
    lost.join(5)


def _quietly(call: Any) -> None:
    with contextlib.suppress(httpx.HTTPError):
        call()


def test_cache_survives_a_restart_on_redis(redis_server: RedisServer, mock: Mock,
                                           make_gateway: GatewayFactory) -> None:
    redis_server.cli("FLUSHALL")
    before = make_gateway(redis_server.url)
    first = post(before)
    before.drain()  # the entry is written after the answer
    before.close()
    after = make_gateway(redis_server.url)
    again = post(after)
    assert again.headers["x-cache"] == "HIT" and again.content == first.content
    assert mock.count("POST chat/completions") == 1


def test_admin_flush(gateway: RunningGateway, mock: Mock) -> None:
    post(gateway)
    post(gateway, team="marketing")
    gateway.drain()
    assert gateway.admin("DELETE", "cache?team=marketing").json() == {"removed": 1}
    assert post(gateway).headers["x-cache"] == "HIT"
    assert gateway.admin("DELETE", "cache?route=chat/completions").json() == {"removed": 1}
    assert post(gateway).headers["x-cache"] == "MISS"
    gateway.drain()
    assert gateway.admin("DELETE", "cache").json() == {"removed": 1}
    bad = gateway.admin("DELETE", "cache?route=nope")
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request"
