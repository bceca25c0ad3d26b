"""Cost attribution below the team: tags kept in the ledger (never in metrics), and usage
reports grouped by team, key, model and tag, from the store's ledger (issue 15; the same reports
from PostgreSQL are in test_ledger.py)."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import yaml

from .conftest import GatewayFactory, Mock, RedisServer, RunningGateway, base_config

ATTRIBUTION = {"tags": {"project": {"pattern": "[a-z0-9-]{1,32}"},
                        "env": {"values": ["dev", "staging", "prod"]}}}


def tagged(gateway: RunningGateway, tags: str, content: str, *, team: str = "research",
           model: str = "gemini", credits: float = 2) -> dict[str, str]:
    answer = gateway.chat(content, team=team, model=model, headers={"X-Gateway-Tags": tags},
                          extra={"mock_credits": credits})
    assert answer.status_code == 200, answer.text
    return dict(answer.headers)


def traffic(gateway: RunningGateway) -> None:
    tagged(gateway, "project=zebra,env=prod", "a", credits=3)
    tagged(gateway, "project=zebra,env=dev", "b", credits=1)
    tagged(gateway, "project=ads", "c", model="flux-2", credits=4)
    tagged(gateway, "env=prod", "d", team="marketing", credits=5)
    gateway.drain()


def test_tags_go_to_the_ledger_and_nowhere_else(make_gateway: GatewayFactory, store_url: str,
                                                mock: Mock) -> None:
    gateway = make_gateway(store_url, attribution=ATTRIBUTION)
    kept = tagged(gateway, "project=zebra, env=prod", "kept")
    assert "x-gateway-tags-ignored" not in kept
    ignored = tagged(gateway, "project=zebra,team=x,env=qa,project=ads", "some ignored")
    assert ignored["x-gateway-tags-ignored"] == (
        "project (duplicate), team (unknown key), env (bad value)")
    gateway.drain()
    entries = gateway.admin("GET", "teams/research/ledger").json()["entries"]
    assert [e.get("tags") for e in entries] == [{"project": "zebra", "env": "prod"}, None]
    assert all("x-gateway-tags" not in r["headers"] for r in mock.requests())  # not upstream
    assert "zebra" not in gateway.metrics()  # never a metric label


def test_usage_by_team_tag_and_model(make_gateway: GatewayFactory, store_url: str) -> None:
    gateway = make_gateway(store_url, attribution=ATTRIBUTION)
    traffic(gateway)
    report = gateway.admin("GET", "usage", params={"by": "team,tag:project,model"}).json()
    assert report["header"] == ["team", "tag:project", "model", "requests", "cached",
                                "refunded", "credits", "saved"]
    assert report["rows"] == [
        ["marketing", "", "gemini", 1, 0, 0, 5, 0],
        ["research", "ads", "flux-2", 1, 0, 0, 4, 0],
        ["research", "zebra", "gemini", 2, 0, 0, 4, 0],
    ]
    by_env = gateway.admin("GET", "usage", params={"by": "tag:env", "period": "month",
                                                   "team": "research"}).json()
    assert [row[1:3] + row[-2:-1] for row in by_env["rows"]] == [["", 1, 4], ["dev", 1, 1],
                                                                ["prod", 1, 3]]
    ancient = gateway.admin("GET", "usage", params={"since": "0847-10-22"})  # found by fuzzing
    assert ancient.status_code == 200 and len(ancient.json()["rows"]) == 2
    for bad in ({"by": "colour"}, {"period": "year"}, {"since": "yesterday"}):
        assert gateway.admin("GET", "usage", params=bad).status_code == 400
    assert gateway.admin("GET", "usage", params={"team": "nobody"}).status_code == 404


def test_the_usage_command_groups_the_stores_ledger(make_gateway: GatewayFactory,
                                                    redis_server: RedisServer,
                                                    mock: Mock, tmp_path: Path) -> None:
    redis_server.cli("FLUSHALL")
    gateway = make_gateway(redis_server.url, attribution=ATTRIBUTION)
    traffic(gateway)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(base_config(mock.api_url, redis_server.url,
                                               attribution=ATTRIBUTION)))
    out = subprocess.run([sys.executable, "-m", "gateway", "usage", "--config", str(path),
                          "--by", "tag:project,model", "--format", "csv"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = list(csv.reader(io.StringIO(out.stdout)))
    assert rows == [["tag:project", "model", "requests", "cached", "refunded", "credits",
                     "saved"],
                    ["", "gemini", "1", "0", "0", "5", "0"],
                    ["ads", "flux-2", "1", "0", "0", "4", "0"],
                    ["zebra", "gemini", "2", "0", "0", "4", "0"]]
