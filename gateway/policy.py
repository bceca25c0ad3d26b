"""What the config means for each request, computed once per config load (and per reload)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import quota as quotas
from .accounts import Accounts, compile_accounts
from .attribution import TagRules
from .auth import Authenticator
from .budget import to_milli
from .config import Budget, Config
from .settlement import CacheRules
from .store.base import LedgerTrim, SlotAsk

MARGIN_S = 5.0  # a lock outlives its holder's deadline by this much


@dataclass(frozen=True, slots=True)
class TeamPolicy:
    name: str
    quotas: tuple[quotas.Quota, ...]
    budget: Budget | None
    budget_limit: int | None  # millicredits
    models: frozenset[str] | None
    policy_header: bytes | None  # RateLimit-Policy
    slot: SlotAsk | None  # what its requests ask for an upstream slot (None: nothing to take)
    upstream_per_minute: int | None  # what the accounts it may use allow (None: unpaced)


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
            windows = []
            if team.requests_per_minute is not None:
                windows.append(quotas.Quota("minute", team.requests_per_minute, 60.0))
            if team.requests_per_day is not None:
                windows.append(quotas.Quota("day", team.requests_per_day, 86400.0))
            self.teams[name] = TeamPolicy(
                name=name,
                quotas=tuple(windows),
                budget=team.budget,
                budget_limit=to_milli(team.budget.credits) if team.budget else None,
                models=frozenset(team.models) if team.models is not None else None,
                policy_header=quotas.policy_header(tuple(windows)).encode() if windows else None,
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
