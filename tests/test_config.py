"""Config parsing: strict, typed, one line per mistake that names the field."""

from __future__ import annotations

import dataclasses
import os
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


def test_a_config_with_only_the_key_has_the_contract_defaults() -> None:
    config = parse("upstream: {api_key: aio_k}")
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
    secret = "whsec_" + "A" * 32  # the webhook secret's variable (24 zero bytes)
    config = cfg.parse(text, {"APIINONE_API_KEY": "aio_example", "RESEARCH_WEBHOOK_SECRET": secret})
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
            if dataclasses.is_dataclass(inner) and section[f.name] is not None:
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


KEY = "upstream: {api_key: aio_k}\n"  # a valid upstream key, for the cases that need one
SECRET = "s3cr3t-Pa55"
BAD_VALUES = [
    # prices: never negative (the memory store then added credits), finite, at most 1e9
    ("pricing: {models: {flux-2: -4}}", "pricing.models.flux-2: must be at least 0, got -4"),
    ("pricing: {default: 2000000000}", "pricing.default: must be at most 1e+09, got 2000000000"),
    ("pricing: {models: {kling-3: 1.0e+12}}",
     "pricing.models.kling-3: must be at most 1e+09, got 1000000000000.0"),
    ("pricing: {models: {flux-2: .inf}}",
     "pricing.models.flux-2: must be a finite number, got inf"),
    ("pricing: {default: .nan}", "pricing.default: must be a finite number, got nan"),
    # every number finite and in range
    ("upstream: {timeout_s: .inf}", "upstream.timeout_s: must be a finite number, got inf"),
    ("listen: {shutdown_grace_s: -.inf}",
     "listen.shutdown_grace_s: must be a finite number, got -inf"),
    ("teams: {research: {budget: {credits: .inf}}}",
     "teams.research.budget.credits: must be a finite number, got inf"),
    ("teams: {research: {budget: {credits: 1.0e+13}}}",
     "teams.research.budget.credits: must be at most 1e+12, got 10000000000000.0"),
    ("listen: {port: 70000}", "listen.port: must be at most 65535, got 70000"),
    ("upstream: {timeout_s: 1.0e+300}", "upstream.timeout_s: must be at most 86400, got 1e+300"),
    # the upstream key: there, alone, and a valid header value; never echoed
    ("listen: {port: 8080}", "upstream.api_key: is missing or empty: set the organisation's "
     "API in One key (api_key: ${APIINONE_API_KEY})"),
    ("upstream: {api_key: ''}", "upstream.api_key: is missing or empty: set the organisation's "
     "API in One key (api_key: ${APIINONE_API_KEY})"),
    ("upstream: {api_key: '   '}", "upstream.api_key: is missing or empty: set the "
     "organisation's API in One key (api_key: ${APIINONE_API_KEY})"),
    (f'upstream: {{api_key: "{SECRET}\\n"}}', "upstream.api_key: has whitespace at its start "
     "or end (a secret file's trailing newline?); the key is not shown"),
    (f"upstream: {{api_key: ' {SECRET}'}}", "upstream.api_key: has whitespace at its start or "
     "end (a secret file's trailing newline?); the key is not shown"),
    (f'upstream: {{api_key: "{SECRET}\\tx"}}', "upstream.api_key: must be visible ASCII "
     "characters only (no spaces, no control characters); the key is not shown"),
    (f"upstream: {{api_key: '{SECRET} x'}}", "upstream.api_key: must be visible ASCII "
     "characters only (no spaces, no control characters); the key is not shown"),
    (f"upstream: {{api_key: '{SECRET}\u00e9'}}", "upstream.api_key: must be visible ASCII "
     "characters only (no spaces, no control characters); the key is not shown"),
    # upstream accounts: each key checked as api_key is, never echoed
    (f"upstream: {{api_key: k, accounts: [{{id: a, api_key: {SECRET}}}]}}",
     "upstream.api_key: give either api_key (one account) or accounts"),
    (f"upstream: {{accounts: [{{id: a, api_key: {SECRET}}}, {{id: a, api_key: {SECRET}x}}]}}",
     "upstream.accounts[1].id: duplicate account id 'a' (also upstream.accounts[0])"),
    (f"upstream: {{accounts: [{{id: a, api_key: {SECRET}}}, {{id: b, api_key: {SECRET}}}]}}",
     "upstream.accounts: two accounts have the same key (not shown)"),
    (f"upstream: {{accounts: [{{id: a, api_key: ' {SECRET}'}}]}}",
     "upstream.accounts[0].api_key: has whitespace at its start or end (a secret file's "
     "trailing newline?); the key is not shown"),
    ("upstream: {accounts: [{id: a}]}", "upstream.accounts[0].api_key: required field is missing"),
    (f"upstream: {{accounts: [{{id: 'a b', api_key: {SECRET}}}]}}",
     "upstream.accounts[0].id: 'a b' is not a valid value"),
    (f"upstream: {{accounts: [{{id: a, api_key: {SECRET}, requests_per_minute: 5, burst: 6}}]}}",
     "upstream.accounts[0].burst: must not exceed requests_per_minute"),
    (f"upstream: {{accounts: [{{id: a, api_key: {SECRET}, teams: [nobody]}}]}}",
     "upstream.accounts[0].teams[0]: no team is named 'nobody'"),
    (f"upstream: {{accounts: [{{id: a, api_key: {SECRET}, teams: [studio]}}]}}\n"
     "teams: {studio: {}, research: {}}",
     "teams.research: no upstream account may serve this team (each lists other teams)"),
    (f"upstream: {{accounts: [{{id: a, api_key: {SECRET}, credits: -1}}]}}",
     "upstream.accounts[0].credits: must be at least 0, got -1"),
    (KEY + "teams: {research: {upstream_weight: 0}}",
     "teams.research.upstream_weight: must be greater than 0, got 0"),
    (KEY + "teams: {research: {max_waiting: -1}}",
     "teams.research.max_waiting: must be at least 0, got -1"),
    (KEY + "teams: {research: {upstream_min_per_minute: 61}}",
     "teams.research.upstream_min_per_minute: more than the accounts this team may use allow"),
    (KEY + "teams: {a: {upstream_min_per_minute: 40}, b: {upstream_min_per_minute: 40}}",
     "teams: the upstream_min_per_minute of all teams add up to more than the upstream "
     "accounts allow"),
    # the metrics token: a real secret, never echoed
    (KEY + "metrics: {bearer_token: ''}",
     "metrics.bearer_token: must be 16 to 4096 characters; the token is not shown"),
    (KEY + f"metrics: {{bearer_token: '{SECRET}'}}",
     "metrics.bearer_token: must be 16 to 4096 characters; the token is not shown"),
    (KEY + f"metrics: {{bearer_token: '{SECRET * 3} '}}", "metrics.bearer_token: has whitespace "
     "at its start or end (a secret file's trailing newline?); the token is not shown"),
    (KEY + f"metrics: {{bearer_token: '{SECRET * 3}\u00e9'}}", "metrics.bearer_token: must be "
     "visible ASCII characters only (no spaces, no control characters); the token is not shown"),
    # store URLs: one line, never the password
    (KEY + "store: {url: 'redis+cluster://host'}",
     "store.url: each node must be host:port (port 1-65535), got 'host'"),
    (KEY + f"store: {{url: 'redis+cluster://:{SECRET}@host'}}",
     "store.url: each node must be host:port (port 1-65535), got 'host'"),
    (KEY + "store: {url: 'redis+cluster://'}", "store.url: names no host"),
    (KEY + "store: {url: 'redis+cluster://a:6379,,b:6379'}",
     "store.url: each node must be host:port (port 1-65535), got ''"),
    (KEY + "store: {url: 'redis+cluster://a:99999'}",
     "store.url: each node must be host:port (port 1-65535), got 'a:99999'"),
    (KEY + "store: {url: 'redis+cluster://a:6379/0'}",
     "store.url: a cluster has no database number; write redis+cluster://host:port,..."),
    (KEY + "store: {url: 'redis+sentinel://s1:26379'}",
     "store.url: needs the service name: redis+sentinel://host:port,.../<service>[/db]"),
    (KEY + "store: {url: 'redis+sentinel://s1:26379/aio/x'}",
     "store.url: the database must be a number, got 'x'"),
    (KEY + f"store: {{url: 'redis://:{SECRET}@/0'}}", "store.url: names no host"),
    (KEY + "store: {url: 'redis://r:port/0'}", "store.url: the port must be 1-65535, got 'port'"),
    (KEY + "store: {url: 'redis://r:0/0'}", "store.url: the port must be 1-65535, got '0'"),
    (KEY + "store: {url: 'redis://r:6379/db1'}",
     "store.url: the database must be a number, got 'db1'"),
    (KEY + "store: {url: 'unix://'}", "store.url: unix:// needs the socket's path"),
    (KEY + "store: {url: 'memory://x'}", "store.url: memory:// takes nothing after it"),
    (KEY + "store: {url: 'redis://r a:6379'}",
     "store.url: must be a URL without spaces or control characters"),
    # the upstream base URL
    (KEY.replace("}", ", base_url: 'https://'}"), "upstream.base_url: names no host"),
    (KEY.replace("}", f", base_url: 'https://me:{SECRET}@apiin.one/api/v1'}}"),
     "upstream.base_url: must not carry credentials (the key is upstream.api_key)"),
    (KEY.replace("}", ", base_url: 'https://apiin.one/api/v1?team=x'}"),
     "upstream.base_url: must have no query or fragment"),
    (KEY.replace("}", ", base_url: 'https://apiin.one/api/v1#top'}"),
     "upstream.base_url: must have no query or fragment"),
    (KEY.replace("}", ", base_url: 'https://apiin.one:99999/api/v1'}"),
     "upstream.base_url: the port must be 1-65535, got '99999'"),
    (KEY.replace("}", ", base_url: 'https://api in.one/v1'}"),
     "upstream.base_url: must be a URL without spaces or control characters"),
]


@pytest.mark.parametrize(("text", "message"), BAD_VALUES,
                         ids=[f"{i}-{m.split(':')[0]}" for i, (_, m) in enumerate(BAD_VALUES)])
def test_bad_values_are_refused_with_one_line(text: str, message: str) -> None:
    """Regression (issue 12, defect 6): each of these was accepted (or, for store URLs, a
    traceback at start-up); now one line that names the field and never shows a secret."""
    with pytest.raises(cfg.ConfigError) as info:
        parse(text)
    assert str(info.value) == message
    assert "\n" not in str(info.value) and SECRET not in str(info.value)


@pytest.mark.parametrize("url", [
    "memory://", "redis://localhost", "redis://r:6379/0", "rediss://:pw@r.example.com:6380/2",
    "redis://user:pw@r:6379/0?socket_keepalive=true", "unix:///run/redis.sock",
    "redis+sentinel://s1:26379,s2:26379/aio", "rediss+sentinel://:pw@s1:26379/aio/3",
    "redis+cluster://n1:6379,n2:6379", "rediss+cluster://:pw@[::1]:7000",
])
def test_good_store_urls_pass(url: str) -> None:
    assert parse(KEY + f"store: {{url: '{url}'}}").store.url == url


def test_accounts_in_place_of_the_one_key() -> None:
    config = parse(f"""
upstream:
  accounts:
    - {{id: main, api_key: {SECRET}, requests_per_minute: 120, burst: 10, credits: 5000}}
    - {{id: media, api_key: {SECRET}x, requests_per_minute: null, teams: [studio]}}
teams: {{studio: {{upstream_weight: 2.5, upstream_min_per_minute: 30}}, research: {{}}}}
""")
    main, media = config.upstream.accounts
    assert (main.id, main.requests_per_minute, main.burst, main.credits) == ("main", 120, 10, 5000)
    assert (media.requests_per_minute, media.teams) == (None, ("studio",))
    assert SECRET not in repr(config)
    assert config.teams["studio"].upstream_weight == 2.5
    assert config.teams["research"].max_waiting == 50
    assert cfg.accounts_of(parse(KEY).upstream)[0].id == "default"


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


@pytest.mark.parametrize(("text", "env", "line"), [
    ("upstream: {api_key: '${KEY}'}", {"KEY": f"aio_{SECRET}\n"},
     "upstream.api_key: has whitespace at its start or end (a secret file's trailing newline?); "
     "the key is not shown"),
    (KEY + "store: {url: 'redis+cluster://redis-0.redis'}", {},
     "store.url: each node must be host:port (port 1-65535), got 'redis-0.redis'"),
    (KEY + "pricing: {models: {flux-2: -4}}", {}, "pricing.models.flux-2: must be at least 0, "
     "got -4"),
], ids=["key-with-newline", "cluster-without-port", "negative-price"])
@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_new_rules_are_one_line_from_the_command(tmp_path: Path, text: str, env: dict[str, str],
                                                 line: str, command: str) -> None:
    """`check-config` and `serve` say the same one line, and never the key."""
    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n")
    args = [str(path)] if command == "check-config" else ["--config", str(path)]
    out = subprocess.run([sys.executable, "-m", "gateway", command, *args], capture_output=True,
                         text=True, cwd=ROOT, timeout=60, env={**os.environ, **env})
    assert out.returncode == 2
    assert out.stderr.splitlines() == [f"config error: {line}"]
    assert SECRET not in out.stdout + out.stderr


def test_serve_refuses_a_bad_config_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstream: {api_key: '${NOT_SET_ANYWHERE}'}\n")
    out = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(bad)],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        "config error: upstream.api_key: environment variable NOT_SET_ANYWHERE is not set"]
