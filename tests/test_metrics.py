"""/metrics: exact values after a known sequence, bounded labels, sums over worker processes."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .conftest import (
    ADMIN_KEY,
    KEYS,
    GatewayFactory,
    Mock,
    RedisServer,
    RunningGateway,
    base_config,
)
from .test_limits import teams_with
from .test_proxy import wait_ledger


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(all_samples: dict, name: str, **labels: str) -> float | None:
    return all_samples.get((name, tuple(sorted(labels.items()))))


def test_exact_values_after_a_known_sequence(make_gateway: GatewayFactory, store_url: str,
                                             mock: Mock) -> None:
    gateway = make_gateway(store_url, teams=teams_with(budget={"credits": 100}))
    assert gateway.chat("a").headers["x-cache"] == "MISS"
    assert gateway.chat("a").headers["x-cache"] == "HIT"
    gateway.client.post("/api/v1/chat/completions", json={"model": "gemini"},
                        headers={"Authorization": "Bearer wrong"})
    mock.fault(status=500)
    assert gateway.chat("b").status_code == 500
    assert gateway.call("GET", "tasks/task_unknown").status_code == 404
    wait_ledger(gateway, 3)

    m = samples(gateway.metrics())
    chat = "chat/completions"
    assert value(m, "gateway_requests_total", team="research", route=chat, status="200",
                 cache="miss") == 1
    assert value(m, "gateway_requests_total", team="research", route=chat, status="200",
                 cache="hit") == 1
    assert value(m, "gateway_requests_total", team="unknown", route=chat, status="401",
                 cache="none") == 1
    assert value(m, "gateway_requests_total", team="research", route=chat, status="500",
                 cache="miss") == 1
    assert value(m, "gateway_requests_total", team="research", route="tasks", status="404",
                 cache="none") == 1
    assert value(m, "gateway_upstream_requests_total", route=chat, status="200") == 1
    assert value(m, "gateway_upstream_requests_total", route=chat, status="500") == 1
    assert value(m, "gateway_cache_events_total", route=chat, result="miss") == 2
    assert value(m, "gateway_cache_events_total", route=chat, result="hit") == 1
    assert value(m, "gateway_cache_events_total", route=chat, result="stored") == 1
    assert value(m, "gateway_credits_charged_total", team="research") == 2
    assert value(m, "gateway_credits_saved_total", team="research") == 2
    assert value(m, "gateway_rejections_total", team="unknown", reason="auth") == 1
    assert value(m, "gateway_rejections_total", team="research", reason="not_found") == 1
    assert value(m, "gateway_budget_remaining_credits", team="research") == 98
    assert value(m, "gateway_budget_limit_credits", team="research") == 100
    assert value(m, "gateway_inflight_requests") == 0
    assert value(m, "gateway_request_duration_seconds_count", route=chat) == 4
    assert value(m, "gateway_request_duration_seconds_count", route="tasks") == 1
    assert value(m, "gateway_upstream_duration_seconds_count", route=chat) == 2
    # every admission asked the store once (the wrong key never reached it); the settlements
    # went in batches, as many as the bookkeeping made
    assert value(m, "gateway_store_duration_seconds_count", operation="admit") == 4
    finish = value(m, "gateway_store_duration_seconds_count", operation="finish")
    assert finish is not None and 1 <= finish <= 3
    assert 0 < value(m, "gateway_store_duration_seconds_sum", operation="admit") < 10
    buckets = {labels for (name, labels) in m if name == "gateway_request_duration_seconds_bucket"}
    bounds = {float(dict(b)["le"]) for b in buckets if dict(b)["route"] == chat}
    assert min(bounds) <= 0.0005 and max(b for b in bounds if b != float("inf")) >= 300


def test_labels_stay_bounded(gateway: RunningGateway, mock: Mock) -> None:
    task = gateway.call("POST", "images/generations", json={"model": "flux-2"}).json()["id"]
    gateway.call("GET", f"tasks/{task}")
    gateway.call("GET", "some/unknown/endpoint-12345")
    gateway.call("POST", "chat/completions", json={"model": "model-nobody-configured-xyz"})
    text = gateway.metrics()
    for leaked in (task, "endpoint-12345", "model-nobody-configured-xyz", KEYS["research"]):
        assert leaked not in text
    routes = {dict(labels).get("route") for (_, labels) in samples(text)} - {None}
    assert routes <= {"chat/completions", "images/generations", "tasks", "other"}


def test_budget_gauge_comes_from_the_shared_store(redis_server: RedisServer, mock: Mock,
                                                  make_gateway: GatewayFactory) -> None:
    redis_server.cli("FLUSHALL")
    teams = teams_with(budget={"credits": 50})
    spender, watcher = make_gateway(redis_server.url, teams=teams), make_gateway(
        redis_server.url, teams=teams)
    spender.chat("spend", extra={"mock_credits": 7})
    wait_ledger(spender, 1)
    # the watcher served nothing, yet reports what the other replica spent
    assert value(samples(watcher.metrics()), "gateway_budget_remaining_credits",
                 team="research") == 43


def test_worker_processes_are_summed(redis_server: RedisServer, mock: Mock,
                                     gateway_process: Any, tmp_path: Any) -> None:
    redis_server.cli("FLUSHALL")
    gateway = gateway_process(base_config(mock.api_url, redis_server.url), workers=2,
                              env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")})
    sent = 0
    pids: set[int] = set()
    while len(pids) < 2 and sent < 400:
        for _ in range(20):  # a new connection each: the kernel spreads them over the workers
            with httpx.Client(timeout=10) as client:
                answer = client.post(f"{gateway.url}/api/v1/chat/completions",
                                     headers={"Authorization": f"Bearer {KEYS['research']}"},
                                     json={"model": "gemini", "messages": [
                                         {"role": "user", "content": f"w{sent}"}]})
                assert answer.status_code == 200
                sent += 1
        time.sleep(0.2)
        pids = {line["pid"] for line in _access_lines(gateway.log())}
    assert len(pids) == 2, "both workers should have served requests"
    for _ in range(4):  # whichever worker answers the scrape, it reports the sum
        text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
        m = samples(text)
        total = sum(v for (name, _), v in m.items() if name == "gateway_requests_total")
        assert total == sent
        assert value(m, "gateway_inflight_requests") == 0


def _access_lines(log: str) -> list[dict[str, Any]]:
    lines = []
    for raw in log.splitlines():
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if line.get("logger") == "gateway.access":
            lines.append(line)
    return lines


def test_access_log_has_one_line_per_request_and_no_secret(redis_server: RedisServer,
                                                           mock: Mock,
                                                           gateway_process: Any) -> None:
    redis_server.cli("FLUSHALL")
    gateway = gateway_process(base_config(mock.api_url, redis_server.url,
                                          teams=teams_with(budget={"credits": 100})))
    headers = {"Authorization": f"Bearer {KEYS['research']}", "X-Request-ID": "trace-1"}
    body = {"model": "gemini", "messages": [{"role": "user", "content": "private words"}]}
    httpx.post(f"{gateway.url}/api/v1/chat/completions", json=body, headers=headers)
    httpx.post(f"{gateway.url}/api/v1/chat/completions", json=body,
               headers={"Authorization": "Bearer not-a-key"})
    httpx.get(f"{gateway.url}/admin/v1/teams", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    deadline = time.monotonic() + 10  # a request's line is written once its answer is sent
    while len(_access_lines(gateway.log())) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    log = gateway.log()
    lines = _access_lines(log)
    assert len(lines) == 2
    first = lines[0]
    assert {k: first[k] for k in ("request_id", "team", "key_id", "route", "model", "status",
                                  "cache", "credits")} == {
        "request_id": "trace-1", "team": "research", "key_id": "research-key",
        "route": "chat/completions", "model": "gemini", "status": 200, "cache": "miss",
        "credits": 2}
    assert first["upstream_ms"] > 0 and first["total_ms"] >= first["upstream_ms"]
    assert lines[1]["status"] == 401 and lines[1]["team"] == "unknown"
    for secret in (*KEYS.values(), ADMIN_KEY, "not-a-key", "private words",
                   base_config("x")["upstream"]["api_key"]):
        assert secret not in log


METRICS_TOKEN = "metrics-token-0123456789abcdef"


def test_metrics_can_require_a_bearer_token(make_gateway: GatewayFactory, mock: Mock) -> None:
    """Regression (issue 12, defect 9): /metrics showed every team's budget to anyone who
    reached the port. With `metrics.bearer_token`, only that token reads it."""
    gateway = make_gateway(metrics={"bearer_token": METRICS_TOKEN})
    assert gateway.chat("counted").status_code == 200
    for authorization in (None, "Bearer nope", f"Bearer {METRICS_TOKEN}x", METRICS_TOKEN,
                          f"Basic {METRICS_TOKEN}", f"Bearer {KEYS['research']}",
                          f"Bearer {ADMIN_KEY}"):
        headers = {"Authorization": authorization} if authorization else {}
        refused = gateway.client.get("/metrics", headers=headers)
        assert refused.status_code == 401, (authorization, refused.text)
        assert refused.json()["error"]["type"] == "authentication_error"
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert "gateway_" not in refused.text
    scraped = gateway.client.get("/metrics",
                                 headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert scraped.status_code == 200
    assert 'gateway_requests_total{cache="miss",route="chat/completions"' in scraped.text
    assert gateway.client.get("/healthz").status_code == 200  # probes stay open


def test_metrics_are_open_without_a_token(make_gateway: GatewayFactory) -> None:
    gateway = make_gateway()
    assert gateway.client.get("/metrics").status_code == 200
