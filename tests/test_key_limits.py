"""Limits and budgets per key, inside the team's: a request must fit both, checked and reserved
in one store call, so two keys cannot overspend their team, nor one key itself (issue 15)."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.auth import hash_key

from .conftest import KEYS, GatewayFactory, Mock, RunningGateway
from .test_jwt import Clock as JwtClock
from .test_jwt import IdP, call, claims, ec_key, idp, jwt_section, rsa_key, sign
from .test_proxy import error_of, wait_ledger

__all__ = ["ec_key", "idp", "rsa_key"]  # the IdP's fixtures, used here too

CI_KEY = "aiogw_research_ci_key_0123456789abcdef"
BATCH_KEY = "aiogw_research_batch_key_0123456789abcd"
ALL_KEYS = {"research-key": KEYS["research"], "research-ci": CI_KEY, "research-batch": BATCH_KEY}


def teams(**research: Any) -> dict[str, Any]:
    """research: its usual key, plus `research-ci` and `research-batch` with limits of their own
    (given as `ci={...}`, `batch={...}`)."""
    ci, batch = research.pop("ci", {}), research.pop("batch", {})
    return {
        "research": {"keys": [
            {"id": "research-key", "sha256": hash_key(KEYS["research"])},
            {"id": "research-ci", "sha256": hash_key(CI_KEY), **ci},
            {"id": "research-batch", "sha256": hash_key(BATCH_KEY), **batch},
        ], **research},
        "marketing": {"keys": [{"id": "marketing-key", "sha256": hash_key(KEYS["marketing"])}]},
    }


def chat(gateway: RunningGateway, key_id: str, content: str, **extra: Any) -> httpx.Response:
    return gateway.client.post(
        "/api/v1/chat/completions",
        json={"model": "gemini", "messages": [{"role": "user", "content": content}], **extra},
        headers={"Authorization": f"Bearer {ALL_KEYS[key_id]}"})


def test_a_key_quota_inside_the_teams(make_gateway: GatewayFactory, store_url: str,
                                      mock: Mock) -> None:
    gateway = make_gateway(store_url, teams=teams(requests_per_minute=100,
                                                  ci={"requests_per_minute": 2}))
    first = chat(gateway, "research-ci", "a")
    assert first.headers["ratelimit-policy"] == '"minute";q=100;w=60, "key-minute";q=2;w=60'
    assert first.headers["ratelimit"] == '"minute";r=99;t=1, "key-minute";r=1;t=30'
    assert chat(gateway, "research-ci", "b").status_code == 200
    refused = chat(gateway, "research-ci", "c")
    assert refused.status_code == 429 and error_of(refused)["type"] == "rate_limit"
    assert error_of(refused)["message"] == (
        "Key 'research-ci' quota exceeded (2 requests per minute).")
    assert int(refused.headers["retry-after"]) >= 1
    # the team's other keys are not held back by it, and the team counted only what it let in
    other = chat(gateway, "research-key", "d")
    assert other.status_code == 200 and other.headers["ratelimit"] == '"minute";r=97;t=2'
    assert mock.count("POST chat/completions") == 3
    assert 'gateway_rejections_total{reason="key_quota",team="research"} 1.0' in gateway.metrics()


def test_the_teams_quota_still_binds_a_key_with_room(make_gateway: GatewayFactory,
                                                      store_url: str) -> None:
    gateway = make_gateway(store_url, teams=teams(requests_per_minute=2,
                                                  ci={"requests_per_minute": 50}))
    assert [chat(gateway, "research-ci", f"q{i}").status_code for i in range(3)] == [200, 200,
                                                                                    429]
    refused = chat(gateway, "research-ci", "again")
    assert error_of(refused)["message"] == "Team quota exceeded (2 requests per minute)."


def test_a_key_budget_inside_the_teams(make_gateway: GatewayFactory, store_url: str) -> None:
    gateway = make_gateway(store_url, teams=teams(budget={"credits": 100},
                                                  ci={"budget": {"credits": 5, "period": "day"}}))
    assert [chat(gateway, "research-ci", f"b{i}").status_code for i in range(2)] == [200, 200]
    refused = chat(gateway, "research-ci", "b2")  # 4 of its 5 spent; gemini reserves 2
    assert refused.status_code == 402 and error_of(refused)["type"] == "insufficient_credits"
    assert error_of(refused)["message"] == (
        "Key 'research-ci' budget exhausted for this day: 1 credits remaining, 2 needed.")
    assert chat(gateway, "research-key", "still fine").status_code == 200
    gateway.drain()
    assert gateway.team()["spent"] == 6
    keys = {k["id"]: k for k in gateway.admin("GET", "keys").json()["keys"]}
    assert keys["research-ci"]["budget"] == {"credits": 5, "period": "day", "spent": 4,
                                             "reserved": 0, "remaining": 1}
    assert keys["research-key"]["budget"] is None


def test_two_keys_never_overspend_their_team_nor_themselves(make_gateway: GatewayFactory,
                                                            store_url: str, mock: Mock) -> None:
    """100 requests at once over two keys: the team fits 15 (30 credits at 2 each), and each
    key at most its own 10 (20 credits), whichever requests win."""
    gateway = make_gateway(store_url, teams=teams(
        budget={"credits": 30},
        ci={"budget": {"credits": 20}}, batch={"budget": {"credits": 20}}))

    async def storm() -> list[tuple[str, int]]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60,
                                     limits=httpx.Limits(max_connections=100)) as client:
            async def one(i: int) -> tuple[str, int]:
                key_id = ("research-ci", "research-batch")[i % 2]
                answer = await client.post(
                    "/api/v1/chat/completions",
                    json={"model": "gemini", "messages": [{"role": "user", "content": f"{i}"}]},
                    headers={"Authorization": f"Bearer {ALL_KEYS[key_id]}"})
                return key_id, answer.status_code
            return await asyncio.gather(*(one(i) for i in range(100)))

    answers = asyncio.run(storm())
    admitted = Counter(key_id for key_id, status in answers if status == 200)
    assert sum(admitted.values()) == 15, answers
    assert max(admitted.values()) <= 10
    assert {status for _, status in answers} == {200, 402}
    entries = wait_ledger(gateway, 15)
    assert sum(e["credits"] for e in entries) == 30
    spent = Counter()
    for e in entries:
        spent[e["key_id"]] += e["credits"]
    assert all(credits <= 20 for credits in spent.values())
    assert mock.count("POST chat/completions") == 15


def test_a_token_naming_a_key_gets_its_limits(make_gateway: GatewayFactory, store_url: str,
                                              idp: IdP, rsa_key: rsa.RSAPrivateKey) -> None:
    """A JWT whose key claim names a configured key of its team is held to that key's limits:
    a token and a static key go through the same path."""
    clock = JwtClock()
    gateway = make_gateway(store_url, clock=clock, auth=jwt_section(idp.url),
                           teams=teams(ci={"requests_per_minute": 1}))
    token = sign(rsa_key, "rsa-1", claims(clock, sub="research-ci"))
    assert call(gateway, token, "first").status_code == 200
    refused = call(gateway, token, "second")
    assert refused.status_code == 429
    assert "Key 'research-ci' quota" in error_of(refused)["message"]
    assert chat(gateway, "research-ci", "the static key shares it").status_code == 429
