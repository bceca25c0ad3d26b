"""Key rotation without downtime: `aio-gateway keys rotate`, pasted into the config, reloaded into
a running gateway; both secrets work during the grace, the old one is refused after it, and the
key id (ledger, admin API) never changes."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway import config as cfg
from gateway.app import create_app
from gateway.auth import hash_key
from gateway.cli import main

from .conftest import KEYS, Mock, RunningGateway, ServerThread, base_config
from .test_jwt import Clock
from .test_proxy import error_of, wait_ledger


def rotate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["keys", "rotate", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def printed(out: str) -> tuple[str, dict[str, Any]]:
    """The new key, and the fields to set (the YAML lines between the two sentences)."""
    key = re.search(r"key \(shown once.*\): (\S+)", out).group(1)  # type: ignore[union-attr]
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("in teams.")) + 1
    end = next(i for i, line in enumerate(lines) if line.startswith("the new key works"))
    return key, yaml.safe_load("\n".join(lines[start:end]))


def chat(url: str, key: str, content: str) -> httpx.Response:
    return httpx.post(f"{url}/api/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": "gemini", "messages": [{"role": "user", "content": content}]})


def test_rotation_without_downtime(mock: Mock, store_url: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    raw = base_config(mock.api_url, store_url)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw))
    server = ServerThread(create_app(cfg.load(str(path)), config_path=str(path), clock=clock))
    gateway = RunningGateway(server.start(), server.app)
    try:
        old = KEYS["research"]
        assert chat(gateway.url, old, "before").status_code == 200
        until = datetime.fromtimestamp(clock.now, UTC).replace(microsecond=0) + timedelta(days=1)
        code, out, _ = rotate(capsys, "--team", "research", "--id", "research-key",
                              "--config", str(path), "--until", until.isoformat())
        assert code == 0
        new, fields = printed(out)
        assert new.startswith("aiogw_") and new != old
        assert fields == {"sha256": hash_key(new), "previous": [
            {"sha256": hash_key(old), "expires_at": until.isoformat().replace("+00:00", "Z")}]}
        assert chat(gateway.url, new, "not yet reloaded").status_code == 401

        raw["teams"]["research"]["keys"][0].update(fields)
        path.write_text(yaml.safe_dump(raw))
        assert gateway.admin("POST", "reload").status_code == 200
        assert chat(gateway.url, new, "new key").status_code == 200
        assert chat(gateway.url, old, "old key, in the grace").status_code == 200
        keys = {k["id"]: k for k in gateway.admin("GET", "keys").json()["keys"]}
        assert keys["research-key"]["previous"] == [
            {"expires_at": until.isoformat().replace("+00:00", "Z"), "valid": True}]

        clock.now = until.timestamp() - 1
        assert chat(gateway.url, old, "last second").status_code == 200
        clock.now = until.timestamp()
        refused = chat(gateway.url, old, "after the grace")
        assert refused.status_code == 401 and error_of(refused)["type"] == "authentication_error"
        assert chat(gateway.url, new, "after the grace").status_code == 200
        entries = wait_ledger(gateway, 5)
        assert {e["key_id"] for e in entries} == {"research-key"}  # one id across the rotation
        assert len(entries) == 5
    finally:
        gateway.close()


def test_rotate_keeps_earlier_grace_periods_and_the_key_lifetime(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    later, gone = now + timedelta(hours=5), now - timedelta(hours=1)
    expires = now + timedelta(days=30)
    entry = {"id": "ci", "sha256": hash_key("current"), "expires_at": expires.isoformat(),
             "previous": [{"sha256": hash_key("older"), "expires_at": later.isoformat()},
                          {"sha256": hash_key("oldest"), "expires_at": gone.isoformat()}]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"upstream": {"api_key": "aio_k"},
                                    "teams": {"research": {"keys": [entry]}}}))
    code, out, _ = rotate(capsys, "--team", "research", "--id", "ci", "--config", str(path),
                          "--grace", "2h")
    assert code == 0
    new, fields = printed(out)
    assert [p["sha256"] for p in fields["previous"]] == [hash_key("current"), hash_key("older")]
    end = datetime.fromisoformat(fields["previous"][0]["expires_at"])
    assert now + timedelta(hours=2) <= end <= datetime.now(UTC) + timedelta(hours=2)
    entry.update(fields)
    config = cfg.from_dict({"upstream": {"api_key": "aio_k"},  # the result is valid
                            "teams": {"research": {"keys": [entry]}}})
    assert config.teams["research"].keys[0].sha256 == hash_key(new)

    code, _, err = rotate(capsys, "--team", "research", "--id", "ci", "--config", str(path),
                          "--grace", "31d")
    assert code == 2 and "cannot outlive the key id" in err


def test_rotate_without_the_config_prints_a_placeholder(capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    code, out, _ = rotate(capsys, "--team", "research", "--id", "laptop")
    assert code == 0
    new, fields = printed(out)
    assert fields["sha256"] == hash_key(new)
    assert fields["previous"][0]["sha256"] == "<the sha256 now under id laptop>"
    entry = {"id": "laptop", **fields}
    with pytest.raises(cfg.ConfigError, match=r"previous\[0\]\.sha256: must be 64 lowercase hex"):
        cfg.from_dict({"upstream": {"api_key": "aio_k"},  # pasted as is: refused
                       "teams": {"research": {"keys": [entry]}}})


@pytest.mark.parametrize(("args", "message"), [
    (["--grace", "24"], "--grace takes"),
    (["--grace", "0h"], "--grace takes"),
    (["--grace", "1w"], "--grace takes"),
    (["--grace", "367d"], "--grace takes"),
    (["--until", "2020-01-01T00:00:00Z"], "must be in the future"),
    (["--until", "tomorrow"], "--until: expected a time with a timezone"),
    (["--until", "2099-01-01T00:00:00"], "--until: expected a time with a timezone"),
    (["--id", "bad id"], "--id uses"),
    (["--team", "bad team"], "--team uses"),
])
def test_rotate_refuses_bad_arguments(capsys: pytest.CaptureFixture[str], args: list[str],
                                      message: str) -> None:
    base = {"--team": "research", "--id": "laptop"}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    code, out, err = rotate(capsys, *[part for pair in base.items() for part in pair])
    assert code == 2 and message in err
    assert "aiogw_" not in out  # no key is printed when the command fails


def test_rotate_an_unknown_key_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"upstream": {"api_key": "aio_k"},
                                    "teams": {"research": {"keys": [
                                        {"id": "a", "sha256": "a" * 64}]}}}))
    for team, key_id in (("research", "b"), ("nobody", "a")):
        code, out, err = rotate(capsys, "--team", team, "--id", key_id, "--config", str(path))
        assert code == 2 and f"no key {key_id!r} under teams.{team}.keys" in err and not out


def test_until_and_grace_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["keys", "rotate", "--team", "t", "--id", "k", "--grace", "1h",
              "--until", "2099-01-01T00:00:00Z"])
    assert exit_.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
