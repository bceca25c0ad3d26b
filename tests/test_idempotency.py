"""Idempotency-Key: replays are never charged twice; conflicts are 409 and 422."""

from __future__ import annotations

import threading

import httpx
import pytest

from .conftest import GatewayFactory, Mock, RedisServer, RunningGateway
from .test_limits import teams_with
from .test_proxy import error_of, wait_ledger

TASK = {"model": "kling-3", "prompt": "waves", "mock_delay_s": 60}


def create(gateway: RunningGateway, key: str, body: dict = TASK,
           team: str = "research") -> httpx.Response:
    return gateway.call("POST", "videos/generations", team=team, json=body,
                        headers={"Idempotency-Key": key})


def test_retry_replays_the_first_answer(make_gateway: GatewayFactory, store_url: str,
                                        mock: Mock) -> None:
    gateway = make_gateway(store_url, teams=teams_with(budget={"credits": 1000}))
    first = create(gateway, "order-42")
    again = create(gateway, "order-42")
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert mock.count("POST videos/generations") == 1
    team = gateway.team()
    assert team["reserved"] == 100  # one task held, not two


def test_same_key_other_body_is_422(gateway: RunningGateway, mock: Mock) -> None:
    create(gateway, "k1")
    other = create(gateway, "k1", {**TASK, "prompt": "other"})
    assert other.status_code == 422
    assert error_of(other)["type"] == "invalid_request"
    assert mock.count("POST videos/generations") == 1


def test_same_key_in_flight_is_409(gateway: RunningGateway, mock: Mock) -> None:
    mock.fault(delay_s=1.0)
    first: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: first.append(create(gateway, "slow")))
    worker.start()
    mock.wait_for("POST videos/generations")
    busy = create(gateway, "slow")
    worker.join()
    assert busy.status_code == 409
    assert error_of(busy)["type"] == "invalid_request"
    assert first[0].status_code == 200
    assert mock.count("POST videos/generations") == 1


def test_keys_are_scoped_per_team(gateway: RunningGateway, mock: Mock) -> None:
    a, b = create(gateway, "shared-key"), create(gateway, "shared-key", team="marketing")
    assert a.status_code == b.status_code == 200
    assert a.json()["id"] != b.json()["id"]
    assert mock.count("POST videos/generations") == 2


def test_a_failed_attempt_can_be_retried(gateway: RunningGateway, mock: Mock) -> None:
    mock.fault(status=503)
    assert create(gateway, "flaky").status_code == 503
    retry = create(gateway, "flaky")
    assert retry.status_code == 200 and "idempotent-replayed" not in retry.headers
    assert mock.count("POST videos/generations") == 2


def test_a_client_error_is_replayed_too(gateway: RunningGateway, mock: Mock) -> None:
    mock.fault(status=400)
    assert create(gateway, "bad-params").status_code == 400
    replay = create(gateway, "bad-params")
    assert replay.status_code == 400 and replay.headers["idempotent-replayed"] == "true"
    assert mock.count("POST videos/generations") == 1


def test_replay_is_not_charged_twice(make_gateway: GatewayFactory, store_url: str) -> None:
    gateway = make_gateway(store_url, teams=teams_with(budget={"credits": 100}))
    body = {"model": "gemini", "messages": [{"role": "user", "content": "x"}]}
    headers = {"Idempotency-Key": "chat-1", "Cache-Control": "no-store"}
    for _ in range(3):
        assert gateway.call("POST", "chat/completions", json=body,
                            headers=headers).status_code == 200
    entries = wait_ledger(gateway, 1)
    assert len(entries) == 1 and entries[0]["credits"] == 2


@pytest.mark.parametrize("key", ["", "a b", "x" * 256, "tab\there", "ünïcode"])
def test_malformed_keys_are_400(gateway: RunningGateway, mock: Mock, key: str) -> None:
    answer = gateway.call("POST", "videos/generations", json=TASK,
                          headers={"Idempotency-Key": key.encode()})
    assert answer.status_code == 400
    assert "Idempotency-Key" in error_of(answer)["message"]
    assert mock.upstream_calls() == 0


def test_answers_are_kept_24_hours(redis_server: RedisServer, make_gateway: GatewayFactory,
                                   mock: Mock) -> None:
    redis_server.cli("FLUSHALL")
    gateway = make_gateway(redis_server.url)
    create(gateway, "kept")
    (key,) = redis_server.cli("--scan", "--pattern", "aio:*:idem:*").split()
    ttl = int(redis_server.cli("PTTL", key))
    assert 86_000_000 < ttl <= 86_400_000
