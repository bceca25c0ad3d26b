"""Configuration: YAML parsed once into frozen, typed objects.

Parsing is strict. An unknown field, a wrong type, a negative limit, a duplicate key hash or an
unset `${VAR}` raises `ConfigError` whose message is one line that starts with the field's path
(`teams.research.budget.period: ...`). Handlers only ever see the objects defined here. Times
(`expires_at`) are ISO 8601 with a timezone and become aware UTC datetimes.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

import yaml

from . import callbacks

Period = Literal["day", "week", "month", "total"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # patterns are used with fullmatch
_SHA256 = re.compile(r"[0-9a-f]{64}")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_INSTANT = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?(?:Z|[+-][0-9]{2}:[0-9]{2})")
_TEXT = re.compile(r"[\x21-\x7e]{1,512}")  # visible ASCII: issuer, audience, claim names
TAG_KEY = re.compile(r"[a-z][a-z0-9_-]{0,31}")
# the first character keeps spreadsheets from reading an exported value as a formula
TAG_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}")


class ConfigError(ValueError):
    """A configuration that must not start. The message names the field."""


# Upper bounds: a day for a timeout (a socket timeout beyond ~1e9 s overflows), ten years for a
# time to live, 1e9 for counts and prices; budgets up to 1e12 credits keep millicredits below
# 2**53, exact in the store's Lua numbers.
DAY_S = 86400
TEN_YEARS_S = 10 * 365 * DAY_S
MANY = 10**9


def _check(*, minimum: float | None = None, maximum: float | None = None,
           pattern: re.Pattern[str] | None = None, secret: bool = False,
           above: float | None = None, hint: str | None = None) -> dict[str, Any]:
    return {"minimum": minimum, "maximum": maximum, "pattern": pattern, "secret": secret,
            "above": above, "hint": hint}


@dataclass(frozen=True, slots=True)
class Listen:
    host: str = "0.0.0.0"
    port: int = field(default=8080, metadata=_check(minimum=0, maximum=65535))
    max_body_bytes: int = field(default=25 * 1024 * 1024,
                                metadata=_check(minimum=1, maximum=MANY))
    shutdown_grace_s: float = field(default=30.0, metadata=_check(minimum=0, maximum=DAY_S))
    head_timeout_s: float = field(default=10.0, metadata=_check(above=0, maximum=DAY_S))
    body_timeout_s: float = field(default=30.0, metadata=_check(above=0, maximum=DAY_S))


@dataclass(frozen=True, slots=True)
class UpstreamAccount:
    """One apiin.one account: its key, its own request limit, and the teams it is kept for."""

    id: str = field(metadata=_check(pattern=_NAME))
    api_key: str = field(repr=False, metadata=_check(secret=True))
    requests_per_minute: int | None = field(default=60, metadata=_check(minimum=1, maximum=MANY))
    burst: int = field(default=1, metadata=_check(minimum=1, maximum=MANY))
    credits: float | None = field(default=None, metadata=_check(minimum=0, maximum=1e12))
    teams: tuple[str, ...] | None = None  # None: every team may use it


@dataclass(frozen=True, slots=True)
class Upstream:
    base_url: str = "https://apiin.one/api/v1"
    api_key: str = field(default="", repr=False, metadata=_check(secret=True))
    accounts: tuple[UpstreamAccount, ...] = ()
    account_down_s: float = field(default=300.0, metadata=_check(minimum=0, maximum=DAY_S))
    timeout_s: float = field(default=120.0, metadata=_check(above=0, maximum=DAY_S))
    stream_timeout_s: float = field(default=600.0, metadata=_check(above=0, maximum=DAY_S))
    connect_timeout_s: float = field(default=10.0, metadata=_check(above=0, maximum=DAY_S))
    requests_per_minute: int | None = field(default=60, metadata=_check(minimum=1, maximum=MANY))
    burst: int = field(default=1, metadata=_check(minimum=1, maximum=MANY))
    queue_timeout_s: float = field(default=10.0, metadata=_check(minimum=0, maximum=DAY_S))
    retries: int = field(default=2, metadata=_check(minimum=0, maximum=10))
    max_connections: int = field(default=200, metadata=_check(minimum=1, maximum=100_000))


@dataclass(frozen=True, slots=True)
class Store:
    url: str = "memory://"
    on_error: Literal["closed", "open"] = "closed"
    timeout_s: float = field(default=1.0, metadata=_check(above=0, maximum=DAY_S))
    key_prefix: str = field(default="aio", metadata=_check(pattern=_NAME))
    warn_interval_s: float = field(default=60.0, metadata=_check(minimum=0, maximum=DAY_S))
    # memory:// only: keys that expire (cache entries, remembered answers, locks) are evicted,
    # least recently used first, beyond this size (Redis: set maxmemory, volatile-lru)
    memory_max_bytes: int = field(default=128 * 1024 * 1024,
                                  metadata=_check(minimum=1, maximum=1 << 40))


@dataclass(frozen=True, slots=True)
class Cache:
    scope: Literal["team", "organisation"] = "team"
    ttl_s: int = field(default=86400, metadata=_check(minimum=0, maximum=TEN_YEARS_S))
    endpoints: tuple[str, ...] = ("chat/completions",)
    task_ttl_s: int = field(default=604800, metadata=_check(minimum=0, maximum=TEN_YEARS_S))
    pending_task_ttl_s: float = field(default=2.0, metadata=_check(minimum=0, maximum=DAY_S))
    max_entry_bytes: int = field(default=1024 * 1024, metadata=_check(minimum=0, maximum=MANY))


@dataclass(frozen=True, slots=True)
class Pricing:
    default: float = field(default=10.0, metadata=_check(minimum=0, maximum=MANY))
    models: Mapping[str, float] = field(default_factory=dict,
                                        metadata=_check(minimum=0, maximum=MANY))


@dataclass(frozen=True, slots=True)
class Budget:
    credits: float = field(metadata=_check(minimum=0, maximum=1e12))
    period: Period = "month"


_SHA256_CHECK = _check(
    pattern=_SHA256, secret=True,  # hidden: a key pasted here by mistake must not be echoed
    hint="64 lowercase hex characters: the sha256 of the key, not the key itself")


@dataclass(frozen=True, slots=True)
class PreviousKey:
    """A key's earlier secret, still accepted until `expires_at` (rotation without downtime)."""

    sha256: str = field(repr=False, metadata=_SHA256_CHECK)
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Key:
    """One key id: its current secret, valid from `not_before` until `expires_at` (both
    optional), and the secrets it replaced, each valid until its own end."""

    id: str = field(metadata=_check(pattern=_NAME))
    sha256: str = field(repr=False, metadata=_SHA256_CHECK)
    not_before: datetime | None = None
    expires_at: datetime | None = None
    previous: tuple[PreviousKey, ...] = ()
    # limits of this key inside its team's: a request must fit both
    requests_per_minute: int | None = field(default=None,
                                            metadata=_check(minimum=1, maximum=MANY))
    requests_per_day: int | None = field(default=None, metadata=_check(minimum=1, maximum=MANY))
    budget: Budget | None = None


WEBHOOK_SECRET = re.compile(r"whsec_[A-Za-z0-9+/]{32,88}={0,2}")
_WEBHOOK_SECRET_CHECK = _check(
    pattern=WEBHOOK_SECRET, secret=True,
    hint="whsec_ and the base64 of 24 to 64 random bytes (the value is not shown)")


@dataclass(frozen=True, slots=True)
class Callbacks:
    """Task completion webhooks (`X-Callback-URL`): where they may go, and how they are signed.

    `allow`: URL prefixes with `*` wildcards (gateway/callbacks.py); `secret`: the Standard
    Webhooks signing secret; `secrets`: more of them by id, for `X-Callback-Secret-Id`."""

    allow: tuple[str, ...]
    secret: str = field(repr=False, metadata=_WEBHOOK_SECRET_CHECK)
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False,
                                       metadata=_WEBHOOK_SECRET_CHECK)


@dataclass(frozen=True, slots=True)
class Team:
    keys: tuple[Key, ...] = ()
    requests_per_minute: int | None = field(default=None,
                                            metadata=_check(minimum=1, maximum=MANY))
    requests_per_day: int | None = field(default=None, metadata=_check(minimum=1, maximum=MANY))
    budget: Budget | None = None
    models: tuple[str, ...] | None = None
    callbacks: Callbacks | None = None
    upstream_weight: float = field(default=1.0, metadata=_check(above=0, maximum=1000))
    upstream_min_per_minute: int = field(default=0, metadata=_check(minimum=0, maximum=MANY))
    max_waiting: int = field(default=50, metadata=_check(minimum=0, maximum=100_000))


@dataclass(frozen=True, slots=True)
class Admin:
    keys: tuple[Key, ...] = ()


@dataclass(frozen=True, slots=True)
class Jwt:
    """Bearer JWTs from the organisation's identity provider (RS256 / ES256, keys from JWKS)."""

    issuer: str = field(metadata=_check(pattern=_TEXT))
    audience: str = field(metadata=_check(pattern=_TEXT))
    jwks_url: str = field(metadata=_check(pattern=_TEXT))
    team_claim: str = field(default="team", metadata=_check(pattern=_TEXT))
    key_claim: str | None = field(default=None, metadata=_check(pattern=_TEXT))
    leeway_s: float = field(default=30.0, metadata=_check(minimum=0))
    jwks_timeout_s: float = field(default=3.0, metadata=_check(above=0))
    jwks_refresh_s: float = field(default=300.0, metadata=_check(above=0))
    jwks_cooldown_s: float = field(default=30.0, metadata=_check(minimum=0))


@dataclass(frozen=True, slots=True)
class Auth:
    jwt: Jwt | None = None


@dataclass(frozen=True, slots=True)
class TagRule:
    """The values a cost-attribution tag may take: a list, or a pattern (fullmatched)."""

    values: tuple[str, ...] | None = field(default=None, metadata=_check(pattern=TAG_VALUE))
    pattern: str | None = None


@dataclass(frozen=True, slots=True)
class Attribution:
    tags: Mapping[str, TagRule] = field(default_factory=dict)
    max_tags: int = field(default=8, metadata=_check(minimum=1))


@dataclass(frozen=True, slots=True)
class Ledger:
    retention_days: float = field(default=90.0, metadata=_check(above=0, maximum=3650))
    max_entries: int = field(default=1_000_000, metadata=_check(minimum=1, maximum=MANY))
    # the ledger of record: entries are copied there in the background (gateway/ledger/)
    url: str | None = field(default=None, repr=False, metadata=_check(secret=True))
    batch_rows: int = field(default=1000, metadata=_check(minimum=1))
    interval_s: float = field(default=1.0, metadata=_check(above=0, maximum=DAY_S))
    timeout_s: float = field(default=10.0, metadata=_check(above=0, maximum=DAY_S))


@dataclass(frozen=True, slots=True)
class Tracing:
    """OpenTelemetry traces, sent over OTLP/HTTP to `endpoint` (a collector's base URL; spans go
    to `<endpoint>/v1/traces`). Absent: no tracing at all."""

    endpoint: str
    sample_ratio: float = field(default=1.0, metadata=_check(minimum=0, maximum=1))
    # spans wait in a bounded queue and go out in batches from a background thread: a slow or
    # unreachable collector costs dropped spans (counted), never a slower request
    queue_size: int = field(default=2048, metadata=_check(minimum=1, maximum=1_000_000))
    export_interval_s: float = field(default=5.0, metadata=_check(above=0, maximum=3600))
    timeout_s: float = field(default=10.0, metadata=_check(above=0, maximum=300))


@dataclass(frozen=True, slots=True)
class Webhooks:
    """How the gateway polls tasks that carry an `X-Callback-URL`, and delivers their webhooks
    (gateway/webhooks.py)."""

    poll_interval_s: float = field(default=5.0, metadata=_check(minimum=0.1, maximum=DAY_S))
    max_poll_interval_s: float = field(default=60.0, metadata=_check(minimum=0.1, maximum=DAY_S))
    max_task_age_s: float = field(default=DAY_S, metadata=_check(above=0, maximum=TEN_YEARS_S))
    timeout_s: float = field(default=10.0, metadata=_check(above=0, maximum=300))
    first_retry_s: float = field(default=5.0, metadata=_check(minimum=0.1, maximum=DAY_S))
    max_retry_interval_s: float = field(default=3600.0,
                                        metadata=_check(minimum=0.1, maximum=DAY_S))
    retry_for_s: float = field(default=DAY_S, metadata=_check(minimum=0, maximum=30 * DAY_S))
    keep_failed_s: float = field(default=7 * DAY_S,
                                 metadata=_check(above=0, maximum=365 * DAY_S))
    concurrency: int = field(default=16, metadata=_check(minimum=1, maximum=1000))
    tick_s: float = field(default=1.0, metadata=_check(minimum=0.01, maximum=3600))


@dataclass(frozen=True, slots=True)
class Metrics:
    """`bearer_token`: when set, GET /metrics needs `Authorization: Bearer <token>`."""

    bearer_token: str | None = field(default=None, repr=False, metadata=_check(secret=True))


@dataclass(frozen=True, slots=True)
class Logging:
    level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True


@dataclass(frozen=True, slots=True)
class Config:
    listen: Listen = Listen()
    upstream: Upstream = Upstream()
    store: Store = Store()
    cache: Cache = Cache()
    pricing: Pricing = Pricing()
    teams: Mapping[str, Team] = field(default_factory=dict)
    admin: Admin = Admin()
    auth: Auth = Auth()
    attribution: Attribution = Attribution()
    ledger: Ledger = Ledger()
    tracing: Tracing | None = None
    webhooks: Webhooks = Webhooks()
    logging: Logging = Logging()
    metrics: Metrics = Metrics()

    def price(self, model: str) -> float:
        """Credits reserved for one call of `model` before it is forwarded."""
        return self.pricing.models.get(model, self.pricing.default)


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file; raise `ConfigError` with a one-line message."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return parse(text, env)


def parse(text: str, env: Mapping[str, str] | None = None) -> Config:
    try:
        raw = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "config"
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{where}: {problem}") from None
    raw = _interpolate({} if raw is None else raw, os.environ if env is None else env, "")
    return from_dict(raw)


def from_dict(raw: Mapping[str, Any]) -> Config:
    """Build a config from an already-parsed mapping (tests and tools)."""
    config: Config = _build(Config, raw, "")
    _validate(config)
    return config


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys instead of keeping the last one."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _interpolate(value: Any, env: Mapping[str, str], path: str) -> Any:
    """Replace `${VAR}` / `${VAR:-default}`; a value that is one whole reference is read as YAML."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env, _join(path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"{path}: environment variable {name} is not set")

    result = _VAR.sub(substitute, value)
    if _VAR.fullmatch(value) and result:
        try:
            scalar = yaml.safe_load(result)
        except yaml.YAMLError:
            return result
        return scalar if isinstance(scalar, (int, float, bool)) else result
    return result


def _join(path: str, key: Any) -> str:
    """`path.key`; a key with a control character is quoted, so the message stays one line."""
    name = key if isinstance(key, str) and key.isprintable() else repr(key)
    return f"{path}.{name}" if path else str(name)


def _build(cls: type[Any], raw: Any, path: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {_kind(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise ConfigError(f"{_join(path, unknown[0])}: unknown field")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        where = _join(path, name)
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: required field is missing")
            continue
        values[name] = _coerce(hints[name], raw[name], where, f.metadata)
    return cls(**values)


def _coerce(hint: Any, value: Any, path: str, meta: Mapping[str, Any]) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, path, meta)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(str(a) for a in args)
            raise ConfigError(f"{path}: must be one of {choices}, got {_show(value, meta)}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {_kind(value)}")
        return tuple(_coerce(args[0], v, f"{path}[{i}]", meta) for i, v in enumerate(value))
    if origin in (Mapping, dict) or hint is Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {_kind(value)}")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or not k:
                raise ConfigError(f"{_join(path, k)}: expected a non-empty name")
            out[k] = _coerce(args[1], v, _join(path, k), meta)
        return types.MappingProxyType(out)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    return _scalar(hint, value, path, meta)


def _scalar(hint: Any, value: Any, path: str, meta: Mapping[str, Any]) -> Any:
    if hint is datetime:
        return instant(value, path)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_show(value, meta)}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_kind(value)}")
        pattern = meta.get("pattern")
        if pattern is not None and not pattern.fullmatch(value):
            if meta.get("hint"):
                raise ConfigError(f"{path}: must be {meta['hint']}")
            raise ConfigError(f"{path}: {_show(value, meta)} is not a valid value")
        return value
    numeric = (int,) if hint is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, numeric):
        kind = "an integer" if hint is int else "a number"
        raise ConfigError(f"{path}: expected {kind}, got {_show(value, meta)}")
    if not math.isfinite(value):
        raise ConfigError(f"{path}: must be a finite number, got {value}")
    minimum, maximum, above = meta.get("minimum"), meta.get("maximum"), meta.get("above")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{path}: must be at least {minimum:g}, got {value}")
    if above is not None and value <= above:
        raise ConfigError(f"{path}: must be greater than {above:g}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{path}: must be at most {maximum:g}, got {value}")
    return hint(value)


def instant(value: Any, path: str) -> datetime:
    """A time with its timezone (`2027-03-01T00:00:00Z`, `...+02:00`), as an aware UTC datetime.

    YAML reads an unquoted time as a datetime: accepted when it carries a timezone."""
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            raise ConfigError(f"{path}: the time needs a timezone, e.g. 2027-03-01T00:00:00Z")
        return value.astimezone(UTC)
    if not isinstance(value, str) or not _INSTANT.fullmatch(value):
        shown = repr(value) if isinstance(value, str) else _kind(value)
        raise ConfigError(f"{path}: expected a time with a timezone, like 2027-03-01T00:00:00Z, "
                          f"got {shown}")
    try:
        return datetime.fromisoformat(value).astimezone(UTC)
    except ValueError:
        raise ConfigError(f"{path}: {value!r} is not a valid time") from None


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            type(None): "nothing"}.get(type(value), type(value).__name__)


def _show(value: Any, meta: Mapping[str, Any]) -> str:
    return "a hidden value" if meta.get("secret") else repr(value)


def _validate(config: Config) -> None:
    """Rules that span fields."""
    seen_hash: dict[str, str] = {}
    seen_id: dict[str, str] = {}
    owners = [(f"teams.{name}", team.keys) for name, team in config.teams.items()]
    owners.append(("admin", config.admin.keys))
    for owner, keys in owners:
        for i, key in enumerate(keys):
            where = f"{owner}.keys[{i}]"
            secrets = [(where, key.sha256)]
            secrets += [(f"{where}.previous[{j}]", p.sha256) for j, p in enumerate(key.previous)]
            for at, digest in secrets:
                if digest in seen_hash:
                    raise ConfigError(f"{at}.sha256: duplicate key hash (also {seen_hash[digest]})")
                seen_hash[digest] = at
            if key.id in seen_id:
                also = seen_id[key.id]
                raise ConfigError(f"{where}.id: duplicate key id {key.id!r} (also {also})")
            seen_id[key.id] = where
            _validate_lifetime(key, where)
            if owner == "admin" and (key.requests_per_minute or key.requests_per_day
                                     or key.budget):
                raise ConfigError(f"{where}: admin keys take no requests_per_minute, "
                                  "requests_per_day or budget (they are not proxied)")
    problem = _base_url_problem(config.upstream.base_url)
    if problem is not None:
        raise ConfigError(f"upstream.base_url: {problem}")
    problem = _store_url_problem(config.store.url)
    if problem is not None:
        raise ConfigError(f"store.url: {problem}")
    for name in config.teams:
        if not _NAME.fullmatch(name):
            raise ConfigError(f"{_join('teams', name)}: team names use letters, digits, '_', "
                              "'.', '-'")
    rpm = config.upstream.requests_per_minute
    if rpm is not None and config.upstream.burst > rpm:
        raise ConfigError("upstream.burst: must not exceed upstream.requests_per_minute")
    if config.ledger.url is not None:
        _check_postgres_url(config.ledger.url)
    if config.ledger.batch_rows > 10000:
        raise ConfigError("ledger.batch_rows: must be at most 10000")
    if config.tracing is not None:
        problem = _base_url_problem(config.tracing.endpoint)
        if problem is not None and "credentials" in problem:
            problem = ("must not carry credentials (give the collector's headers in "
                       "OTEL_EXPORTER_OTLP_HEADERS)")
        if problem is not None:
            raise ConfigError(f"tracing.endpoint: {problem}")
    for i, endpoint in enumerate(config.cache.endpoints):
        if endpoint.strip("/") != endpoint or not endpoint:
            raise ConfigError(f"cache.endpoints[{i}]: write the path without slashes at the ends")
    token = config.metrics.bearer_token
    problem = None if token is None else _token_problem(token, "token", MIN_TOKEN_CHARS)
    if problem is not None:
        raise ConfigError(f"metrics.bearer_token: {problem}")
    _validate_accounts(config)
    if config.auth.jwt is not None:
        _validate_jwt(config.auth.jwt)
    _validate_attribution(config.attribution)
    _validate_webhooks(config)


DEFAULT_ACCOUNT = "default"  # the account `upstream.api_key` stands for


def accounts_of(upstream: Upstream) -> tuple[UpstreamAccount, ...]:
    """The upstream accounts: `upstream.accounts`, or the one `upstream.api_key` names."""
    if upstream.accounts:
        return upstream.accounts
    return (UpstreamAccount(DEFAULT_ACCOUNT, upstream.api_key, upstream.requests_per_minute,
                            upstream.burst),)


def _validate_accounts(config: Config) -> None:
    """`upstream.api_key` (one account) or `upstream.accounts`; every team can reach one, and
    the reserved minimums fit in what the accounts allow."""
    upstream = config.upstream
    if not upstream.accounts:
        problem = _api_key_problem(upstream.api_key)
        if problem is not None:
            raise ConfigError(f"upstream.api_key: {problem}")
    elif upstream.api_key:
        raise ConfigError("upstream.api_key: give either api_key (one account) or accounts")
    seen: dict[str, int] = {}
    for i, account in enumerate(upstream.accounts):
        where = f"upstream.accounts[{i}]"
        if account.id in seen:
            raise ConfigError(f"{where}.id: duplicate account id {account.id!r} "
                              f"(also upstream.accounts[{seen[account.id]}])")
        seen[account.id] = i
        problem = _api_key_problem(account.api_key)
        if problem is not None:
            raise ConfigError(f"{where}.api_key: {problem}")
        rpm = account.requests_per_minute
        if rpm is not None and account.burst > rpm:
            raise ConfigError(f"{where}.burst: must not exceed requests_per_minute")
        for j, name in enumerate(account.teams or ()):
            if name not in config.teams:
                raise ConfigError(f"{where}.teams[{j}]: no team is named {name!r}")
    keys = [a.api_key for a in upstream.accounts]
    if len(set(keys)) != len(keys):
        raise ConfigError("upstream.accounts: two accounts have the same key (not shown)")
    accounts = accounts_of(upstream)
    reserved = 0
    for name, team in config.teams.items():
        where = _join("teams", name)
        usable = [a.requests_per_minute for a in accounts if a.teams is None or name in a.teams]
        if not usable:
            raise ConfigError(f"{where}: no upstream account may serve this team (each lists "
                              "other teams)")
        minimum = team.upstream_min_per_minute
        if minimum and None not in usable and minimum > sum(r or 0 for r in usable):
            raise ConfigError(f"{where}.upstream_min_per_minute: more than the accounts this "
                              "team may use allow")
        reserved += minimum
    limits = [a.requests_per_minute for a in accounts]
    if reserved and None not in limits and reserved > sum(r or 0 for r in limits):
        raise ConfigError("teams: the upstream_min_per_minute of all teams add up to more than "
                          "the upstream accounts allow")


_VISIBLE = re.compile(r"[!-~]+")  # visible ASCII: no space, no control character
_PORT = re.compile(r"[0-9]{1,5}")
_NODE = re.compile(r"(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})")
_DB = re.compile(r"[0-9]{1,5}")
_STORE_SCHEMES = ("memory", "unix", "redis", "rediss", "redis+sentinel", "rediss+sentinel",
                  "redis+cluster", "rediss+cluster")
MAX_KEY_CHARS = 4096
MIN_TOKEN_CHARS = 16


def _api_key_problem(key: str) -> str | None:
    """The upstream key goes into an `Authorization` header as is: it must be there, and be a
    token of visible ASCII. Messages never show it."""
    if not key.strip():
        return ("is missing or empty: set the organisation's API in One key "
                "(api_key: ${APIINONE_API_KEY})")
    return _token_problem(key, "key", 1)


def _token_problem(token: str, what: str, min_chars: int) -> str | None:
    """A secret sent or compared as a Bearer token: visible ASCII, nothing around it."""
    if token != token.strip():
        return (f"has whitespace at its start or end (a secret file's trailing newline?); "
                f"the {what} is not shown")
    if not min_chars <= len(token) <= MAX_KEY_CHARS:
        return f"must be {min_chars} to {MAX_KEY_CHARS} characters; the {what} is not shown"
    if not _VISIBLE.fullmatch(token):
        return ("must be visible ASCII characters only (no spaces, no control characters); "
                f"the {what} is not shown")
    return None


def _port_problem(netloc: str) -> str | None:
    """A port after the host (credentials and IPv6 brackets aside) must be 1-65535."""
    tail = netloc.rpartition("@")[2].rpartition("]")[2]
    if ":" not in tail:
        return None
    port = tail.rpartition(":")[2]
    if _PORT.fullmatch(port) and 1 <= int(port) <= 65535:
        return None
    return f"the port must be 1-65535, got {port!r}"


def _base_url_problem(url: str) -> str | None:
    """http(s), a host, an optional port and path; no credentials, query or fragment."""
    if not _VISIBLE.fullmatch(url):
        return "must be a URL without spaces or control characters"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not url.lower().startswith(parts.scheme + "://"):
        return "must start with http:// or https://"
    if "@" in parts.netloc:
        return "must not carry credentials (the key is upstream.api_key)"
    if not parts.hostname:
        return "names no host"
    if parts.query or parts.fragment or "?" in url or "#" in url:
        return "must have no query or fragment"
    return _port_problem(parts.netloc)


def _store_url_problem(url: str) -> str | None:
    """The forms `gateway.store.open_store` reads; messages never show a password."""
    if not _VISIBLE.fullmatch(url):
        return "must be a URL without spaces or control characters"
    scheme, sep, rest = url.partition("://")
    if scheme not in _STORE_SCHEMES or not sep:
        return f"unsupported scheme in {url.split('://')[0]!r}"
    if scheme == "memory":
        return "memory:// takes nothing after it" if rest else None
    if scheme == "unix":
        return None if len(rest) > 1 and rest.startswith("/") else "unix:// needs the socket's path"
    if scheme in ("redis", "rediss"):
        parts = urlsplit(url)
        if not parts.hostname:
            return "names no host"
        db = parts.path.strip("/")
        if db and not _DB.fullmatch(db):
            return f"the database must be a number, got {db!r}"
        return _port_problem(parts.netloc)
    hosts, _, path = rest.rpartition("@")[2].partition("/")
    if not hosts:
        return "names no host"
    for node in hosts.split(","):
        match = _NODE.fullmatch(node)
        if match is None or not 1 <= int(match.group(1)) <= 65535:
            return f"each node must be host:port (port 1-65535), got {node!r}"
    if scheme.endswith("+cluster"):
        if path:
            return "a cluster has no database number; write redis+cluster://host:port,..."
        return None
    service, _, db = path.partition("/")
    if not service:
        return "needs the service name: redis+sentinel://host:port,.../<service>[/db]"
    if db and not _DB.fullmatch(db):
        return f"the database must be a number, got {db!r}"
    return None


def _validate_lifetime(key: Key, where: str) -> None:
    if key.not_before is not None and key.expires_at is not None \
            and key.not_before >= key.expires_at:
        raise ConfigError(f"{where}.expires_at: must be later than not_before")
    for j, previous in enumerate(key.previous):
        if key.expires_at is not None and previous.expires_at > key.expires_at:
            raise ConfigError(f"{where}.previous[{j}].expires_at: must not be later than the "
                              "key's expires_at")


_LOOPBACK_NAMES = ("localhost",)


def _validate_jwt(jwt: Jwt) -> None:
    url = urlsplit(jwt.jwks_url)
    host = url.hostname or ""
    try:
        loopback = host in _LOOPBACK_NAMES or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not host or url.scheme not in ("https", "http") or (url.scheme == "http" and not loopback):
        raise ConfigError("auth.jwt.jwks_url: must be an https:// URL (http:// only to a "
                          "loopback address)")
    bounds = {"leeway_s": (jwt.leeway_s, 300.0), "jwks_timeout_s": (jwt.jwks_timeout_s, 30.0),
              "jwks_refresh_s": (jwt.jwks_refresh_s, 86400.0),
              "jwks_cooldown_s": (jwt.jwks_cooldown_s, jwt.jwks_refresh_s)}
    for name, (value, most) in bounds.items():
        if not math.isfinite(value) or value > most:
            raise ConfigError(f"auth.jwt.{name}: must be at most {most:g}, got {value}")


def _validate_attribution(attribution: Attribution) -> None:
    if len(attribution.tags) > 32:
        raise ConfigError("attribution.tags: at most 32 tag keys")
    if attribution.max_tags > 32:
        raise ConfigError(f"attribution.max_tags: must be at most 32, got {attribution.max_tags}")
    for name, rule in attribution.tags.items():
        where = f"attribution.tags.{name}"
        if not TAG_KEY.fullmatch(name):
            raise ConfigError(f"{where}: tag keys use lowercase letters, digits, '_' and '-' "
                              "(at most 32, starting with a letter)")
        if (rule.values is None) == (rule.pattern is None):
            raise ConfigError(f"{where}: give either values or pattern")
        if rule.values is not None and not 0 < len(rule.values) <= 256:
            raise ConfigError(f"{where}.values: list between 1 and 256 values")
        if rule.values is not None and len(set(rule.values)) != len(rule.values):
            raise ConfigError(f"{where}.values: a value is listed twice")
        if rule.pattern is not None:
            if not 0 < len(rule.pattern) <= 256:
                raise ConfigError(f"{where}.pattern: must be 1 to 256 characters")
            try:
                re.compile(rule.pattern)
            except re.error as exc:
                raise ConfigError(f"{where}.pattern: not a valid regular expression ({exc})"
                                  ) from None


_PG_QUERY_KEY = re.compile(r"[a-z_]{1,64}")


def _check_postgres_url(url: str) -> None:
    """`ledger.url` holds a password: every message here describes it without echoing it."""
    where = "ledger.url"
    if any(c.isspace() or not c.isprintable() for c in url):
        raise ConfigError(f"{where}: must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(f"{where}: not a valid URL (check the port and brackets)") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"{where}: must start with postgresql:// (or postgres://)")
    if not parts.hostname:
        raise ConfigError(f"{where}: must name a host: postgresql://user@host:5432/database")
    if port == 0:
        raise ConfigError(f"{where}: the port must be between 1 and 65535")
    if not parts.username:
        raise ConfigError(f"{where}: must name a user: postgresql://user@host:5432/database")
    if not _NAME.match(parts.path.removeprefix("/")):
        raise ConfigError(f"{where}: must name a database: postgresql://user@host:5432/database")
    if parts.fragment:
        raise ConfigError(f"{where}: must not have a #fragment")
    for name, _ in parse_qsl(parts.query, keep_blank_values=True):
        if not _PG_QUERY_KEY.fullmatch(name):
            raise ConfigError(f"{where}: query parameters are lowercase names, like sslmode")


def _validate_webhooks(config: Config) -> None:
    for name, team in config.teams.items():
        if team.callbacks is None:
            continue
        where = f"teams.{name}.callbacks"
        allow = team.callbacks.allow
        if not 1 <= len(allow) <= 100:
            raise ConfigError(f"{where}.allow: list 1 to 100 URL patterns")
        for i, pattern in enumerate(allow):
            problem = callbacks.pattern_problem(pattern)
            if problem is not None:
                raise ConfigError(f"{where}.allow[{i}]: {problem}")
        if len(team.callbacks.secrets) > 32:
            raise ConfigError(f"{where}.secrets: at most 32 secrets")
        secrets = [(f"{where}.secret", team.callbacks.secret)]
        for secret_id, secret in team.callbacks.secrets.items():
            at = _join(f"{where}.secrets", secret_id)
            if not _NAME.fullmatch(secret_id):
                raise ConfigError(f"{at}: secret ids use letters, digits, '_', '.', '-'")
            secrets.append((at, secret))
        for at, secret in secrets:
            if not 24 <= len(callbacks.secret_bytes(secret)) <= 64:
                raise ConfigError(f"{at}: must be whsec_ and the base64 of 24 to 64 bytes "
                                  "(the value is not shown)")
    hooks = config.webhooks
    if hooks.max_poll_interval_s < hooks.poll_interval_s:
        raise ConfigError("webhooks.max_poll_interval_s: must be at least poll_interval_s")
    if hooks.max_retry_interval_s < hooks.first_retry_s:
        raise ConfigError("webhooks.max_retry_interval_s: must be at least first_retry_s")
