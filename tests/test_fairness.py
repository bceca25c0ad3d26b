"""The upstream accounts and the fair queue in front of them, in the store (lua/lib_slots.lua).

Requests are admitted and their waiting places asked about as the gateway's waiters would. The
long runs drive the memory store's clock through minutes of simulated time; on Redis (its own
clock) the same runs are short, and only what does not depend on the clock is checked: the
order in which slots are granted.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from gateway.fairness import next_ask
from gateway.store import Store, open_store
from gateway.store.base import AccountPace, Admission, Completion, SlotAsk, Verdict

START = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@dataclass
class Grant:
    ticket: str
    team: str
    account: str
    at: float  # seconds since the start (the memory store's clock; Redis: as the test saw it)
    asked: float  # when the request was admitted


@dataclass
class Sim:
    """Teams sending requests to the store's scheduler, and the grants they got, in order."""

    store: Store
    clock: Clock | None  # None: Redis, on its own clock
    accounts: tuple[AccountPace, ...]
    grants: list[Grant] = field(default_factory=list)
    waiting: dict[str, tuple[str, float]] = field(default_factory=dict)  # ticket -> team, asked
    wake: dict[str, float] = field(default_factory=dict)  # ticket -> when it asks again
    refused: Counter[Verdict] = field(default_factory=Counter)
    # every waiting request asks at every tick: grants are seen in the order they were made
    poll_all: bool = False
    _n: itertools.count[int] = field(default_factory=itertools.count)
    _started: float = 0.0

    async def start(self) -> None:
        self._started = await self._now()

    async def _now(self) -> float:
        if self.clock is not None:
            return self.clock.now - START
        return asyncio.get_running_loop().time()

    async def elapsed(self) -> float:
        return await self._now() - self._started

    async def send(self, team: str, ask: SlotAsk, **kw: Any) -> Verdict:
        ticket = f"{team}-{next(self._n)}"
        result = await self.store.admit(Admission(team=team, key_id="k", ticket=ticket,
                                                  hold_ms=600_000, slot=ask, **kw))
        at = await self.elapsed()
        if result.verdict is Verdict.ADMIT:
            assert result.account is not None
            self.grants.append(Grant(ticket, team, result.account, at, at))
        elif result.verdict is Verdict.QUEUED:
            self.waiting[ticket] = (team, at)
            self.wake[ticket] = at + next_ask(result.wait_s)
        else:
            self.refused[result.verdict] += 1
        return result.verdict

    async def tick(self) -> None:
        """Waiting requests whose turn is expected ask where they stand, when the gateway's
        waiters would (`fairness.next_ask`)."""
        now = await self.elapsed()
        tickets = [t for t in self.waiting if self.poll_all or self.wake[t] <= now + 1e-9]
        claims = await self.store.claim(tickets, self.accounts)
        at = await self.elapsed()
        for ticket, claim in zip(tickets, claims, strict=True):
            if claim.account is not None:
                team, asked = self.waiting.pop(ticket)
                del self.wake[ticket]
                self.grants.append(Grant(ticket, team, claim.account, at, asked))
            else:
                assert not claim.gone, ticket
                self.wake[ticket] = at + next_ask(claim.wait_s)

    async def step(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.now += seconds
        else:
            await asyncio.sleep(seconds)
        await self.tick()

    def waiting_of(self, team: str) -> int:
        return sum(1 for t, _ in self.waiting.values() if t == team)

    def split(self, since: int = 0) -> Counter[str]:
        return Counter(g.team for g in self.grants[since:])


def run(store_url: str, body: Callable[[Store, Clock | None], Awaitable[Any]]) -> Any:
    clock = Clock() if store_url == "memory://" else None

    async def main() -> Any:
        store = open_store(store_url, prefix="fair", clock=clock or Clock())
        await store.connect()
        try:
            return await body(store, clock)
        finally:
            await store.close()

    return asyncio.run(main())


def account(name: str, per_minute: int, burst: int = 1) -> AccountPace:
    return AccountPace(name, 60000.0 / (per_minute - burst + 1), burst, per_minute)


def ask(accounts: tuple[AccountPace, ...], **kw: Any) -> SlotAsk:
    fields: dict[str, Any] = {"usable": tuple(a.id for a in accounts), "max_waiting": 1000,
                              "queue_ms": 3_600_000.0, **kw}
    return SlotAsk(accounts, **fields)


# -- accounts ----------------------------------------------------------------------------------


def test_queued_requests_spread_over_both_accounts_within_their_limits(store_url: str) -> None:
    """Two accounts at 6 a minute; 20 requests at once: spread over both, and neither account
    grants more than 6 slots in any 60 s window (minutes of simulated time on memory)."""

    async def body(store: Store, clock: Clock | None) -> None:
        per_minute = 6 if clock is not None else 1200  # Redis: its own clock, short intervals
        accounts = (account("a", per_minute), account("b", per_minute))
        sim = Sim(store, clock, accounts, poll_all=True)  # grants seen when they are made
        await sim.start()
        for _ in range(20):
            assert await sim.send("t", ask(accounts)) in (Verdict.ADMIT, Verdict.QUEUED)
        while sim.waiting:
            await sim.step(1.0 if clock is not None else 0.01)
        used = Counter(g.account for g in sim.grants)
        assert used == {"a": 10, "b": 10}
        if clock is None:
            return
        for name in ("a", "b"):
            times = [g.at for g in sim.grants if g.account == name]
            for start in times:
                assert sum(1 for t in times if start <= t < start + 60) <= 6
        assert max(g.at for g in sim.grants) == 90  # the 20th slot comes after 9 intervals

    run(store_url, body)


def test_an_account_out_of_rotation_gets_nothing_until_nothing_else_is_left(
        store_url: str) -> None:
    async def body(store: Store, _: Clock | None) -> None:
        accounts = (AccountPace("a", 0.0, 1), AccountPace("b", 0.0, 1))  # unpaced
        sim = Sim(store, None, accounts)
        (states, was_up) = await store.account_states(accounts, down=("a", 600.0, 402))
        assert was_up and states[0].down_s > 0 and states[1].down_s == 0
        assert (states[0].down_status, states[1].down_status) == (402, None)
        _, again = await store.account_states(accounts, down=("a", 600.0, 402))
        assert not again  # already out: said once
        for _ in range(4):
            await sim.send("t", ask(accounts))
        assert {g.account for g in sim.grants} == {"b"}
        states, _ = await store.account_states(accounts, down=("b", 600.0, 401))
        assert [(s.down_status, s.slots_used) for s in states] == [(402, 0), (401, 4)]
        result = await store.admit(Admission(team="t", key_id="k", ticket="probe",
                                             hold_ms=1000, slot=ask(accounts)))
        assert result.verdict is Verdict.ADMIT and result.probe  # nothing else is left
        states, _ = await store.account_states(accounts, up="a")
        assert (states[0].down_s, states[0].down_status) == (0, None)
        result = await store.admit(Admission(team="t", key_id="k", ticket="back",
                                             hold_ms=1000, slot=ask(accounts)))
        assert (result.account, result.probe) == ("a", False)
        refused = await store.admit(Admission(team="t", key_id="k", ticket="none",
                                              hold_ms=1000, slot=ask(accounts, usable=())))
        assert refused.verdict is Verdict.UNAVAILABLE

    run(store_url, body)


def test_an_account_kept_for_some_teams_serves_only_them(store_url: str) -> None:
    async def body(store: Store, _: Clock | None) -> None:
        accounts = (AccountPace("shared", 0.0, 1), AccountPace("studio", 0.0, 1))
        sim = Sim(store, None, accounts)
        for _ in range(6):
            await sim.send("research", ask(accounts, usable=("shared",)))
            await sim.send("studio", ask(accounts))
        by_team = {team: {g.account for g in sim.grants if g.team == team}
                   for team in ("research", "studio")}
        assert by_team == {"research": {"shared"}, "studio": {"shared", "studio"}}

    run(store_url, body)


def test_a_task_is_polled_through_the_account_that_created_it(store_url: str) -> None:
    async def body(store: Store, _: Clock | None) -> None:
        accounts = (AccountPace("a", 0.0, 1), AccountPace("b", 0.0, 1))
        await store.finish(Completion("t", "create", task_owner=("task_1", 60_000),
                                      task_account="b"))
        assert await store.task_account("t", "task_1") == "b"
        for i in range(3):
            poll = await store.admit(Admission(team="t", key_id="k", ticket=f"poll{i}",
                                               hold_ms=1000, task_id="task_1",
                                               slot=ask(accounts)))
            assert (poll.verdict, poll.account, poll.task_account) == (Verdict.ADMIT, "b", "b")
        other = await store.admit(Admission(team="t", key_id="k", ticket="other",
                                            hold_ms=1000, slot=ask(accounts)))
        assert other.account == "a"  # the one free longest

    run(store_url, body)


def test_the_balance_to_watch_counts_down_and_starts_again_when_it_changes(
        store_url: str) -> None:
    async def body(store: Store, _: Clock | None) -> None:
        paces = (AccountPace("a", 0.0, 1, None, 10_000), AccountPace("b", 0.0, 1))
        states, _ = await store.account_states(paces, spend=[("a", 2_500), ("a", 500)])
        assert [(s.credits_left, s.slots_free) for s in states] == [(7_000, None), (None, None)]
        topped_up = (replace(paces[0], credits=50_000), paces[1])
        states, _ = await store.account_states(topped_up, spend=[("a", 1_000)])
        assert states[0].credits_left == 49_000

    run(store_url, body)


# -- the fair queue ----------------------------------------------------------------------------


def test_a_light_team_is_served_within_one_slot_while_another_floods(store_url: str) -> None:
    """Team A keeps 200 requests waiting; team B sends one a second. Each of B's requests gets
    the next slot: on memory, within one slot interval, over three minutes of simulated time,
    and A gets every other slot (nothing is left idle); on Redis (every waiting request asking
    at every tick, so that grants are seen in order), at most one of A's slots, already due,
    goes out between B's request and its own."""

    async def body(store: Store, clock: Clock | None) -> None:
        simulated = clock is not None
        slot_s = 0.25 if simulated else 0.04
        accounts = (account("main", round(60 / slot_s)),)
        sim = Sim(store, clock, accounts, poll_all=not simulated)
        await sim.start()
        flood = ask(accounts)
        for _ in range(200):
            await sim.send("A", flood)
        next_b, b_every = 0.01, 1.0 if simulated else 0.2
        duration = 180.0 if simulated else 3.0
        b_sent = 0
        while await sim.elapsed() < duration:
            await sim.step(0.0625 if simulated else 0.005)
            if await sim.elapsed() >= next_b:
                await sim.send("B", ask(accounts))
                b_sent += 1
                next_b += b_every
            while sim.waiting_of("A") < 200:
                await sim.send("A", flood)
        b_grants = [i for i, g in enumerate(sim.grants) if g.team == "B"]
        assert len(b_grants) >= b_sent - 1  # the last may still be waiting
        for i in b_grants:
            grant = sim.grants[i]
            if simulated:
                assert grant.at - grant.asked <= slot_s + 1e-6, grant
            else:
                between = [g for g in sim.grants[:i] if g.at >= grant.asked and g.team == "A"]
                assert len(between) <= 1, (grant, between)
        if simulated:  # every slot of the three minutes was used
            assert len(sim.grants) == pytest.approx(duration / slot_s, abs=2)
            assert sim.split()["B"] == len(b_grants) >= 179

    run(store_url, body)


@pytest.mark.parametrize(("weights", "share"), [((3, 1), 0.75), ((1, 1), 0.5)])
def test_backlogged_teams_split_the_slots_by_weight(store_url: str, weights: tuple[int, int],
                                                    share: float) -> None:
    """Both teams keep 50 requests waiting: the slots split by weight, over three minutes of
    simulated time on memory (1.6 s on Redis), and in every stretch of 40 slots."""

    async def body(store: Store, clock: Clock | None) -> None:
        simulated = clock is not None
        slot_s = 0.25 if simulated else 0.02
        accounts = (account("main", round(60 / slot_s)),)
        sim = Sim(store, clock, accounts)
        await sim.start()
        sim.poll_all = True  # grants seen in the order they are made
        asks = {"A": ask(accounts, weight=weights[0]), "C": ask(accounts, weight=weights[1])}
        for _ in range(50):  # both floods arrive together
            for team in ("A", "C"):
                await sim.send(team, asks[team])
        start = len(sim.grants)
        slots = 720 if simulated else 80
        while len(sim.grants) < start + slots:
            await sim.step(slot_s if simulated else 0.005)
            for team in ("A", "C"):
                while sim.waiting_of(team) < 50:
                    await sim.send(team, asks[team])
        grants = sim.grants[start:start + slots]
        assert sum(g.team == "A" for g in grants) / slots == pytest.approx(share, rel=0.1)
        for first in range(0, slots, 40):  # in order, not only in total
            stretch = grants[first:first + 40]
            assert sum(g.team == "A" for g in stretch) / 40 == pytest.approx(share, abs=0.1)

    run(store_url, body)


def test_an_idle_teams_share_goes_to_the_busy_one(store_url: str) -> None:
    async def body(store: Store, clock: Clock | None) -> None:
        simulated = clock is not None
        slot_s = 0.5 if simulated else 0.02
        accounts = (account("main", round(60 / slot_s)),)
        sim = Sim(store, clock, accounts)
        await sim.start()
        await sim.send("idle", ask(accounts, weight=100))  # a big share, not used
        for _ in range(50):
            await sim.send("busy", ask(accounts))
        while sim.waiting:
            await sim.step(0.125 if simulated else 0.005)
        assert sim.split() == {"idle": 1, "busy": 50}
        if simulated:  # one slot every interval from the start: none left idle
            assert max(g.at for g in sim.grants) == pytest.approx(50 * slot_s)

    run(store_url, body)


def test_a_reserved_minimum_is_served_first_when_below_it() -> None:
    """Team M weighs little, but 60 slots a minute (a quarter of the account) are its own.
    A per-minute minimum needs minutes: simulated on the memory store's clock only."""

    async def body(store: Store, clock: Clock | None) -> None:
        assert clock is not None
        accounts = (account("main", 240),)
        sim = Sim(store, clock, accounts)
        await sim.start()
        asks = {"A": ask(accounts, weight=10),
                "M": ask(accounts, weight=1, min_interval_ms=1000.0)}
        while await sim.elapsed() < 120:
            for team in ("A", "M"):
                while sim.waiting_of(team) < 100:
                    await sim.send(team, asks[team])
            await sim.step(0.0625)
        split = sim.split()
        assert split["M"] >= 118  # one a second, over two minutes
        assert split["M"] / len(sim.grants) < 0.3  # and not much more than its minimum

    run("memory://", body)


# -- waiting places --------------------------------------------------------------------------


def test_a_team_may_keep_only_max_waiting_requests_waiting(store_url: str) -> None:
    async def body(store: Store, clock: Clock | None) -> None:
        accounts = (account("main", 1),)  # one slot a minute: nothing frees up meanwhile
        sim = Sim(store, clock, accounts)
        few = ask(accounts, max_waiting=2)
        verdicts = [await sim.send("t", few) for _ in range(4)]
        assert verdicts == [Verdict.ADMIT, Verdict.QUEUED, Verdict.QUEUED, Verdict.QUEUE_FULL]
        assert await sim.send("u", few) is Verdict.QUEUED  # another team has its own places
        leaving = next(iter(sim.waiting))
        (left,) = await store.claim([leaving], accounts, leave=True)
        assert left.gone and left.wait_s > 0  # it says how long it still had to wait
        del sim.waiting[leaving]
        assert await sim.send("t", few) is Verdict.QUEUED  # the place it left is free

    run(store_url, body)


def test_a_request_is_refused_at_once_when_its_turn_would_come_too_late(
        store_url: str) -> None:
    async def body(store: Store, clock: Clock | None) -> None:
        accounts = (account("main", 1),)  # one slot a minute
        sim = Sim(store, clock, accounts)
        short = ask(accounts, queue_ms=90_000.0)
        verdicts = [await sim.send("t", short) for _ in range(3)]
        assert verdicts == [Verdict.ADMIT, Verdict.QUEUED, Verdict.PACE]
        result = await store.admit(Admission(team="t", key_id="k", ticket="late",
                                             hold_ms=1000, slot=short))
        assert result.retry_after_s == pytest.approx(30, abs=0.5)  # 120 s away, 90 allowed

    run(store_url, body)


def test_places_of_requests_that_died_expire() -> None:
    """Expiry needs the clock driven: the memory store's only."""

    async def body(store: Store, clock: Clock | None) -> None:
        assert clock is not None
        accounts = (account("main", 1),)  # one slot a minute
        few = ask(accounts, max_waiting=1, queue_ms=120_000.0)

        async def send(ticket: str) -> Verdict:
            return (await store.admit(Admission(team="t", key_id="k", ticket=ticket,
                                                hold_ms=1000, slot=few))).verdict

        assert [await send("a"), await send("b"), await send("c")] == [
            Verdict.ADMIT, Verdict.QUEUED, Verdict.QUEUE_FULL]
        # b's waiter dies: nobody asks about b again
        clock.now += 60  # b's turn: its slot is granted, so its place is free again
        assert await send("d") is Verdict.QUEUED
        clock.now += 180  # d's place expired unserved, and b's slot was never claimed
        assert [c.gone for c in await store.claim(["b", "d"], accounts)] == [True, True]
        assert [await send("e"), await send("f")] == [Verdict.ADMIT, Verdict.QUEUED]

    run("memory://", body)
