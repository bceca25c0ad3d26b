"""Cost-attribution tags: the header parsed against the config's rules (a pure function)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway import config as cfg
from gateway.attribution import TagRules, parse_tags

RULES = {"project": {"pattern": "^[a-z0-9-]{1,32}$"}, "env": {"values": ["dev", "staging", "prod"]},
         "owner": {"pattern": "[a-z]+(\\.[a-z]+)?"}}


def rules(max_tags: int = 8, tags: dict[str, Any] | None = None) -> TagRules:
    config = cfg.from_dict({"upstream": {"api_key": "aio_k"},
                            "attribution": {"tags": RULES if tags is None else tags,
                                            "max_tags": max_tags}})
    return TagRules(config.attribution)


@pytest.mark.parametrize(("header", "kept", "ignored"), [
    (None, {}, None),
    (b"", {}, None),
    (b"project=search,env=prod", {"project": "search", "env": "prod"}, None),
    (b" project = search ,\tenv=prod , ", {"project": "search", "env": "prod"}, None),
    (b"project=search,,env=dev", {"project": "search", "env": "dev"}, None),
    (b"owner=ana.lopes", {"owner": "ana.lopes"}, None),
    (b"project=search,team=x", {"project": "search"}, "team (unknown key)"),
    (b"env=production", {}, "env (bad value)"),
    (b"project=Search", {}, "project (bad value)"),  # the pattern is fullmatched
    (b"project=" + b"a" * 33, {}, "project (bad value)"),
    (b"project=", {}, "project (bad value)"),
    (b"project=-x", {}, "project (bad value)"),  # would read as a formula in a spreadsheet
    (b"owner=ana.", {}, "owner (bad value)"),  # the pattern must match the whole value
    (b"project=a,project=b,env=dev", {"env": "dev"}, "project (duplicate)"),
    (b"project=a,env=dev,project=a", {"env": "dev"}, "project (duplicate)"),
    (b"project", {}, "project (malformed)"),
    (b"=search", {}, "? (malformed)"),
    (b"pro ject=x", {}, "? (unknown key)"),
    (b"Project=search", {}, "Project (unknown key)"),
    (b"env=dev\x00", {}, "env (bad value)"),
    ("project=caf\u00e9".encode(), {}, "all (the header is not ASCII)"),
    (b"project=" + b"a" * 1100, {}, "all (the header is longer than 1024 bytes)"),
])
def test_parse_tags(header: bytes | None, kept: dict[str, str], ignored: str | None) -> None:
    assert parse_tags(header, rules()) == (kept, ignored)


def test_too_many_tags_keeps_the_first_ones() -> None:
    tags, ignored = parse_tags(b"project=a,env=dev,owner=b", rules(max_tags=2))
    assert tags == {"project": "a", "env": "dev"}
    assert ignored == "owner (too many)"


def test_the_warning_stays_short() -> None:
    header = ",".join(f"k{i}=v" for i in range(40)).encode()
    tags, ignored = parse_tags(header, rules())
    assert tags == {}
    assert ignored == ", ".join(f"k{i} (unknown key)" for i in range(8)) + ", and 32 more"


def test_no_tags_configured_ignores_every_tag() -> None:
    assert parse_tags(b"project=a", rules(tags={})) == ({}, "project (unknown key)")


@pytest.mark.parametrize(("attribution", "message"), [
    ({"tags": {"Project": {"values": ["a"]}}}, "attribution.tags.Project: tag keys use"),
    ({"tags": {"project": {}}}, "attribution.tags.project: give either values or pattern"),
    ({"tags": {"project": {"values": ["a"], "pattern": "a"}}},
     "attribution.tags.project: give either values or pattern"),
    ({"tags": {"project": {"values": []}}},
     "attribution.tags.project.values: list between 1 and 256 values"),
    ({"tags": {"env": {"values": ["dev", "dev"]}}},
     "attribution.tags.env.values: a value is listed twice"),
    ({"tags": {"env": {"values": ["dev", "-x"]}}},
     "attribution.tags.env.values[1]: '-x' is not a valid value"),
    ({"tags": {"env": {"values": ["a" * 65]}}}, "attribution.tags.env.values[0]: 'aaa"),
    ({"tags": {"project": {"pattern": "[a-z"}}},
     "attribution.tags.project.pattern: not a valid regular expression"),
    ({"tags": {"project": {"pattern": ""}}},
     "attribution.tags.project.pattern: must be 1 to 256 characters"),
    ({"tags": {"project": {"pattern": "a" * 257}}},
     "attribution.tags.project.pattern: must be 1 to 256 characters"),
    ({"tags": {"project": {"regex": "a"}}}, "attribution.tags.project.regex: unknown field"),
    ({"max_tags": 0}, "attribution.max_tags: must be at least 1"),
    ({"max_tags": 33}, "attribution.max_tags: must be at most 32"),
    ({"tags": {f"t{i}": {"values": ["a"]} for i in range(33)}},
     "attribution.tags: at most 32 tag keys"),
])
def test_attribution_config_is_strict(attribution: dict[str, Any], message: str) -> None:
    with pytest.raises(cfg.ConfigError) as error:
        cfg.from_dict({"upstream": {"api_key": "aio_k"}, "attribution": attribution})
    assert str(error.value).startswith(message)
