"""The books match the bill: a seeded storm of requests with random outcomes, after which every
team's spent adds up to what the mock upstream billed, nothing is left reserved, each team's
ledger adds up to its spent, and no budget went below zero.

Outcomes: 2xx, 4xx, 5xx, 429, timeouts, dropped connections, slow drips (within and beyond the
deadline), clients that leave mid-stream, GET and HEAD polls, Idempotency-Key replays, identical
requests in flight together, budget refusals, and, on Redis, the store restarted at random
moments (with an append-only file, so it comes back with its data).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from gateway import config as cfg
from gateway.app import create_app
from gateway.auth import hash_key
from gateway.mock_upstream.app import PRICES
from gateway.tasks import Reconciler

from .conftest import (
    KEYS,
    Mock,
    RedisServer,
    RunningGateway,
    ServerThread,
    base_config,
    eventually,
    team_config,
)

STUDIO_KEY = "aiogw_studio_key_0123456789abcdefghij"
TEAM_KEYS = {**KEYS, "studio": STUDIO_KEY}
BUDGETS = {"research": 150.0, "marketing": None, "studio": 2000.0}
CHAT_FAULTS: list[dict[str, Any] | None] = [
    None, None, None, None, None,
    {"status": 500}, {"status": 429, "retry_after": "1"}, {"status": 400}, {"drop": True},
    {"delay_s": 1.6},  # beyond the 0.8 s deadline: a timeout
    {"drip_s": 0.001},  # a slow body that still arrives
    {"drip_s": 0.05},  # one that does not, before the deadline
]
OPS = ["chat"] * 6 + ["duplicate"] * 3 + ["keyed"] * 2 + ["replay"] + ["stream"] * 2 + [
    "stream_cut", "create"] * 2 + ["poll"] * 3 + ["peek"]


@dataclass
class Storm:
    seed: int
    rng: random.Random = field(init=False)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    keyed: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    tasks: list[tuple[str, str]] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    n: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def credits(self, model: str) -> float:
        """What the upstream reports: anything up to the list price (the pricing table is each
        model's upper bound, so that a budget is a hard limit)."""
        return round(self.rng.uniform(0, PRICES[model]), 3)

    def chat_body(self) -> dict[str, Any]:
        self.n += 1
        content = f"q{self.seed}-{self.n}"
        return {"model": "gemini", "messages": [{"role": "user", "content": content}],
                "mock_credits": self.credits("gemini")}


async def _run_storm(gateway: RunningGateway, mock: Mock, storm: Storm, ops: int,
                     workers: int) -> None:
    rng = storm.rng
    plan = [rng.choice(OPS) for _ in range(ops)]
    teams = [rng.choice(list(TEAM_KEYS)) for _ in range(ops)]
    faults = [rng.choice(CHAT_FAULTS) for _ in range(ops)]
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30,
                                 limits=httpx.Limits(max_connections=workers * 2)) as client:
        async def one(i: int) -> None:
            op, team = plan[i], teams[i]
            headers = {"Authorization": f"Bearer {TEAM_KEYS[team]}"}
            fault = faults[i]
            if fault is not None and op in ("chat", "keyed", "duplicate"):
                await asyncio.to_thread(mock.fault, path="chat", **fault)
            if op in ("chat", "duplicate", "keyed"):
                if op == "duplicate" and storm.bodies:
                    body = rng.choice(storm.bodies[-5:])
                else:
                    body = storm.chat_body()
                    storm.bodies.append(body)
                if op == "keyed":
                    key = f"k{storm.seed}-{i}"
                    storm.keyed.append((team, key, body))
                    headers["Idempotency-Key"] = key
                answer = await client.post("/api/v1/chat/completions", json=body, headers=headers)
            elif op == "replay":
                if not storm.keyed:
                    return
                team, key, body = rng.choice(storm.keyed)
                headers = {"Authorization": f"Bearer {TEAM_KEYS[team]}", "Idempotency-Key": key}
                answer = await client.post("/api/v1/chat/completions", json=body, headers=headers)
            elif op in ("stream", "stream_cut"):
                body = {**storm.chat_body(), "stream": True, "mock_chunk_delay_s": 0.001}
                if op == "stream_cut":
                    body["mock_hold"] = True
                async with client.stream("POST", "/api/v1/chat/completions", json=body,
                                         headers=headers) as streamed:
                    if op == "stream_cut" and streamed.status_code == 200:
                        async for _ in streamed.aiter_raw():
                            break  # the client leaves after the first event
                    else:
                        await streamed.aread()
                    answer = streamed
            elif op == "create":
                model = rng.choice(["flux-2", "kling-3"])
                body = {"model": model, "prompt": f"p{storm.seed}-{i}",
                        "mock_delay_s": round(rng.uniform(0.05, 0.8), 2),
                        "mock_credits": storm.credits(model)}
                outcome = rng.random()
                if outcome < 0.15:
                    body["mock_fail"] = True
                elif outcome < 0.25:
                    body["mock_final"] = rng.choice(["completed", "failed"])
                answer = await client.post("/api/v1/images/generations", json=body,
                                           headers=headers)
                if answer.status_code == 200:
                    storm.tasks.append((team, answer.json()["id"]))
            else:  # poll / peek
                if not storm.tasks:
                    return
                team, task_id = rng.choice(storm.tasks)
                headers = {"Authorization": f"Bearer {TEAM_KEYS[team]}"}
                method = "HEAD" if op == "peek" else "GET"
                answer = await client.request(method, f"/api/v1/tasks/{task_id}", headers=headers)
            storm.statuses[f"{op} {answer.status_code}"] = (
                storm.statuses.get(f"{op} {answer.status_code}", 0) + 1)

        queue = list(range(ops))

        async def worker() -> None:
            while queue:
                await one(queue.pop(0))

        await asyncio.gather(*(worker() for _ in range(workers)))


class Restarts:
    """Kills and restarts a Redis (with its append-only file) at random moments."""

    def __init__(self, server: RedisServer, rng: random.Random) -> None:
        self.server, self.rng = server, rng
        self.stop = threading.Event()
        self.count = 0
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self.stop.wait(self.rng.uniform(0.5, 1.5)):
            self.server.stop()
            time.sleep(self.rng.uniform(0.05, 0.4))  # the outage itself, not a wait for work
            self.server.start()
            self.count += 1


def _gateway(mock: Mock, store_url: str) -> RunningGateway:
    teams = {name: team_config(name) for name in KEYS}
    teams["studio"] = {"keys": [{"id": "studio-key", "sha256": hash_key(STUDIO_KEY)}]}
    for name, credits in BUDGETS.items():
        if credits is not None:
            teams[name]["budget"] = {"credits": credits}
    raw = base_config(mock.api_url, store_url, teams=teams,
                      upstream={"timeout_s": 0.8, "queue_timeout_s": 0, "retries": 1},
                      cache={"endpoints": ["chat/completions"], "pending_task_ttl_s": 0.2},
                      pricing={"default": 10, "models": dict(PRICES)})
    app = create_app(cfg.from_dict(raw), reconcile_interval_s=3600, task_check_s=0.2)
    return RunningGateway(ServerThread(app).start(), app)


def _settle_everything(gateway: RunningGateway, mock: Mock) -> None:
    """Let every task finish upstream, the bookkeeping land, and the reconciler settle the
    tasks nobody polled to the end."""
    eventually(lambda: not mock.client.get("/_mock/bill").json()["pending_tasks"],
               "every task finished upstream", timeout=30)
    mock.release()
    gateway.drain()
    reconciler = Reconciler(gateway.app.runtime)

    def settled() -> bool:  # held reservations come due task_check_s after their last check
        gateway.run(reconciler.once())
        gateway.drain()
        return not any(gateway.run(gateway.app.runtime.store.reservations(t)) for t in TEAM_KEYS)

    eventually(settled, "every reservation settled")


def _ledger(gateway: RunningGateway, team: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    after = None
    while True:
        page = gateway.admin("GET", f"teams/{team}/ledger",
                             params={"limit": 1000, **({"after": after} if after else {})}).json()
        entries += page["entries"]
        after = page["next"]
        if after is None:
            return entries


def _differences(bill: dict[str, Any], ledgers: dict[str, list[dict[str, Any]]]
                 ) -> list[tuple[str, float, float]]:
    """Answers (not tasks) billed and charged differently: (request id, billed, charged)."""
    billed: dict[str, float] = {}
    for request_id, credits in bill["items"]:
        billed[request_id] = billed.get(request_id, 0) + credits
    charged: dict[str, float] = {}
    for entries in ledgers.values():
        for e in entries:
            if e["route"] == "chat/completions":
                charged[e["request_id"]] = charged.get(e["request_id"], 0) + e["credits"]
    return [(rid, billed.get(rid, 0), charged.get(rid, 0)) for rid in set(billed) | set(charged)
            if round(billed.get(rid, 0), 3) != round(charged.get(rid, 0), 3)]


def _assert_books(gateway: RunningGateway, mock: Mock, storm: Storm) -> None:
    bill = mock.client.get("/_mock/bill").json()
    rows = {row["team"]: row for row in gateway.admin("GET", "teams").json()["teams"]}
    spent = {team: rows[team]["spent"] for team in TEAM_KEYS}
    ledgers = {team: _ledger(gateway, team) for team in TEAM_KEYS}
    report = (f"seed {storm.seed}: {sorted(storm.statuses.items())}, bill {bill['total']}, "
              f"spent {spent}, differences {_differences(bill, ledgers)}")
    assert round(sum(spent.values()), 3) == round(bill["total"], 3), report
    for team, entries in ledgers.items():
        assert rows[team]["reserved"] == 0, report
        assert gateway.run(gateway.app.runtime.store.reservations(team)) == [], report
        assert round(sum(e["credits"] for e in entries), 3) == round(spent[team], 3), report
        assert len({e["event_id"] for e in entries}) == len(entries), report  # none twice
        if BUDGETS[team] is not None:
            assert spent[team] <= BUDGETS[team], report


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_books_match_the_bill_on_memory(mock: Mock, seed: int) -> None:
    gateway = _gateway(mock, "memory://")
    storm = Storm(seed)
    try:
        asyncio.run(_run_storm(gateway, mock, storm, ops=250, workers=6))
        _settle_everything(gateway, mock)
        _assert_books(gateway, mock, storm)
    finally:
        gateway.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_books_match_the_bill_on_redis_restarted_at_random(
        mock: Mock, aof_redis: RedisServer, seed: int) -> None:
    gateway = _gateway(mock, aof_redis.url)
    storm = Storm(seed)
    restarts = Restarts(aof_redis, random.Random(seed))
    restarts.thread.start()
    try:
        asyncio.run(_run_storm(gateway, mock, storm, ops=250, workers=6))
    finally:
        restarts.stop.set()
        restarts.thread.join()
    try:
        assert restarts.count >= 1
        _settle_everything(gateway, mock)
        _assert_books(gateway, mock, storm)
    finally:
        gateway.close()
