"""What the config means for each request, computed once per config load (and per reload)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from . import callbacks
from .accounts import Accounts, compile_accounts
from .attribution import TagRules
from .auth import Authenticator
from .budget import to_milli
from .config import Budget, Config, Key
from .quota import Quota, policy_header
from .settlement import CacheRules
from .store.base import LedgerTrim, SlotAsk

MARGIN_S = 5.0  # a lock outlives its holder's deadline by this much


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """A key's own limits inside its team's; `quotas` and `policy_header` include the team's."""

    quotas: tuple[Quota, ...]
    budget: Budget | None
    budget_limit: int | None  # millicredits
    policy_header: bytes | None


@dataclass(frozen=True, slots=True)
class TeamPolicy:
    name: str
    quotas: tuple[Quota, ...]
    budget: Budget | None
    budget_limit: int | None  # millicredits
    models: frozenset[str] | None
    policy_header: bytes | None  # RateLimit-Policy
    slot: SlotAsk | None  # what its requests ask for an upstream slot (None: nothing to take)
    upstream_per_minute: int | None  # what the accounts it may use allow (None: unpaced)
    keys: Mapping[str, KeyPolicy] = field(default_factory=dict)  # keys with limits of their own
    callbacks: callbacks.Rules | None = None  # where its tasks' webhooks may go

    def limits(self, key_id: str) -> tuple[tuple[Quota, ...], bytes | None]:
        """The quota windows a request of `key_id` must fit, and their RateLimit-Policy."""
        key = self.keys.get(key_id)
        return (self.quotas, self.policy_header) if key is None else (key.quotas,
                                                                     key.policy_header)


class Policy:
    """The compiled config: identities, per-team limits, tag rules, pricing, upstream accounts.

    `previous` is the policy this one replaces on a reload: what it fetched (the IdP's keys) is
    kept when the settings it came from did not change."""

    def __init__(self, config: Config, previous: Policy | None = None) -> None:
        self.config = config
        self.teams: dict[str, TeamPolicy] = {}
        self.auth: Authenticator = Authenticator(
            config, previous=previous.auth if previous is not None else None)
        self.tags = TagRules(config.attribution)
        self.key_owner: dict[str, str] = {}
        upstream = config.upstream
        self.accounts: Accounts = compile_accounts(upstream, config.teams)
        for name, team in config.teams.items():
            windows = _windows(team.requests_per_minute, team.requests_per_day)
            self.teams[name] = TeamPolicy(
                name=name,
                quotas=windows,
                budget=team.budget,
                budget_limit=to_milli(team.budget.credits) if team.budget else None,
                models=frozenset(team.models) if team.models is not None else None,
                policy_header=_header(windows),
                keys={key.id: _key_policy(key, windows) for key in team.keys
                      if key.requests_per_minute or key.requests_per_day or key.budget},
                callbacks=None if team.callbacks is None else callbacks.compile_rules(
                    team.callbacks.allow, team.callbacks.secrets),
                slot=self.accounts.ask(name, team, upstream.queue_timeout_s),
                upstream_per_minute=self.accounts.per_minute(name),
            )
            for key in team.keys:
                self.key_owner[key.id] = name
        # The whole upstream call (the wait for a slot, every attempt, reading the body) ends
        # by its deadline, and the locks it holds (flight, idempotency, reservation) outlive it.
        self.deadline_s = upstream.queue_timeout_s + upstream.timeout_s
        self.stream_deadline_s = upstream.queue_timeout_s + upstream.stream_timeout_s
        self.hold_ms = math.ceil((self.deadline_s + MARGIN_S) * 1000)
        cache = config.cache
        self.cache_rules = CacheRules(cache.ttl_s, cache.task_ttl_s, cache.pending_task_ttl_s,
                                      cache.max_entry_bytes)
        self.stream_hold_ms = math.ceil((self.stream_deadline_s + MARGIN_S) * 1000)

    def ledger_trim(self, now: float) -> LedgerTrim:
        """What the ledger keeps: `ledger.retention_days` back from `now`, `max_entries` long."""
        ledger = self.config.ledger
        return LedgerTrim(int((now - ledger.retention_days * 86400) * 1000), ledger.max_entries)


def _windows(per_minute: int | None, per_day: int | None,
             key: str = "") -> tuple[Quota, ...]:
    """A team's (or, with `key`, a key's) quota windows; a key's are named `key-minute` in the
    headers and kept in its own store fields."""
    prefix, out = ("key-" if key else ""), []
    for window, limit, period_s in (("minute", per_minute, 60.0), ("day", per_day, 86400.0)):
        if limit is not None:
            out.append(Quota(prefix + window, limit, period_s,
                                    field=f"k:{key}:{window}" if key else "", key=key))
    return tuple(out)


def _header(windows: tuple[Quota, ...]) -> bytes | None:
    return policy_header(windows).encode() if windows else None


def _key_policy(key: Key, team_windows: tuple[Quota, ...]) -> KeyPolicy:
    windows = team_windows + _windows(key.requests_per_minute, key.requests_per_day, key.id)
    return KeyPolicy(quotas=windows, budget=key.budget,
                     budget_limit=to_milli(key.budget.credits) if key.budget else None,
                     policy_header=_header(windows))
