"""Redis going away mid-run: fail closed or fall back open, and recover on its own."""

from __future__ import annotations

import logging
import time

import pytest

from .conftest import GatewayFactory, Mock, RedisServer
from .test_limits import teams_with
from .test_metrics import samples, value
from .test_proxy import error_of, wait_ledger

# `private_redis` comes first so that it outlives the gateway (fixtures end in reverse order)


def test_closed_answers_503_and_recovers(private_redis: RedisServer, make_gateway: GatewayFactory,
                                         mock: Mock) -> None:
    gateway = make_gateway(private_redis.url, teams=teams_with(requests_per_minute=2))
    assert gateway.chat("before").status_code == 200
    private_redis.stop()
    down = gateway.chat("during")
    assert down.status_code == 503
    assert error_of(down)["type"] == "store_unavailable"
    assert down.headers["retry-after"] == "1"
    assert mock.count("POST chat/completions") == 1  # nothing forwarded blind
    assert gateway.client.get("/healthz").status_code == 200
    assert gateway.client.get("/metrics").status_code == 200
    ready = gateway.client.get("/readyz")
    assert ready.status_code == 503 and error_of(ready)["type"] == "store_unavailable"
    m = samples(gateway.metrics())
    assert value(m, "gateway_store_errors_total", operation="admit") == 1
    # the failed call is timed too: the store's latency shows an outage, not only its errors
    assert value(m, "gateway_store_duration_seconds_count", operation="admit") == 2

    private_redis.start()  # empty: the quota starts again, and is enforced again
    assert [gateway.chat(f"after {i}").status_code for i in range(3)] == [200, 200, 429]
    assert gateway.client.get("/readyz").status_code == 200


def test_hung_redis_charges_nothing(private_redis: RedisServer, make_gateway: GatewayFactory,
                                    mock: Mock) -> None:
    gateway = make_gateway(private_redis.url, teams=teams_with(budget={"credits": 100}))
    assert gateway.chat("before").status_code == 200
    wait_ledger(gateway, 1)
    private_redis.pause()
    try:
        started = time.monotonic()
        answer = gateway.chat("hung")
        assert answer.status_code == 503
        assert time.monotonic() - started < 5  # the store timeout, not forever
    finally:
        private_redis.resume()
    assert mock.count("POST chat/completions") == 1
    time.sleep(0.3)
    entries = wait_ledger(gateway, 1)
    assert len(entries) == 1
    team = gateway.team()
    assert (team["spent"], team["reserved"]) == (2, 0)


def test_open_serves_counts_and_warns_once(private_redis: RedisServer,
                                           make_gateway: GatewayFactory, mock: Mock,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway")
    gateway = make_gateway(private_redis.url, store={"on_error": "open"},
                           teams=teams_with(requests_per_minute=3, budget={"credits": 2}))
    private_redis.stop()
    answers = [gateway.chat(f"open {i}").status_code for i in range(4)]
    assert answers == [200, 200, 200, 429]  # per-process quota, no budget check
    assert mock.count("POST chat/completions") == 3
    assert "gateway_store_fallback_requests_total 4.0" in gateway.metrics()
    warnings = [r for r in caplog.records if "serving without shared limits" in r.getMessage()]
    assert len(warnings) == 1
    ready = gateway.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "degraded"

    private_redis.start()
    gateway.drain()  # what was charged without the shared store reaches it (whenever it lands,
    # a request just after the restart may see the budget spent or not: not asserted)
    assert gateway.chat("budget spent").status_code == 402  # the shared budget applies again
    assert "gateway_store_fallback_requests_total 4.0" in gateway.metrics()  # served by it
