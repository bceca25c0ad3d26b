"""Config parsing: strict, typed, one line per mistake that names the field."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from gateway import config as cfg

from .conftest import ROOT

SHA_A = "a" * 64
SHA_B = "b" * 64


def parse(text: str, **env: str) -> cfg.Config:
    return cfg.parse(text, env)


def test_empty_config_has_the_contract_defaults() -> None:
    config = parse("")
    assert config.listen.port == 8080
    assert config.listen.max_body_bytes == 25 * 1024 * 1024
    assert config.upstream.base_url == "https://apiin.one/api/v1"
    assert config.upstream.requests_per_minute == 60
    assert config.store.url == "memory://" and config.store.on_error == "closed"
    assert config.cache.scope == "team" and config.cache.endpoints == ("chat/completions",)
    assert config.cache.task_ttl_s == 604800 and config.cache.pending_task_ttl_s == 2
    assert config.pricing.default == 10


def test_example_config_is_valid_and_documents_every_field() -> None:
    text = (ROOT / "config.example.yaml").read_text()
    config = cfg.parse(text, {"APIINONE_API_KEY": "aio_example"})
    assert config.upstream.api_key == "aio_example"
    assert config.teams["research"].budget == cfg.Budget(50000, "month")
    raw = yaml.safe_load(text)

    def walk(cls: type, section: dict, path: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.name in section, f"config.example.yaml does not document {path}{f.name}"
            inner = hints[f.name]
            args = [a for a in typing.get_args(inner) if a is not type(None)]
            inner = args[0] if len(args) == 1 and typing.get_origin(inner) else inner
            if dataclasses.is_dataclass(inner):
                walk(inner, section[f.name], f"{path}{f.name}.")

    walk(cfg.Config, raw, "")
    walk(cfg.Team, raw["teams"]["research"], "teams.research.")
    walk(cfg.Key, raw["teams"]["research"]["keys"][0], "teams.research.keys[0].")


def test_interpolation_reads_the_environment() -> None:
    config = parse("""
listen: {port: "${PORT}", host: "${HOST:-127.0.0.1}"}
upstream: {api_key: "aio_${SUFFIX}"}
""", PORT="9000", SUFFIX="xyz")
    assert config.listen.port == 9000
    assert config.listen.host == "127.0.0.1"
    assert config.upstream.api_key == "aio_xyz"


def test_secrets_are_not_in_repr() -> None:
    config = parse("upstream: {api_key: aio_very_secret_value}")
    assert "aio_very_secret_value" not in repr(config)


BAD = [
    ("nope: 1", "nope: unknown field"),
    ("listen: {port: 80, hots: x}", "listen.hots: unknown field"),
    ("listen: {port: eighty}", "listen.port: expected an integer, got 'eighty'"),
    ("listen: {port: -1}", "listen.port: must be at least 0, got -1"),
    ("listen: [1]", "listen: expected a mapping, got a list"),
    ("upstream: {api_key: '${MISSING_KEY}'}",
     "upstream.api_key: environment variable MISSING_KEY is not set"),
    ("upstream: {api_key: 12345}", "upstream.api_key: expected a string, got int"),
    ("upstream: {timeout_s: 0}", "upstream.timeout_s: must be greater than 0, got 0"),
    ("upstream: {base_url: 'ftp://x'}", "upstream.base_url: must start with http:// or https://"),
    ("upstream: {requests_per_minute: 5, burst: 6}",
     "upstream.burst: must not exceed upstream.requests_per_minute"),
    ("store: {url: 'mongodb://x'}", "store.url: unsupported scheme in 'mongodb'"),
    ("store: {on_error: maybe}", "store.on_error: must be one of closed, open, got 'maybe'"),
    ("cache: {scope: world}", "cache.scope: must be one of team, organisation, got 'world'"),
    ("cache: {endpoints: ['/chat/completions']}",
     "cache.endpoints[0]: write the path without slashes at the ends"),
    ("pricing: {default: -1}", "pricing.default: must be at least 0, got -1"),
    ("pricing: {models: {flux-2: cheap}}", "pricing.models.flux-2: expected a number, got 'cheap'"),
    ("teams: {research: {requests_per_minute: -5}}",
     "teams.research.requests_per_minute: must be at least 1, got -5"),
    ("teams: {research: {budget: {credits: 10, period: year}}}",
     "teams.research.budget.period: must be one of day, week, month, total, got 'year'"),
    ("teams: {research: {budget: {period: day}}}",
     "teams.research.budget.credits: required field is missing"),
    ("teams: {research: {budget: {credits: -10}}}",
     "teams.research.budget.credits: must be at least 0, got -10"),
    ("teams: {research: {keys: [{id: a, sha256: xyz}]}}",
     "teams.research.keys[0].sha256: must be 64 lowercase hex characters: the sha256 of the key, "
     "not the key itself"),
    ("teams: {research: {keys: [{id: 'a b', sha256: xyz}]}}",
     "teams.research.keys[0].id: 'a b' is not a valid value"),
    (f"teams: {{a: {{keys: [{{id: k1, sha256: {SHA_A}}}]}}, "
     f"b: {{keys: [{{id: k2, sha256: {SHA_A}}}]}}}}",
     "teams.b.keys[0].sha256: duplicate key hash (also teams.a.keys[0])"),
    (f"teams: {{a: {{keys: [{{id: k1, sha256: {SHA_A}}}]}}}}\n"
     f"admin: {{keys: [{{id: k1, sha256: {SHA_B}}}]}}",
     "admin.keys[0].id: duplicate key id 'k1' (also teams.a.keys[0])"),
    ("teams: {'bad team': {}}", "teams.bad team: team names use letters, digits, '_', '.', '-'"),
    ("teams:\n  a: {}\n  a: {}", "line 3: duplicate key 'a'"),
    ("listen: {port: [}", "line 1: expected the node content, but found '}'"),
    ("logging: {access_log: yes-please}",
     "logging.access_log: expected true or false, got 'yes-please'"),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_config_names_the_field(text: str, message: str) -> None:
    with pytest.raises(cfg.ConfigError) as info:
        parse(text)
    assert str(info.value) == message
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("raw", "message"), [
    ({"teams": {"research\n": {}}},
     "teams.'research\\n': team names use letters, digits, '_', '.', '-'"),
    ({"teams": {"research": {"keys": [{"id": "laptop\n", "sha256": SHA_A}]}}},
     "teams.research.keys[0].id: 'laptop\\n' is not a valid value"),
    ({"teams": {"research": {"keys": [{"id": "laptop", "sha256": SHA_A + "\n"}]}}},
     "teams.research.keys[0].sha256: must be 64 lowercase hex characters: the sha256 of the key, "
     "not the key itself"),
    ({"store": {"key_prefix": "aio\n"}}, "store.key_prefix: 'aio\\n' is not a valid value"),
], ids=["team", "key-id", "sha256", "key-prefix"])
def test_a_trailing_newline_is_not_a_valid_name(raw: dict[str, object], message: str) -> None:
    """Regression (issue 12, defect 3): `$` matched before a trailing newline."""
    with pytest.raises(cfg.ConfigError) as info:
        cfg.from_dict(raw)
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_secret_values_never_appear_in_errors() -> None:
    with pytest.raises(cfg.ConfigError) as info:
        parse("teams: {research: {keys: [{id: a, sha256: not-a-hash-but-a-secret}]}}")
    assert "not-a-hash-but-a-secret" not in str(info.value)


def test_check_config_command(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("upstream: {api_key: x}\n")
    out = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(good)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.startswith("config OK")

    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: {port: eighty}\n")
    out = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(bad)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0
    assert out.stderr == "config error: listen.port: expected an integer, got 'eighty'\n"

    out = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(tmp_path / "x")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "cannot read config file" in out.stderr


def test_serve_refuses_a_bad_config_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstream: {api_key: '${NOT_SET_ANYWHERE}'}\n")
    out = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(bad)],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        "config error: upstream.api_key: environment variable NOT_SET_ANYWHERE is not set"]
