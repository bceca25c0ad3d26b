"""The upstream accounts: how each is paced, which teams may use it, and how it is doing.

`Accounts` is compiled once per config load from `upstream.accounts` (or the one account that
`upstream.api_key` stands for). Keys stay in `Accounts.keys` and `upstream.Upstream`: everywhere
else (the store, metric labels, log lines, errors) an account is only its id.

`Health` keeps the accounts' shared state in step: an account that refuses its key (401) or has
no credits left (402) is taken out of rotation for `upstream.account_down_s`, for every replica
(the store schedules around it); it is back when that time is up, or as soon as a request that
had no other account left goes through it and succeeds. Credits spent through each account are
counted in the store (batched, with the heartbeat) against the balance to watch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from . import config as cfg
from .budget import from_milli, to_milli
from .metrics import Metrics
from .store import Store, StoreError
from .store.base import AccountPace, AccountState, SlotAsk

log = logging.getLogger("gateway")


def pace_of(per_minute: int | None, burst: int) -> tuple[float, int]:
    """(interval ms, burst) of the GCRA that keeps an account under its limit: with burst B and
    one slot every 60/(R-B+1) s, no 60 s window ever holds more than R requests."""
    if per_minute is None:
        return 0.0, 1
    return 60000.0 / (per_minute - burst + 1), burst


@dataclass(frozen=True, slots=True)
class Accounts:
    paces: tuple[AccountPace, ...]  # every account, in the config's order
    usable: Mapping[str, tuple[str, ...]]  # team -> the accounts it may use
    keys: Mapping[str, str] = field(repr=False)  # account -> its API key
    down_s: float  # how long an account that refused its key stays out of rotation
    # the one account, when there is nothing to choose and nothing to pace: no slot is taken
    only: str | None = None

    def per_minute(self, team: str) -> int | None:
        """What the accounts a team may use allow together (None: one of them is unpaced)."""
        limits = [p.per_minute for p in self.paces if p.id in self.usable.get(team, ())]
        return None if None in limits else sum(limit or 0 for limit in limits)

    def ask(self, team: str, team_config: cfg.Team, queue_timeout_s: float) -> SlotAsk | None:
        """What the team's requests ask of the store for a slot; None when none is needed."""
        if self.only is not None:
            return None
        minimum = team_config.upstream_min_per_minute
        return SlotAsk(self.paces, self.usable[team], weight=team_config.upstream_weight,
                       min_interval_ms=60000.0 / minimum if minimum else 0.0,
                       max_waiting=team_config.max_waiting, queue_ms=queue_timeout_s * 1000.0)


def compile_accounts(upstream: cfg.Upstream, teams: Iterable[str]) -> Accounts:
    accounts = cfg.accounts_of(upstream)
    paces = []
    for account in accounts:
        interval, burst = pace_of(account.requests_per_minute, account.burst)
        credits = None if account.credits is None else to_milli(account.credits)
        paces.append(AccountPace(account.id, interval, burst, account.requests_per_minute,
                                 credits))
    usable = {team: tuple(a.id for a in accounts if a.teams is None or team in a.teams)
              for team in teams}
    only = accounts[0].id if len(accounts) == 1 and paces[0].interval_ms == 0 else None
    return Accounts(tuple(paces), usable, {a.id: a.api_key for a in accounts},
                    upstream.account_down_s, only)


class Health:
    """Accounts in and out of rotation, their gauges, and the credits spent through them."""

    def __init__(self, store: Store, metrics: Metrics,
                 accounts: Callable[[], Accounts]) -> None:
        self._store = store
        self._metrics = metrics
        self._accounts = accounts
        self._spent: dict[str, int] = {}  # millicredits not yet counted in the store

    async def refused(self, account: str, status: int) -> None:
        """`account` answered 401 (its key) or 402 (its credits): out of rotation, everywhere."""
        self._metrics.upstream_account_up.labels(account).set(0)
        accounts = self._accounts()
        try:
            _, was_up = await self._store.account_states(
                accounts.paces, down=(account, accounts.down_s, status))
        except StoreError:
            self._metrics.store_errors.labels("accounts").inc()
            was_up = True
        if was_up:  # said once per time it goes down, not for every request that finds it so
            log.error("upstream account out of rotation: it refused the key or has no credits",
                      extra={"fields": {"account": account, "upstream_status": status,
                                        "for_s": accounts.down_s}})

    async def recovered(self, account: str) -> None:
        """A request through an account out of rotation went through: it is back."""
        self._metrics.upstream_account_up.labels(account).set(1)
        try:
            await self._store.account_states(self._accounts().paces, up=account)
        except StoreError:
            self._metrics.store_errors.labels("accounts").inc()
            return
        log.warning("upstream account back in rotation", extra={"fields": {"account": account}})

    def spent(self, account: str, millicredits: int) -> None:
        """Credits charged for an answer that came through `account` (counted at the next
        `flush`)."""
        if millicredits > 0:
            self._spent[account] = self._spent.get(account, 0) + millicredits
            self._metrics.upstream_account_spent.labels(account).inc(from_milli(millicredits))

    async def flush(self) -> None:
        """Count the credits spent since the last flush against the balances (with the
        heartbeat); kept for the next one if the store is away."""
        spent, self._spent = self._spent, {}
        if not spent:
            return
        try:
            await self._store.account_states(self._accounts().paces, spend=list(spent.items()))
        except StoreError:
            for account, amount in spent.items():
                self._spent[account] = self._spent.get(account, 0) + amount
            raise

    async def states(self) -> list[AccountState]:
        """Every account's state as the store holds it for all replicas, in the config's
        order."""
        states, _ = await self._store.account_states(self._accounts().paces)
        return states

    async def refresh(self) -> None:
        """The accounts' gauges, from the store (every replica reports the same)."""
        paces = self._accounts().paces
        states = await self.states()
        m = self._metrics
        for pace, state in zip(paces, states, strict=True):
            m.upstream_account_up.labels(pace.id).set(0 if state.down_s > 0 else 1)
            if pace.per_minute is not None:
                m.upstream_account_limit.labels(pace.id).set(pace.per_minute)
            if state.slots_free is not None:
                m.upstream_account_slots_free.labels(pace.id).set(state.slots_free)
            if pace.credits is not None and state.credits_left is not None:
                m.upstream_account_balance.labels(pace.id).set(from_milli(pace.credits))
                m.upstream_account_balance_left.labels(pace.id).set(
                    from_milli(state.credits_left))

