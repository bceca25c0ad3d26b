"""Quotas, budgets, the model allow-list and upstream pacing, through real HTTP."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from .conftest import (
    ADMIN_KEY,
    KEYS,
    GatewayFactory,
    Mock,
    RedisServer,
    RunningGateway,
    base_config,
    free_port,
    team_config,
)
from .test_proxy import error_of, wait_ledger


async def burst(urls: list[str], n: int, *, team: str = "research", model: str = "gemini",
                extra: dict[str, Any] | None = None) -> list[httpx.Response]:
    """`n` concurrent chat requests with distinct bodies, spread over `urls`."""
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return await asyncio.gather(*(
            client.post(f"{urls[i % len(urls)]}/api/v1/chat/completions",
                        headers={"Authorization": f"Bearer {KEYS[team]}"},
                        json={"model": model, **(extra or {}),
                              "messages": [{"role": "user", "content": f"request {i}"}]})
            for i in range(n)))


def teams_with(**research: Any) -> dict[str, Any]:
    return {"research": team_config("research", **research), "marketing": team_config("marketing")}


# -- quotas ------------------------------------------------------------------------------------


def test_quota_429_with_headers(make_gateway: GatewayFactory, store_url: str, mock: Mock) -> None:
    gateway = make_gateway(store_url, teams=teams_with(requests_per_minute=3,
                                                       requests_per_day=1000))
    answers = [gateway.chat(f"q{i}") for i in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    for answer in answers:
        assert answer.headers["ratelimit-policy"] == '"minute";q=3;w=60, "day";q=1000;w=86400'
    assert [re.match(r'"minute";r=(\d+)', a.headers["ratelimit"]).group(1)  # type: ignore[union-attr]
            for a in answers] == ["2", "1", "0", "0"]
    refused = answers[3]
    assert error_of(refused)["type"] == "rate_limit"
    assert 19 <= int(refused.headers["retry-after"]) <= 20  # one slot every 20 s
    assert refused.headers["cache-control"] == "no-store"
    assert mock.count("POST chat/completions") == 3
    other_team = gateway.chat("not limited", team="marketing")
    assert other_team.status_code == 200 and "ratelimit-policy" not in other_team.headers
    assert 'gateway_rejections_total{reason="quota",team="research"} 1.0' in gateway.metrics()


def test_quota_counts_cache_hits(make_gateway: GatewayFactory, store_url: str, mock: Mock) -> None:
    gateway = make_gateway(store_url, teams=teams_with(requests_per_minute=2))
    assert gateway.chat("same").headers["x-cache"] == "MISS"
    assert gateway.chat("same").headers["x-cache"] == "HIT"
    assert gateway.chat("same").status_code == 429
    assert mock.count("POST chat/completions") == 1


# -- budgets -----------------------------------------------------------------------------------


def budget_gateway(make_gateway: GatewayFactory, store_url: str, credits: float,
                   period: str = "month", **kw: Any) -> RunningGateway:
    return make_gateway(store_url, teams=teams_with(budget={"credits": credits, "period": period}),
                        **kw)


def test_200_concurrent_requests_fit_37(make_gateway: GatewayFactory, store_url: str,
                                        mock: Mock) -> None:
    # The race, not the store's timeout, is under test: 200 requests and their client share
    # one process, whose event loop can be busy longer than the suite's 0.5 s on a loaded
    # machine (a connect that waits that long counts as the store being away: 503).
    gateway = budget_gateway(make_gateway, store_url, 37 * 2,  # gemini costs 2
                             store={"url": store_url, "on_error": "closed", "timeout_s": 5})
    answers = asyncio.run(burst([gateway.url], 200))
    statuses = Counter(a.status_code for a in answers)
    assert statuses == {200: 37, 402: 163}
    assert mock.count("POST chat/completions") == 37
    refused = next(a for a in answers if a.status_code == 402)
    assert error_of(refused)["type"] == "insufficient_credits"
    assert "0 credits remaining, 2 needed" in error_of(refused)["message"]
    assert_ledger_matches(gateway, expected_credits=74, charges=37)


def assert_ledger_matches(gateway: RunningGateway, *, expected_credits: float,
                          charges: int) -> None:
    entries = wait_ledger(gateway, charges)
    assert len(entries) == charges
    assert sum(e["credits"] for e in entries) == expected_credits
    team = gateway.team()
    assert team["spent"] == expected_credits and team["reserved"] == 0
    assert team["budget"]["remaining"] == team["budget"]["credits"] - expected_credits


def test_two_gateway_processes_share_one_budget(redis_server: RedisServer, mock: Mock,
                                                gateway_process: Any) -> None:
    redis_server.cli("FLUSHALL")
    config = base_config(mock.api_url, redis_server.url,
                         teams=teams_with(budget={"credits": 74, "period": "month"}))
    config["logging"] = {"access_log": False}
    first, second = gateway_process(config), gateway_process(config)
    answers = asyncio.run(burst([first.url, second.url], 200))
    assert Counter(a.status_code for a in answers) == {200: 37, 402: 163}
    assert mock.count("POST chat/completions") == 37
    deadline = time.monotonic() + 10  # the settlements land just after the answers
    while True:
        ledger = httpx.get(f"{first.url}/admin/v1/teams/research/ledger?limit=1000",
                           headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["entries"]
        if len(ledger) >= 37 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(ledger) == 37 and sum(e["credits"] for e in ledger) == 74


def test_settle_up_and_down(make_gateway: GatewayFactory, store_url: str) -> None:
    gateway = budget_gateway(make_gateway, store_url, 1000)
    up = gateway.chat("up", model="unpriced-model", extra={"mock_credits": 15})
    down = gateway.chat("down", model="unpriced-model", extra={"mock_credits": 3})
    assert up.status_code == down.status_code == 200
    entries = wait_ledger(gateway, 2)
    assert [(e["reserved"], e["credits"]) for e in entries] == [(10, 15), (10, 3)]
    assert_ledger_matches(gateway, expected_credits=18, charges=2)
    metrics = gateway.metrics()
    assert 'gateway_credits_charged_total{team="research"} 18.0' in metrics
    assert 'gateway_budget_remaining_credits{team="research"} 982.0' in metrics


@pytest.mark.parametrize("failure", ["status_500", "refused", "status_400", "status_429"])
def test_failed_calls_are_refunded(make_gateway: GatewayFactory, store_url: str, mock: Mock,
                                   failure: str) -> None:
    if failure == "refused":
        gateway = budget_gateway(make_gateway, store_url, 100,
                                 upstream_url=f"http://127.0.0.1:{free_port()}/api/v1")
    else:
        gateway = budget_gateway(make_gateway, store_url, 100)
        mock.fault(status=int(failure.split("_")[1]))
    answer = gateway.chat("fails")
    assert answer.status_code >= 400
    (entry,) = wait_ledger(gateway, 1)
    assert (entry["kind"], entry["credits"], entry["reserved"]) == ("refund", 0, 2)
    assert_ledger_matches(gateway, expected_credits=0, charges=1)


def test_budget_period_rolls_over(make_gateway: GatewayFactory, store_url: str) -> None:
    now = [1_795_651_199.0]  # 2026-11-25 23:59:59 UTC
    gateway = budget_gateway(make_gateway, store_url, 4, period="day", clock=lambda: now[0])
    assert [gateway.chat(f"d{i}").status_code for i in range(3)] == [200, 200, 402]
    now[0] += 2  # 2026-11-26 00:00:01
    assert gateway.chat("next day").status_code == 200
    research = gateway.team()
    assert research["period"] == "d2026-11-26" and research["spent"] == 2


def test_model_allow_list_is_403_before_any_charge(make_gateway: GatewayFactory, store_url: str,
                                                   mock: Mock) -> None:
    gateway = make_gateway(store_url, teams=teams_with(models=["flux-2"],
                                                       budget={"credits": 100}))
    denied = gateway.chat(model="kling-3")
    assert denied.status_code == 403
    assert error_of(denied)["type"] == "permission_denied"
    assert gateway.call("POST", "images/generations", json={"model": "flux-2"}).status_code == 200
    assert mock.upstream_calls() == 1
    gateway.drain()
    team = gateway.team()
    assert (team["spent"], team["reserved"]) == (0, 4)  # the task holds its price until it ends


# -- upstream pacing ---------------------------------------------------------------------------


def test_pacing_keeps_the_upstream_under_its_limit(make_gateway: GatewayFactory, store_url: str,
                                                   mock: Mock) -> None:
    mock.configure(rate_limit=5, rate_window_s=1.0)  # the upstream: 5 per second
    gateway = make_gateway(store_url, upstream={"requests_per_minute": 240, "burst": 1,
                                                "queue_timeout_s": 10})
    answers = asyncio.run(burst([gateway.url], 12))
    assert [a.status_code for a in answers] == [200] * 12
    assert mock.stats()["counts"].get("429", 0) == 0


def test_pacing_queue_timeout_gives_429(make_gateway: GatewayFactory, store_url: str,
                                        mock: Mock) -> None:
    gateway = make_gateway(store_url, upstream={"requests_per_minute": 60, "burst": 2,
                                                "queue_timeout_s": 0})
    answers = asyncio.run(burst([gateway.url], 4))
    statuses = Counter(a.status_code for a in answers)
    assert statuses == {200: 2, 429: 2}
    refused = next(a for a in answers if a.status_code == 429)
    assert "upstream allowance" in error_of(refused)["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert mock.count("POST chat/completions") == 2
