"""Hot reload: new limits apply at once, in-flight requests finish, usage is kept."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from .conftest import ADMIN_KEY, KEYS, Mock, RedisServer, base_config
from .test_limits import teams_with


def chat(url: str, content: str, team: str = "research") -> httpx.Response:
    return httpx.post(f"{url}/api/v1/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {KEYS[team]}"},
                      json={"model": "gemini", "messages": [{"role": "user", "content": content}]})


def test_sighup_applies_new_limits_without_dropping_requests(
        redis_server: RedisServer, mock: Mock, gateway_process: Any) -> None:
    redis_server.cli("FLUSHALL")
    config = base_config(mock.api_url, redis_server.url,
                         teams=teams_with(requests_per_minute=2, budget={"credits": 100}))
    gateway = gateway_process(config)
    assert [chat(gateway.url, f"a{i}").status_code for i in range(3)] == [200, 200, 429]

    mock.fault(delay_s=1.5)  # the next upstream call is slow: it is in flight during the reload
    slow: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: slow.append(chat(gateway.url, "slow", "marketing")))
    worker.start()
    time.sleep(0.3)
    config["teams"]["research"]["requests_per_minute"] = 100
    Path(gateway.config_path).write_text(yaml.safe_dump(config))
    gateway.process.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert chat(gateway.url, "after reload").status_code == 200
    worker.join()
    assert slow[0].status_code == 200
    assert gateway.process.poll() is None

    teams = httpx.get(f"{gateway.url}/admin/v1/teams",
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["teams"]
    research = next(t for t in teams if t["team"] == "research")
    assert research["quota"] == {"minute": 100}
    assert research["spent"] == 6  # usage from before the reload is kept
    assert "config reloaded" in gateway.log()


def test_admin_reload_and_a_bad_file(redis_server: RedisServer, mock: Mock,
                                     gateway_process: Any) -> None:
    redis_server.cli("FLUSHALL")
    config = base_config(mock.api_url, redis_server.url, teams=teams_with(models=["flux-2"]))
    gateway = gateway_process(config)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert chat(gateway.url, "gemini is not allowed").status_code == 403

    config["teams"]["research"].pop("models")
    Path(gateway.config_path).write_text(yaml.safe_dump(config))
    reloaded = httpx.post(f"{gateway.url}/admin/v1/reload", headers=admin, timeout=30)
    assert reloaded.status_code == 200
    assert reloaded.json()["applied"] == ["teams"] and reloaded.json()["restart_needed"] == []
    assert chat(gateway.url, "now allowed").status_code == 200

    Path(gateway.config_path).write_text("teams: {research: {requests_per_minute: lots}}\n")
    refused = httpx.post(f"{gateway.url}/admin/v1/reload", headers=admin)
    assert refused.status_code == 400
    assert "teams.research.requests_per_minute: expected an integer" in refused.json()[
        "error"]["message"]
    assert chat(gateway.url, "old config still runs").status_code == 200


def _write(gateway: Any, config: dict[str, Any]) -> None:
    Path(gateway.config_path).write_text(yaml.safe_dump(config))


def test_admin_reload_reaches_every_replica_and_worker(
        redis_server: RedisServer, mock: Mock, gateway_process: Any) -> None:
    """One replica with two workers and another replica share a Redis: a reload asked of any
    one of them reaches every process, and the answer says which reloaded and what applied."""
    redis_server.cli("FLUSHALL")
    config = base_config(mock.api_url, redis_server.url, teams=teams_with(models=["flux-2"]))
    first = gateway_process(config, workers=2)
    second = gateway_process(config)
    for gateway in (first, second):
        assert chat(gateway.url, "gemini is not allowed").status_code == 403
    config["teams"]["research"].pop("models")
    config["upstream"]["timeout_s"] = 99  # needs a restart: said, and not applied
    for gateway in (first, second):
        _write(gateway, config)
    reloaded = httpx.post(f"{second.url}/admin/v1/reload",
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    assert reloaded.status_code == 200, reloaded.text
    body = reloaded.json()
    assert (body["applied"], body["restart_needed"]) == (["teams"], ["upstream"])
    assert body["processes"]["pending"] == []
    assert len(body["processes"]["reloaded"]) == 3  # two workers and the other replica
    for gateway in (first, second):  # every worker of each: many requests, all allowed now
        assert {chat(gateway.url, f"allowed {i}").status_code for i in range(8)} == {200}
    assert "upstream apply after a restart" in second.log()
