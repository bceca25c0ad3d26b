"""The command line: keys, and the console script itself."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys

import yaml

from gateway import config as cfg
from gateway.auth import hash_key
from gateway.policy import Policy

from .conftest import ROOT


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


def test_keys_new_prints_a_key_once_and_its_config_line() -> None:
    out = run("keys", "new", "--team", "research")
    assert out.returncode == 0
    key = re.search(r"key \(shown once.*\): (\S+)", out.stdout).group(1)  # type: ignore[union-attr]
    assert key.startswith("aiogw_") and len(key) >= 40
    line = out.stdout.strip().splitlines()[-1]
    entry = yaml.safe_load(line)[0]
    assert entry["sha256"] == hash_key(key) and entry["id"].startswith("research-")
    config = cfg.from_dict({"upstream": {"api_key": "aio_k"},
                            "teams": {"research": {"keys": [entry]}}})
    principal = asyncio.run(Policy(config).auth.authenticate(f"Bearer {key}".encode(), 0.0))
    assert (principal.team, principal.key_id) == ("research", entry["id"])
    assert run("keys", "new", "--team", "research").stdout != out.stdout  # fresh every time


def test_keys_new_refuses_a_bad_team_name() -> None:
    out = run("keys", "new", "--team", "bad team")
    assert out.returncode == 2 and "--team" in out.stderr


def test_console_script_and_module_agree() -> None:
    module = run("--help")
    assert module.returncode == 0
    for command in ("serve", "check-config", "keys", "usage", "mock-upstream"):
        assert command in module.stdout
