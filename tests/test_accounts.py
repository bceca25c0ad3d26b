"""Several upstream accounts and the fair queue, end to end: real gateways (and `aio-gateway
serve` processes sharing one Redis), the mock upstream with one key per account."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any

import httpx
import pytest

from .conftest import (
    KEYS,
    GatewayFactory,
    GatewayProcess,
    Mock,
    RedisServer,
    RunningGateway,
    base_config,
    eventually,
    team_config,
)
from .test_limits import burst
from .test_proxy import error_of, wait_ledger

KEY_A = "aio_test_account_A_0123456789abcdef"
KEY_B = "aio_test_account_B_fedcba9876543210"
ACCOUNT_OF = {f"Bearer {KEY_A}": "a", f"Bearer {KEY_B}": "b"}


def two_accounts(per_minute: int | None = None, **upstream: Any) -> dict[str, Any]:
    """The `upstream` section: accounts `a` and `b` (instead of the one api_key)."""
    return {"api_key": "", "accounts": [
        {"id": "a", "api_key": KEY_A, "requests_per_minute": per_minute},
        {"id": "b", "api_key": KEY_B, "requests_per_minute": per_minute},
    ], **upstream}


@pytest.fixture
def accounts_mock(mock: Mock) -> Mock:
    mock.configure(other_keys=[KEY_A, KEY_B])
    return mock


def accounts_seen(mock: Mock, path: str | None = None) -> list[str]:
    """The account of each request the mock received (in order), for `path` if given."""
    return [ACCOUNT_OF[r["headers"]["authorization"]] for r in mock.requests()
            if path is None or r["path"] == path]


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one series in a /metrics page (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- accounts ------------------------------------------------------------------------------------


def test_requests_spread_over_the_accounts_within_each_limit(
        make_gateway: GatewayFactory, store_url: str, accounts_mock: Mock) -> None:
    """20 requests at once, two accounts at 240 a minute each, the upstream allowing each key
    5 a second: spread over both, and no 429 from the upstream."""
    accounts_mock.configure(rate_limit=5, rate_window_s=1.0)
    gateway = make_gateway(store_url, upstream=two_accounts(240, queue_timeout_s=30))
    answers = asyncio.run(burst([gateway.url], 20))
    assert [a.status_code for a in answers] == [200] * 20
    assert accounts_mock.stats()["counts"].get("429", 0) == 0
    assert Counter(accounts_seen(accounts_mock)) == {"a": 10, "b": 10}
    text = gateway.metrics()
    for name in ("a", "b"):
        assert metric(text, "gateway_upstream_slots_total", account=name, team="research") == 10
        assert metric(text, "gateway_upstream_account_requests_total", account=name,
                      status="200") == 10
        assert metric(text, "gateway_upstream_account_up", account=name) == 1
        assert metric(text, "gateway_upstream_account_limit", account=name) == 240
        assert metric(text, "gateway_upstream_account_slots_free", account=name) == 230
    assert metric(text, "gateway_upstream_wait_seconds_count", team="research") == 20


def test_a_402_moves_the_traffic_to_the_other_account(
        make_gateway: GatewayFactory, store_url: str, accounts_mock: Mock,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    gateway = make_gateway(store_url, upstream=two_accounts(),
                           teams={"research": team_config("research", budget={"credits": 100}),
                                  "marketing": team_config("marketing")})
    accounts_mock.fault(status=402, key=KEY_A, count=100)  # account a has no credits left
    first = gateway.chat("first")
    assert first.status_code == 200  # refused by a, answered through b, charged once
    assert accounts_seen(accounts_mock) == ["a", "b"]
    assert [gateway.chat(f"next {i}").status_code for i in range(5)] == [200] * 5
    assert accounts_seen(accounts_mock)[2:] == ["b"] * 5  # a is out of rotation
    wait_ledger(gateway, 6)
    assert (gateway.team()["spent"], gateway.team()["reserved"]) == (12, 0)
    text = gateway.metrics()
    assert metric(text, "gateway_upstream_account_up", account="a") == 0
    assert metric(text, "gateway_upstream_account_up", account="b") == 1
    assert metric(text, "gateway_upstream_account_requests_total", account="a",
                  status="402") == 1
    said = [r for r in caplog.records if "out of rotation" in r.getMessage()]
    assert len(said) == 1 and said[0].fields["account"] == "a"  # type: ignore[attr-defined]

    accounts_mock.fault(status=402, key=KEY_B, count=100)  # and now b: none is left
    refused = gateway.chat("none left")
    assert refused.status_code == 503
    assert error_of(refused)["type"] == "upstream_unavailable"
    assert "needs attention" in str(error_of(refused)["message"])
    logged = "\n".join(r.getMessage() + str(getattr(r, "fields", "")) for r in caplog.records)
    for secret in (KEY_A, KEY_B):
        assert secret not in text and secret not in logged and secret not in refused.text


def test_an_account_out_of_rotation_is_back_when_a_request_through_it_succeeds(
        make_gateway: GatewayFactory, store_url: str, accounts_mock: Mock) -> None:
    """With one account, a 402 still reaches the client as today; the next request tries the
    account again (nothing else is left), and its success puts the account back."""
    gateway = make_gateway(store_url, upstream={
        "api_key": "", "accounts": [{"id": "a", "api_key": KEY_A, "requests_per_minute": 600}]})
    accounts_mock.fault(status=402, key=KEY_A)
    assert gateway.chat("refused").status_code == 503
    assert metric(gateway.metrics(), "gateway_upstream_account_up", account="a") == 0
    assert gateway.chat("back").status_code == 200
    assert metric(gateway.metrics(), "gateway_upstream_account_up", account="a") == 1


def create_task(gateway: RunningGateway, **body: Any) -> str:
    answer = gateway.call("POST", "images/generations",
                          json={"model": "flux-2", "prompt": "x", **body})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["id"])


def test_a_task_created_on_an_account_is_polled_with_its_key(
        make_gateway: GatewayFactory, store_url: str, accounts_mock: Mock) -> None:
    """Account a refuses once (and is back at once): the task is created through b. Its polls
    go through b, though a, free for longer, would be chosen for anything else."""
    gateway = make_gateway(store_url, upstream=two_accounts(account_down_s=0))
    accounts_mock.fault(status=402, key=KEY_A)
    task_id = create_task(gateway)
    assert accounts_seen(accounts_mock) == ["a", "b"]
    polled = gateway.call("GET", f"tasks/{task_id}", headers={"Cache-Control": "no-cache"})
    assert polled.status_code == 200 and polled.json()["id"] == task_id
    assert accounts_seen(accounts_mock, f"tasks/{task_id}") == ["b"]
    assert gateway.chat("anything else").status_code == 200
    assert accounts_seen(accounts_mock)[-1] == "a"


def test_the_reconciler_polls_a_task_through_its_account(
        make_gateway: GatewayFactory, store_url: str, accounts_mock: Mock) -> None:
    gateway = make_gateway(store_url, upstream=two_accounts(account_down_s=0),
                           teams={"research": team_config("research", budget={"credits": 100}),
                                  "marketing": team_config("marketing")},
                           reconcile_interval_s=0.2, task_check_s=0.3)
    accounts_mock.fault(status=402, key=KEY_A)
    task_id = create_task(gateway, mock_delay_s=0.1, mock_credits=3)
    (entry,) = wait_ledger(gateway, 1)
    assert (entry["kind"], entry["credits"]) == ("charge", 3)  # settled by the reconciler
    assert accounts_seen(accounts_mock, f"tasks/{task_id}") == ["b"]


def test_an_account_kept_for_one_team_serves_only_that_team(
        make_gateway: GatewayFactory, store_url: str, accounts_mock: Mock) -> None:
    upstream = two_accounts()
    upstream["accounts"][1]["teams"] = ["marketing"]
    gateway = make_gateway(store_url, upstream=upstream)
    assert [gateway.chat(f"r{i}").status_code for i in range(4)] == [200] * 4
    assert [gateway.chat(f"m{i}", team="marketing").status_code for i in range(4)] == [200] * 4
    seen = accounts_seen(accounts_mock)
    assert seen[:4] == ["a"] * 4 and Counter(seen[4:]) == {"a": 2, "b": 2}


def test_credits_spent_through_an_account_count_down_its_balance(
        make_gateway: GatewayFactory, store_url: str, accounts_mock: Mock) -> None:
    upstream = two_accounts()
    upstream["accounts"][0]["credits"] = 1000
    gateway = make_gateway(store_url, upstream=upstream)
    assert gateway.chat("one", extra={"mock_credits": 7}).status_code == 200
    gateway.drain()
    runtime = gateway.runtime
    gateway.run(runtime.health.flush(), 10)
    text = gateway.metrics()
    assert metric(text, "gateway_upstream_account_balance_remaining", account="a") == 993
    assert metric(text, "gateway_upstream_account_balance", account="a") == 1000
    assert metric(text, "gateway_upstream_account_spent_total", account="a") == 7


# -- the admin view ------------------------------------------------------------------------------


def admin_accounts(gateway: RunningGateway) -> dict[str, dict[str, Any]]:
    answer = gateway.admin("GET", "accounts")
    assert answer.status_code == 200, answer.text
    for secret in (KEY_A, KEY_B):
        assert secret not in answer.text
    return {a["id"]: a for a in answer.json()["accounts"]}


def test_the_admin_view_lists_each_account_with_its_limits_use_and_balance(
        make_gateway: GatewayFactory, store_url: str, accounts_mock: Mock) -> None:
    upstream = two_accounts(240)
    upstream["accounts"][0]["credits"] = 1000
    upstream["accounts"][1].update(burst=3, teams=["marketing"])
    gateway = make_gateway(store_url, upstream=upstream)
    minute = time.time() // 60
    assert [gateway.chat(f"m{i}", team="marketing", extra={"mock_credits": 1}).status_code
            for i in range(4)] == [200] * 4
    assert gateway.chat("r", extra={"mock_credits": 7}).status_code == 200  # through a
    gateway.drain()
    runtime = gateway.runtime
    gateway.run(runtime.health.flush(), 10)
    used = Counter(accounts_seen(accounts_mock))
    assert used["a"] >= 1 and used["b"] >= 1 and sum(used.values()) == 5
    accounts = admin_accounts(gateway)
    slots = {account: accounts[account].pop("slots_used_last_minute") for account in "ab"}
    if time.time() // 60 == minute:
        assert slots == {"a": used["a"], "b": used["b"]}
    else:  # the sliding window counts the minute before only for the part of it still inside
        assert 0 <= slots["a"] <= used["a"] and 0 <= slots["b"] <= used["b"], (slots, used)
    assert accounts == {
        "a": {"id": "a", "in_rotation": True, "out_of_rotation": None,
              "requests_per_minute": 240, "burst": 1, "teams": None,
              "credits": {"balance": 1000, "remaining": 1000 - 7 - (used["a"] - 1)}},
        "b": {"id": "b", "in_rotation": True, "out_of_rotation": None,
              "requests_per_minute": 240, "burst": 3, "teams": ["marketing"],
              "credits": None},
    }


def test_the_admin_view_shows_an_account_out_of_rotation_until_when_and_why(
        make_gateway: GatewayFactory, store_url: str, accounts_mock: Mock) -> None:
    gateway = make_gateway(store_url, upstream=two_accounts(account_down_s=600))
    accounts_mock.fault(status=402, key=KEY_A, count=100)
    assert gateway.chat("moved to b").status_code == 200
    accounts = admin_accounts(gateway)
    assert accounts["b"]["in_rotation"] and accounts["b"]["out_of_rotation"] is None
    out = accounts["a"]["out_of_rotation"]
    assert not accounts["a"]["in_rotation"]
    assert (out["status"], out["reason"]) == (402, "its credits are exhausted")
    until = datetime.fromisoformat(out["until"]).timestamp()
    assert time.time() + 590 < until <= time.time() + 600

    accounts_mock.fault(status=401, key=KEY_B, count=100)
    assert gateway.chat("none left").status_code == 503
    out = admin_accounts(gateway)["b"]["out_of_rotation"]
    assert (out["status"], out["reason"]) == (401, "the upstream refused its key")


def test_the_admin_view_of_the_one_key(gateway: RunningGateway) -> None:
    """`upstream.api_key` is one account, `default`; unpaced and alone, it takes no slots."""
    assert gateway.chat("one").status_code == 200
    (account,) = gateway.admin("GET", "accounts").json()["accounts"]
    assert account == {"id": "default", "in_rotation": True, "out_of_rotation": None,
                       "requests_per_minute": None, "burst": 1, "teams": None,
                       "slots_used_last_minute": None, "credits": None}


# -- waiting for a slot --------------------------------------------------------------------------


def test_a_request_that_cannot_wait_gets_429_with_the_upstreams_rate_limit_headers(
        make_gateway: GatewayFactory, store_url: str, mock: Mock) -> None:
    gateway = make_gateway(store_url, upstream={"requests_per_minute": 60, "queue_timeout_s": 0})
    answers = asyncio.run(burst([gateway.url], 2))
    assert sorted(a.status_code for a in answers) == [200, 429]
    refused = next(a for a in answers if a.status_code == 429)
    assert "upstream allowance" in str(error_of(refused)["message"])
    assert refused.headers["retry-after"] == "1"  # the next slot, a second away
    assert refused.headers.get_list("ratelimit-policy") == ['"upstream";q=60;w=60']
    assert refused.headers.get_list("ratelimit") == ['"upstream";r=0;t=1']
    assert metric(gateway.metrics(), "gateway_rejections_total", team="research",
                  reason="pace") == 1


def test_a_waiting_request_whose_turn_moves_too_late_gives_up_unanswered(
        make_gateway: GatewayFactory, store_url: str, mock: Mock) -> None:
    """Queued for the next slot, a second away; then two retries outside the queue take the
    next slots: its turn comes after its queue timeout, so it answers 429 at once, refunded."""
    gateway = make_gateway(store_url, upstream={"requests_per_minute": 60,
                                                "queue_timeout_s": 1.5},
                           teams={"research": team_config("research", budget={"credits": 10}),
                                  "marketing": team_config("marketing")})
    assert gateway.chat("first").status_code == 200
    runtime = gateway.runtime
    with ThreadPoolExecutor(1) as pool:
        waiting: Future[httpx.Response] = pool.submit(gateway.chat, "second")
        eventually(lambda: metric(gateway.metrics(), "gateway_upstream_waiting",
                                  team="research") == 1, "the second request never waited")
        pace = runtime.policy.accounts.paces[0]
        for _ in range(2):
            booked, _ = asyncio.run_coroutine_threadsafe(
                runtime.store.pace(pace, 10_000.0), runtime.loop).result(10)
            assert booked
        refused = waiting.result(20)
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers.get_list("ratelimit") == [
        f'"upstream";r=0;t={refused.headers["retry-after"]}']
    assert mock.count("POST chat/completions") == 1
    gateway.drain()
    assert (gateway.team()["spent"], gateway.team()["reserved"]) == (2, 0)


def test_a_team_cannot_keep_more_than_max_waiting_requests_waiting(
        make_gateway: GatewayFactory, store_url: str, mock: Mock) -> None:
    gateway = make_gateway(store_url, upstream={"requests_per_minute": 60, "queue_timeout_s": 5},
                           teams={"research": team_config("research", max_waiting=1),
                                  "marketing": team_config("marketing")})
    assert gateway.chat("first").status_code == 200
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(gateway.chat, "second")
        eventually(lambda: metric(gateway.metrics(), "gateway_upstream_waiting",
                                  team="research") == 1, "the second request never waited")
        full = gateway.chat("third")
        assert full.status_code == 429
        assert "waiting" in str(error_of(full)["message"])
        assert waiting.result(20).status_code == 200  # the one waiting got its slot
    assert metric(gateway.metrics(), "gateway_rejections_total", team="research",
                  reason="waiting") == 1


# -- the fair share, through the gateway ---------------------------------------------------------


async def flood(urls: list[str], counts: dict[str, int]) -> list[httpx.Response]:
    """Every team's requests at once, spread over `urls`; each body names its team."""
    limits = httpx.Limits(max_connections=sum(counts.values()))
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        calls = [client.post(f"{urls[i % len(urls)]}/api/v1/chat/completions",
                             headers={"Authorization": f"Bearer {KEYS[team]}"},
                             json={"model": "gemini",
                                   "messages": [{"role": "user", "content": f"{team} {i}"}]})
                 for team, n in counts.items() for i in range(n)]
        order = [calls[i::max(counts.values())] for i in range(max(counts.values()))]
        return await asyncio.gather(*(c for group in order for c in group))


def teams_of_upstream_calls(mock: Mock) -> list[str]:
    return [r["body"].split('"content":"')[1].split(" ")[0] for r in mock.requests()
            if r["path"] == "chat/completions"]


def weighted(**sections: Any) -> dict[str, Any]:
    teams = {"research": team_config("research", upstream_weight=3, max_waiting=100),
             "marketing": team_config("marketing", upstream_weight=1, max_waiting=100)}
    return {"teams": teams, "upstream": {"requests_per_minute": 1200, "queue_timeout_s": 60},
            **sections}


def assert_split_by_weight(mock: Mock) -> None:
    """While both teams had requests waiting (slots 10 to 70 of 120: research's 60 run out
    after about 80), research got three slots for each of marketing's."""
    teams = teams_of_upstream_calls(mock)
    assert Counter(teams) == {"research": 60, "marketing": 60}
    share = Counter(teams[10:70])["research"] / 60
    assert share == pytest.approx(0.75, abs=0.1), teams


def test_teams_share_the_upstream_by_weight(make_gateway: GatewayFactory, store_url: str,
                                            mock: Mock) -> None:
    gateway = make_gateway(store_url, **weighted())
    answers = asyncio.run(flood([gateway.url], {"research": 60, "marketing": 60}))
    assert {a.status_code for a in answers} == {200}
    assert_split_by_weight(mock)


def test_two_gateway_processes_sharing_redis_give_the_same_split(
        redis_server: RedisServer, mock: Mock,
        gateway_process: Callable[..., GatewayProcess]) -> None:
    redis_server.cli("FLUSHALL")
    config = base_config(mock.api_url, redis_server.url, **weighted())
    first, second = gateway_process(config), gateway_process(config)
    answers = asyncio.run(flood([first.url, second.url], {"research": 60, "marketing": 60}))
    assert {a.status_code for a in answers} == {200}
    assert_split_by_weight(mock)
