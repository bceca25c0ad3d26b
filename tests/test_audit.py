"""The audit log: every admin action and config change, who and when, never a secret."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import config as cfg
from gateway.app import create_app
from gateway.auth import hash_key

from .conftest import ADMIN_KEY, Mock, RunningGateway, ServerThread, base_config


@pytest.fixture
def reloadable(store_url: str, mock: Mock, tmp_path: Path) -> Any:
    path = tmp_path / "config.yaml"
    raw = base_config(mock.api_url, store_url)
    path.write_text(yaml.safe_dump(raw))
    app = create_app(cfg.load(str(path)), config_path=str(path))
    gateway = RunningGateway(ServerThread(app).start(), app)
    yield gateway, path, raw
    gateway.close()


def test_admin_actions_and_config_changes_are_audited(
        reloadable: Any, caplog: pytest.LogCaptureFixture) -> None:
    gateway, path, raw = reloadable
    caplog.set_level(logging.INFO, logger="gateway.audit")
    assert gateway.admin("POST", "keys/research-key/revoke").status_code == 200
    assert gateway.admin("DELETE", "keys/research-key/revoke").status_code == 200
    assert gateway.admin("DELETE", "cache", params={"route": "chat/completions"}).status_code == 200
    rotated = "aiogw_rotated_research_key_0123456789"
    raw["teams"]["research"]["keys"][0]["sha256"] = hash_key(rotated)
    raw["teams"]["research"]["requests_per_minute"] = 30
    raw["teams"]["studio"] = {"keys": [
        {"id": "studio-key", "sha256": hash_key("aiogw_studio_key_abcdefghijklmnopq")}]}
    raw["pricing"]["models"]["gemini"] = 3
    path.write_text(yaml.safe_dump(raw))
    assert gateway.admin("POST", "reload", timeout=30).status_code == 200

    page = gateway.admin("GET", "audit").json()
    entries = page["entries"]
    assert [(e["actor"], e["action"]) for e in entries] == [
        ("ops", "revoke"), ("ops", "unrevoke"), ("ops", "cache.flush"), ("ops", "reload")]
    assert (entries[0]["team"], entries[0]["key_id"]) == ("research", "research-key")
    assert entries[2]["route"] == "chat/completions" and entries[2]["removed"] >= 0
    assert entries[3]["changes"] == {
        "teams_added": ["studio"],
        "teams_changed": {"research": {"keys_rotated": ["research-key"],
                                       "limits": ["requests_per_minute"]}},
        "sections": ["pricing"],
    }
    assert entries[3]["applied"] == ["pricing", "teams"]
    assert all(e["time_ms"] > 0 for e in entries) and page["next"] is None
    text = str(entries) + caplog.text
    assert hash_key(rotated) not in text and rotated not in text and ADMIN_KEY not in text
    assert [r.getMessage() for r in caplog.records] == [
        "audit: revoke by ops", "audit: unrevoke by ops", "audit: cache.flush by ops",
        "audit: reload by ops"]
    second = gateway.admin("GET", "audit", params={"after": entries[1]["id"], "limit": 1}).json()
    assert [e["action"] for e in second["entries"]] == ["cache.flush"]
    assert second["next"] == entries[2]["id"]
