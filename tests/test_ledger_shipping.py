"""The ledger shipper in a running gateway: every ledger entry of the store reaches PostgreSQL
exactly once, PostgreSQL killed mid-run included, on memory:// and Redis; it never touches the
request path; the admin endpoint reads PostgreSQL; SIGTERM ships what is left."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from gateway.ledger import LedgerDB
from gateway.ledger.migrate import migrate
from gateway.store import open_store

from .conftest import (
    KEYS,
    GatewayFactory,
    GatewayProcess,
    Mock,
    RedisServer,
    RunningGateway,
    base_config,
    eventually,
    free_port,
)
from .postgres import PASSWORD, PostgresServer

TEAMS = ("research", "marketing")


def migrated(url: str) -> str:
    async def run() -> None:
        db = LedgerDB(url, timeout_s=10)
        try:
            await migrate(db)
        finally:
            await db.close()

    asyncio.run(run())
    return url


def ledger_section(url: str, **extra: Any) -> dict[str, Any]:
    return {"url": url, "interval_s": 0.05, "batch_rows": 7, "timeout_s": 2, **extra}


def store_entries(store_url: str, memory: Any = None) -> dict[tuple[str, str], dict[str, Any]]:
    """(team, entry id) -> event, for every entry of every team's stream in the store."""
    async def read() -> dict[tuple[str, str], dict[str, Any]]:
        store = memory if memory is not None else open_store(store_url, timeout_s=5)
        out = {}
        try:
            for team in TEAMS:
                after = "-"
                while page := await store.ledger(team, after=after, limit=1000):
                    out.update({(team, e.id): orjson.loads(e.event) for e in page})
                    after = page[-1].id
        finally:
            if memory is None:
                await store.close()
        return out

    return asyncio.run(read())


def gateway_entries(gateway: RunningGateway, store_url: str) -> dict[tuple[str, str], Any]:
    memory = gateway.runtime.store if store_url.startswith("memory://") else None
    return store_entries(store_url, memory)


def pg_entries(url: str) -> tuple[dict[tuple[str, str], dict[str, Any]], int]:
    """(team, entry id) -> event as PostgreSQL holds it, and the number of rows."""
    async def read() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return await conn.fetch(
                "SELECT team, (extract(epoch FROM event_time) * 1000)::bigint AS ms, seq, "
                "event::text AS event FROM ledger_events")
        finally:
            await conn.close()

    rows = asyncio.run(read())
    return {(r["team"], f"{r['ms']}-{r['seq']}"): orjson.loads(r["event"]) for r in rows}, len(rows)


def pg_count(url: str) -> int:
    try:
        return pg_entries(url)[1]
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return -1


def metric(gateway_url: str, name: str) -> float:
    text = httpx.get(f"{gateway_url}/metrics", timeout=10).text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match is not None, name
    return float(match.group(1))


def assert_exactly_once(store: dict[tuple[str, str], Any], url: str) -> None:
    shipped, rows = pg_entries(url)
    assert rows == len(store)
    assert shipped == store


def traffic(gateway: RunningGateway, mock: Mock, tag: str) -> None:
    """Charges, cache hits, a refund, on both teams."""
    for i in range(9):
        assert gateway.chat(f"{tag} {i}", team=TEAMS[i % 2]).status_code == 200
    for _ in range(3):
        assert gateway.chat(f"{tag} 0").status_code == 200  # hits
    mock.fault(status=500)
    assert gateway.chat(f"{tag} refunded").status_code == 500


def test_every_entry_reaches_postgres_exactly_once(
        make_gateway: GatewayFactory, store_url: str, ledger_url: str, mock: Mock) -> None:
    url = migrated(ledger_url)
    gateway = make_gateway(store_url, ledger=ledger_section(url))
    traffic(gateway, mock, "once")
    store = eventually(lambda: (e := gateway_entries(gateway, store_url))
                       and pg_count(url) == len(e) == 13 and e, "all 13 entries shipped")
    assert_exactly_once(store, url)
    kinds = sorted((e["kind"], e["cached"]) for e in store.values())
    assert kinds == [("charge", False)] * 9 + [("charge", True)] * 3 + [("refund", False)]
    assert metric(gateway.url, "gateway_ledger_rows_total") == 13
    assert metric(gateway.url, "gateway_ledger_pending") == 0

    # the cursors lost (every page retried from the start): no row is written twice
    asyncio.run(_reset_cursors(url))
    eventually(lambda: _cursors(url) == _last_ids(store), "the shipper to go over it all again")
    assert_exactly_once(store, url)
    assert metric(gateway.url, "gateway_ledger_rows_total") == 13


async def _reset_cursors(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("UPDATE ledger_cursors SET after_id = '-'")
    finally:
        await conn.close()


def _cursors(url: str) -> dict[str, str]:
    async def read() -> dict[str, str]:
        db = LedgerDB(url)
        try:
            return await db.cursors()
        finally:
            await db.close()

    return asyncio.run(read())


def _last_ids(store: dict[tuple[str, str], Any]) -> dict[str, str]:
    last: dict[str, str] = {}
    for team, entry_id in sorted(store, key=lambda k: (k[0], *map(int, k[1].split("-")))):
        last[team] = entry_id
    return last


class Load:
    """Client threads sending a mix of cache misses and hits until stopped."""

    def __init__(self, url: str, threads: int = 3) -> None:
        self.url = url
        self.statuses: list[int] = []
        self.sent = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, n: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            i = 0
            while not self._stop.is_set():
                team = TEAMS[(n + i) % 2]
                content = f"load {n} {i}" if i % 4 else f"load {n} hit"
                response = client.post(
                    "/api/v1/chat/completions",
                    headers={"Authorization": f"Bearer {KEYS[team]}"},
                    json={"model": "gemini", "messages": [{"role": "user", "content": content}]})
                self.statuses.append(response.status_code)
                i += 1

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def test_postgres_killed_mid_run_loses_and_doubles_nothing(
        make_gateway: GatewayFactory, store_url: str, private_postgres: PostgresServer,
        mock: Mock) -> None:
    url = migrated(private_postgres.new_database())
    gateway = make_gateway(store_url, ledger=ledger_section(url, batch_rows=20))
    load = Load(gateway.url)
    try:
        eventually(lambda: pg_count(url) > 20, "the shipper to ship under load")
        private_postgres.kill()
        # requests go on; the backlog is counted, and the failures too
        served = len(load.statuses)
        eventually(lambda: metric(gateway.url, "gateway_ledger_errors_total") >= 2
                   and metric(gateway.url, "gateway_ledger_pending") > 0
                   and len(load.statuses) > served + 20,
                   "a counted backlog while PostgreSQL is down")
        assert metric(gateway.url, "gateway_ledger_lag_seconds") > 0
        private_postgres.start()
        restarted_with = pg_count(url)
        eventually(lambda: pg_count(url) > restarted_with, "shipping to resume")
    finally:
        load.stop()
    assert set(load.statuses) == {200}
    store = eventually(lambda: (e := gateway_entries(gateway, store_url))
                       and pg_count(url) == len(e) and e, "the backlog to drain")
    assert len(store) == len(load.statuses)
    assert_exactly_once(store, url)
    eventually(lambda: metric(gateway.url, "gateway_ledger_pending") == 0, "pending back to 0")


def test_postgres_down_leaves_requests_alone(
        make_gateway: GatewayFactory, store_url: str, mock: Mock,
        caplog: pytest.LogCaptureFixture) -> None:
    url = f"postgresql://aio:{PASSWORD}@127.0.0.1:{free_port()}/aio"
    gateway = make_gateway(store_url, ledger=ledger_section(url))
    for i in range(5):
        assert gateway.chat(f"down {i}").status_code == 200
    eventually(lambda: metric(gateway.url, "gateway_ledger_pending") == 5, "5 entries pending")
    assert metric(gateway.url, "gateway_ledger_errors_total") >= 1
    assert metric(gateway.url, "gateway_ledger_lag_seconds") >= 0
    answer = gateway.admin("GET", "teams/research/ledger")
    assert answer.status_code == 503
    assert answer.json()["error"]["type"] == "store_unavailable"
    assert "cannot write to PostgreSQL" in caplog.text
    assert PASSWORD not in caplog.text + answer.text + gateway.metrics()


def test_the_admin_ledger_reads_postgres(make_gateway: GatewayFactory, store_url: str,
                                         ledger_url: str, mock: Mock) -> None:
    url = migrated(ledger_url)
    gateway = make_gateway(store_url, ledger=ledger_section(url))
    traffic(gateway, mock, "admin")
    store = eventually(lambda: (e := gateway_entries(gateway, store_url))
                       and pg_count(url) == len(e) == 13 and e, "all entries shipped")
    pages, after = [], "-"
    while after is not None:
        answer = gateway.admin("GET", f"teams/research/ledger?limit=3&after={after}").json()
        pages.append(answer["entries"])
        after = answer["next"]
    entries = [e for page in pages for e in page]
    research = sorted((k[1] for k in store if k[0] == "research"),
                      key=lambda i: tuple(map(int, i.split("-"))))
    assert [e["id"] for e in entries] == research
    first = store[("research", research[0])]
    assert entries[0]["credits"] == first["credits"] / 1000
    assert entries[0]["time_ms"] == int(research[0].split("-")[0])

    # an entry only PostgreSQL has: the endpoint shows it
    async def insert() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(
                "INSERT INTO ledger_events (id, team, event_time, seq, kind, cached, credits, "
                "saved, event) VALUES ('only-in-pg', 'research', '2099-01-01', 0, 'charge', "
                "false, 0, 0, '{\"request_id\": \"only-in-pg\"}')")
        finally:
            await conn.close()

    asyncio.run(insert())
    last = gateway.admin("GET", f"teams/research/ledger?after={research[-1]}").json()
    assert [e["request_id"] for e in last["entries"]] == ["only-in-pg"]


def test_sigterm_ships_what_is_left(gateway_process: Callable[..., GatewayProcess],
                                    mock: Mock, ledger_url: str) -> None:
    url = migrated(ledger_url)
    # one pass at start-up, then none for an hour: only the final pass can ship
    config = base_config(mock.api_url, ledger=ledger_section(url, interval_s=3600))
    gateway = gateway_process(config)
    for i in range(6):
        response = httpx.post(f"{gateway.url}/api/v1/chat/completions",
                              headers={"Authorization": f"Bearer {KEYS['research']}"},
                              json={"model": "gemini", "messages": [{"role": "user",
                                                                     "content": f"bye {i}"}]})
        assert response.status_code == 200
    assert pg_count(url) == 0
    assert gateway.stop() == 0
    shipped, rows = pg_entries(url)
    assert rows == 6
    assert sorted(e["kind"] for e in shipped.values()) == ["charge"] * 6
    assert PASSWORD not in gateway.log_path.read_text()


def test_two_workers_on_redis_ship_each_entry_once(
        gateway_process: Callable[..., GatewayProcess], mock: Mock, ledger_url: str,
        redis_server: RedisServer) -> None:
    redis_server.cli("FLUSHALL")
    url = migrated(ledger_url)
    config = base_config(mock.api_url, redis_server.url, ledger=ledger_section(url))
    gateway = gateway_process(config, workers=2)
    load = Load(gateway.url, threads=2)
    try:
        eventually(lambda: len(load.statuses) >= 60, "60 requests")
    finally:
        load.stop()
    store = eventually(lambda: (e := store_entries(redis_server.url))
                       and pg_count(url) == len(e) and e, "every entry shipped")
    assert len(store) == len(load.statuses)
    assert_exactly_once(store, url)
    assert gateway.stop() == 0
