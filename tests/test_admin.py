"""The operators' API, key revocation across replicas, and the usage export."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from .conftest import (
    ADMIN_KEY,
    KEYS,
    ROOT,
    GatewayFactory,
    Mock,
    RedisServer,
    RunningGateway,
    base_config,
)
from .test_limits import teams_with
from .test_proxy import error_of, wait_ledger


@pytest.mark.parametrize(("authorization", "status", "kind"), [
    (None, 401, "authentication_error"),
    ("Bearer nope", 401, "authentication_error"),
    (f"Bearer {KEYS['research']}", 403, "permission_denied"),
])
@pytest.mark.parametrize(("method", "path"), [
    ("GET", "teams"), ("GET", "teams/research/ledger"), ("GET", "keys"),
    ("POST", "keys/research-key/revoke"), ("DELETE", "cache"), ("POST", "reload"),
    ("GET", "accounts"),
])
def test_admin_needs_an_admin_key(gateway: RunningGateway, authorization: str | None,
                                  status: int, kind: str, method: str, path: str) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    answer = gateway.client.request(method, f"/admin/v1/{path}", headers=headers)
    assert answer.status_code == status
    assert error_of(answer)["type"] == kind


def test_teams_show_quota_budget_and_spending(make_gateway: GatewayFactory,
                                              store_url: str) -> None:
    gateway = make_gateway(store_url, teams=teams_with(
        requests_per_minute=60, requests_per_day=1000, models=["gemini"],
        budget={"credits": 20, "period": "week"}))
    gateway.chat("x", extra={"mock_credits": 3})
    wait_ledger(gateway, 1)
    teams = {t["team"]: t for t in gateway.admin("GET", "teams").json()["teams"]}
    research = teams["research"]
    assert research["quota"] == {"minute": 60, "day": 1000}
    assert research["models"] == ["gemini"]
    assert research["budget"]["credits"] == 20 and research["budget"]["period"] == "week"
    assert research["budget"]["remaining"] == 17 and research["spent"] == 3
    assert research["period"].startswith("w")
    assert teams["marketing"]["budget"] is None and teams["marketing"]["spent"] == 0


def test_ledger_pages(gateway: RunningGateway) -> None:
    for i in range(5):
        gateway.chat(f"page {i}")
    wait_ledger(gateway, 5)
    first = gateway.admin("GET", "teams/research/ledger?limit=2").json()
    assert len(first["entries"]) == 2 and first["next"] is not None
    second = gateway.admin("GET", f"teams/research/ledger?limit=10&after={first['next']}").json()
    assert len(second["entries"]) == 3 and second["next"] is None
    ids = [e["id"] for e in first["entries"] + second["entries"]]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    entry = second["entries"][0]
    assert {"team", "key_id", "model", "route", "credits", "cached", "request_id",
            "time_ms"} <= set(entry)
    assert gateway.admin("GET", "teams/nobody/ledger").status_code == 404
    assert gateway.admin("GET", "teams/research/ledger?limit=x").status_code == 400
    assert gateway.admin("GET", "teams/research/ledger?after=zz").status_code == 400


@pytest.mark.parametrize("limit", ["5%0A", "%205", "1_0", "%D9%A5", "+5", "5.0", ""])
def test_ledger_limit_is_a_plain_number(gateway: RunningGateway, limit: str) -> None:
    """Regression (issue 12, defect 3): `int()` took a trailing newline, spaces, underscores
    and non-ASCII digits; only ASCII digits (and a minus sign) cross the boundary now."""
    answer = gateway.admin("GET", f"teams/research/ledger?limit={limit}")
    assert answer.status_code == 400, answer.text
    assert error_of(answer)["type"] == "invalid_request"
    for clamped in ("0", "-3", "5000"):  # out of range is brought into 1..1000, as documented
        assert gateway.admin("GET", f"teams/research/ledger?limit={clamped}").status_code == 200


def test_revoking_a_key(gateway: RunningGateway, mock: Mock) -> None:
    assert gateway.chat("before").status_code == 200
    revoked = gateway.admin("POST", "keys/research-key/revoke")
    assert revoked.json() == {"id": "research-key", "team": "research", "revoked": True}
    refused = gateway.chat("after")
    assert refused.status_code == 401 and error_of(refused)["type"] == "authentication_error"
    keys = {k["id"]: k for k in gateway.admin("GET", "keys").json()["keys"]}
    assert keys["research-key"]["revoked"] and not keys["marketing-key"]["revoked"]
    assert gateway.chat("other team", team="marketing").status_code == 200
    gateway.admin("DELETE", "keys/research-key/revoke")
    assert gateway.chat("restored").status_code == 200
    assert gateway.admin("POST", "keys/nobody/revoke").status_code == 404
    assert mock.count("POST chat/completions") == 3


def test_revocation_reaches_every_replica_at_once(redis_server: RedisServer, mock: Mock,
                                                  gateway_process: Any) -> None:
    redis_server.cli("FLUSHALL")
    config = base_config(mock.api_url, redis_server.url)
    first, second = gateway_process(config), gateway_process(config)
    headers = {"Authorization": f"Bearer {KEYS['research']}"}
    body = {"model": "gemini", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{second.url}/api/v1/chat/completions", json=body,
                      headers=headers).status_code == 200
    httpx.post(f"{first.url}/admin/v1/keys/research-key/revoke",
               headers={"Authorization": f"Bearer {ADMIN_KEY}"}).raise_for_status()
    started = time.monotonic()
    refused = httpx.post(f"{second.url}/api/v1/chat/completions", json=body, headers=headers)
    assert refused.status_code == 401
    assert time.monotonic() - started < 1.0


# -- aio-gateway usage -----------------------------------------------------------------------


def usage(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "usage", "--config", str(config_path),
                           *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_usage_export_matches_the_requests(redis_server: RedisServer, mock: Mock,
                                           make_gateway: GatewayFactory, tmp_path: Path) -> None:
    redis_server.cli("FLUSHALL")
    teams = teams_with(budget={"credits": 1000})
    gateway = make_gateway(redis_server.url, teams=teams)
    for i in range(3):
        gateway.chat(f"u{i}", extra={"mock_credits": i + 1})
    gateway.chat("u0", extra={"mock_credits": 1})  # a cache hit: 0 credits, 1 saved
    mock.fault(status=500)
    gateway.chat("refunded")
    gateway.chat("m", team="marketing")
    wait_ledger(gateway, 5)
    wait_ledger(gateway, 1, team="marketing")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(base_config(mock.api_url, redis_server.url,
                                                      teams=teams)))

    out = usage(config_path, "--format", "csv", "--team", "research")
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert len(rows) == 5
    assert [(r["kind"], r["credits"], r["cached"]) for r in rows] == [
        ("charge", "1", "False"), ("charge", "2", "False"), ("charge", "3", "False"),
        ("charge", "0", "True"), ("refund", "0", "False")]
    assert all(r["team"] == "research" and r["key_id"] == "research-key" for r in rows)

    table = usage(config_path)
    assert table.returncode == 0
    lines = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:]}
    # requests, cached, refunded, credits, saved
    assert lines["research"][1:] == ["5", "1", "1", "6", "1"]
    spent = gateway.team()["spent"]
    assert float(lines["research"][4]) == spent
    assert lines["marketing"][1] == "1"

    future = usage(config_path, "--format", "csv", "--since", "2999-01-01")
    assert future.returncode == 0 and len(future.stdout.splitlines()) == 1  # the header only
    assert usage(config_path, "--since", "yesterday").returncode == 2


def test_usage_on_the_memory_store_says_where_to_look(tmp_path: Path) -> None:
    config_path = tmp_path / "config.yaml"
    config_path.write_text("upstream: {api_key: x}\n")
    out = usage(config_path)
    assert out.returncode == 1 and "/admin/v1/teams/{team}/ledger" in out.stderr
