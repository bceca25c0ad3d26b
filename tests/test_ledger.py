"""The ledger of record, piece by piece: rows, config, migrations, the batch write and its
cursor, usage reports and the CLI, against a real private PostgreSQL."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import yaml

from gateway import cli
from gateway import config as cfg
from gateway.ledger import LedgerDB, LedgerUnavailable
from gateway.ledger.migrate import migrate, migrations
from gateway.ledger.postgres import CursorMoved, redacted
from gateway.ledger.report import parse_by
from gateway.ledger.rows import to_row
from gateway.store.base import LedgerEntry

from .conftest import base_config
from .postgres import PASSWORD


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def entry(entry_id: str, **event: Any) -> LedgerEntry:
    base = {"team": "research", "key_id": "research-key", "model": "gemini",
            "route": "chat/completions", "request_id": "r1", "cached": False, "kind": "charge",
            "credits": 2000, "reserved": 2000, "period": "2026-11"}
    return LedgerEntry(entry_id, json.dumps({**base, **event}).encode())


async def sql(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


async def migrated(url: str) -> LedgerDB:
    db = LedgerDB(url, timeout_s=5)
    await migrate(db)
    return db


# -- rows ------------------------------------------------------------------------------------


def test_a_row_keeps_the_event_and_its_own_id() -> None:
    row = to_row("research", entry("1764150000123-4", event_id="abc123",
                                   tags={"project": "search"}))
    assert row.id == "abc123"
    assert (row.team, row.seq, row.credits, row.reserved, row.saved) == ("research", 4, 2000,
                                                                          2000, 0)
    assert row.event_time == datetime(2025, 11, 26, 9, 40, 0, 123000, tzinfo=UTC)
    assert orjson.loads(row.event)["tags"] == {"project": "search"}


def test_a_row_without_an_id_is_named_by_team_and_entry() -> None:
    assert to_row("research", entry("5-0")).id == "research/5-0"
    assert to_row("research", entry("5-0", event_id="x" * 201)).id == "research/5-0"
    assert to_row("research", entry("5-0", id=7)).id == "research/5-0"


def test_a_malformed_event_is_kept_not_dropped() -> None:
    row = to_row("research", LedgerEntry("5-1", b"\xffnot json"))
    assert row.kind == "unknown" and row.credits == 0 and row.id == "research/5-1"
    assert "unreadable" in orjson.loads(row.event)
    odd = to_row("research", entry("5-2", credits=True, reserved="9", saved=2**63,
                                    model=["x"], cached="yes", request_id="a\x00b"))
    assert (odd.credits, odd.reserved, odd.saved, odd.model, odd.cached) == (0, None, 0, None,
                                                                            False)
    assert "\x00" not in odd.event and odd.request_id == "a\ufffdb"
    with pytest.raises(ValueError):
        to_row("research", LedgerEntry("not-an-id", b"{}"))


# -- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "message"), [
    (f"mysql://aio:{PASSWORD}@db/aio", "must start with postgresql://"),
    (f"postgresql://aio:{PASSWORD}@db:99999/aio", "not a valid URL"),
    (f"postgresql://aio:{PASSWORD}@/aio", "must name a host"),
    (f"postgresql://:{PASSWORD}@db/aio", "must name a user"),
    (f"postgresql://aio:{PASSWORD}@db/", "must name a database"),
    (f"postgresql://aio:{PASSWORD}@db/aio?ssl mode=x", "spaces"),
    (f"postgresql://aio:{PASSWORD}@db/aio?SSLMODE=require", "query parameters"),
    (42, "expected a string"),
])
def test_a_bad_ledger_url_is_refused_without_echoing_it(url: Any, message: str) -> None:
    with pytest.raises(cfg.ConfigError) as error:
        cfg.from_dict({"ledger": {"url": url}})
    assert str(error.value).startswith("ledger.url: ")
    assert message in str(error.value)
    assert PASSWORD not in str(error.value)


def test_the_ledger_url_is_read_from_the_environment_and_never_shown() -> None:
    url = f"postgresql://aio:{PASSWORD}@db:5432/aio?sslmode=require"
    config = cfg.parse("upstream: {api_key: aio_k}\nledger: {url: '${LEDGER_URL}'}\n",
                       env={"LEDGER_URL": url})
    assert config.ledger.url == url
    assert PASSWORD not in repr(config)
    db = LedgerDB(url)
    assert PASSWORD not in repr(db) and "aio:***@db:5432" in repr(db)
    assert redacted(url) == "postgresql://aio:***@db:5432/aio?sslmode=require"
    with pytest.raises(cfg.ConfigError, match=r"ledger\.batch_rows: must be at most 10000"):
        cfg.from_dict({"ledger": {"batch_rows": 10001}})


def test_an_unreachable_database_is_described_without_the_password() -> None:
    from .conftest import free_port

    db = LedgerDB(f"postgresql://aio:{PASSWORD}@127.0.0.1:{free_port()}/aio", timeout_s=2)

    async def attempt() -> None:
        try:
            await db.cursors()
        finally:
            await db.close()

    with pytest.raises(LedgerUnavailable) as error:
        asyncio.run(attempt())
    assert PASSWORD not in str(error.value) and PASSWORD not in repr(error.value)


# -- migrations ------------------------------------------------------------------------------


def test_migrations_are_numbered_sql_files_in_the_package() -> None:
    found = migrations()
    assert [m.version for m in found] == list(range(1, len(found) + 1))
    assert all(m.sql.strip() for m in found)


def test_migrate_creates_the_schema_and_twice_is_a_no_op(
        ledger_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(base_config("http://127.0.0.1:9/api/v1",
                                               ledger={"url": ledger_url})))
    assert cli.main(["ledger", "migrate", "--config", str(path)]) == 0
    first = capsys.readouterr()
    assert "applied: 0001_ledger" in first.out
    assert cli.main(["ledger", "migrate", "--config", str(path)]) == 0
    second = capsys.readouterr()
    assert "the schema is up to date" in second.out
    assert PASSWORD not in first.out + first.err + second.out + second.err
    versions = asyncio.run(sql(ledger_url, "SELECT version FROM schema_migrations"))
    assert [r["version"] for r in versions] == [m.version for m in migrations()]
    tables = asyncio.run(sql(ledger_url, "SELECT tablename FROM pg_tables "
                                         "WHERE schemaname = 'public' ORDER BY 1"))
    assert [r["tablename"] for r in tables] == ["ledger_cursors", "ledger_events",
                                                "schema_migrations"]


def test_concurrent_migrations_apply_each_file_once(ledger_url: str) -> None:
    async def both() -> list[int]:
        dbs = [LedgerDB(ledger_url, timeout_s=10) for _ in range(3)]
        try:
            results = await asyncio.gather(*(migrate(db) for db in dbs))
        finally:
            for db in dbs:
                await db.close()
        return [len(r) for r in results]

    assert sorted(asyncio.run(both())) == [0, 0, len(migrations())]


def test_migrate_without_a_ledger_url_or_database(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from .conftest import free_port

    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(base_config("http://127.0.0.1:9/api/v1")))
    assert cli.main(["ledger", "migrate", "--config", str(path)]) == 2
    assert "no ledger.url" in capsys.readouterr().err
    down = f"postgresql://aio:{PASSWORD}@127.0.0.1:{free_port()}/aio"
    path.write_text(yaml.safe_dump(base_config("http://127.0.0.1:9/api/v1",
                                               ledger={"url": down, "timeout_s": 2})))
    assert cli.main(["ledger", "migrate", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ledger migrate: ") and PASSWORD not in err


# -- the batch write -------------------------------------------------------------------------


def test_a_page_and_its_cursor_are_written_together_and_once(ledger_url: str) -> None:
    page = [entry("100-0", event_id="a"), entry("100-1", event_id="b"), entry("101-0")]
    rows = [to_row("research", e) for e in page]

    async def scenario() -> tuple[int, int, int, dict[str, str]]:
        db = await migrated(ledger_url)
        try:
            first = await db.write("research", rows, after="-", upto="101-0")
            # a shipper that read the old cursor: refused, nothing written
            with pytest.raises(CursorMoved):
                await db.write("research", rows, after="-", upto="101-0")
            # a retried page (the commit's answer was lost): the rows are skipped
            again = await db.write("research", rows, after="101-0", upto="101-0")
            # the same ids in a later page: skipped too, only the new one counts
            later = await db.write("research", [*rows, to_row("research", entry("102-0"))],
                                   after="101-0", upto="102-0")
            return first, again, later, await db.cursors()
        finally:
            await db.close()

    first, again, later, cursors = asyncio.run(scenario())
    assert (first, again, later) == (3, 0, 1)
    assert cursors == {"research": "102-0"}
    ids = asyncio.run(sql(ledger_url, "SELECT id FROM ledger_events ORDER BY id"))
    assert [r["id"] for r in ids] == ["a", "b", "research/101-0", "research/102-0"]


def test_entries_read_back_in_the_stores_order_and_format(ledger_url: str) -> None:
    page = [entry(f"{1000 + i // 3}-{i % 3}", request_id=f"r{i}") for i in range(10)]

    async def scenario() -> tuple[list[LedgerEntry], list[LedgerEntry], list[LedgerEntry]]:
        db = await migrated(ledger_url)
        try:
            await db.write("research", [to_row("research", e) for e in page], after="-",
                           upto=page[-1].id)
            return (await db.ledger("research"), await db.ledger("research", after="1001-1",
                                                                 limit=3),
                    await db.ledger("marketing"))
        finally:
            await db.close()

    everything, after, other = asyncio.run(scenario())
    assert [e.id for e in everything] == [e.id for e in page]
    assert [orjson.loads(e.event) for e in everything] == [orjson.loads(e.event) for e in page]
    assert [e.id for e in after] == ["1001-2", "1002-0", "1002-1"]
    assert other == []


# -- usage reports ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["team", "team,key,model", "model,tag:project,route",
                                  "tag:env"])
def test_by_accepts_known_fields(text: str) -> None:
    assert parse_by(text) == tuple(text.split(","))


@pytest.mark.parametrize(("text", "message"), [
    ("user", "unknown field 'user'"), ("team,", "unknown field ''"),
    ("tag:", "unknown field 'tag:'"), ("tag:a b", "unknown field"),
    ("tag:x'; DROP TABLE ledger_events; --", "unknown field"), ("team,team", "twice"),
])
def test_by_refuses_anything_else(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_by(text)


REPORT_EVENTS = [
    # time, team, key, model, credits, kind, cached, saved, tags
    ("2026-10-31T23:59:59", "research", "r-laptop", "gemini", 2000, "charge", False, 0,
     {"project": "search"}),
    ("2026-11-01T00:00:00", "research", "r-laptop", "gemini", 2500, "charge", False, 0,
     {"project": "search"}),
    ("2026-11-01T08:00:00", "research", "r-ci", "gemini", 0, "charge", True, 2000,
     {"project": "search"}),
    ("2026-11-01T09:00:00", "research", "r-ci", "kling-3", 0, "refund", False, 0,
     {"project": "video"}),
    ("2026-11-02T10:00:00", "research", "r-ci", "kling-3", 100000, "charge", False, 0, None),
    ("2026-11-02T11:00:00", "marketing", "m-1", "flux-2", 4000, "charge", False, 0,
     {"project": "ads"}),
]


@pytest.fixture
def report_config(ledger_url: str, tmp_path: Path) -> Path:
    by_team: dict[str, list[LedgerEntry]] = {}
    for i, (when, team, key, model, credits, kind, cached, saved, tags) in enumerate(
            REPORT_EVENTS):
        event = {"team": team, "key_id": key, "model": model, "route": "x", "kind": kind,
                 "credits": credits, "cached": cached, "saved": saved, "request_id": f"r{i}"}
        if tags is not None:
            event["tags"] = tags
        by_team.setdefault(team, []).append(LedgerEntry(f"{ms(when)}-0", orjson.dumps(event)))

    async def load() -> None:
        db = await migrated(ledger_url)
        try:
            for team, entries in by_team.items():
                await db.write(team, [to_row(team, e) for e in entries], after="-",
                               upto=entries[-1].id)
        finally:
            await db.close()

    asyncio.run(load())
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(base_config("http://127.0.0.1:9/api/v1",
                                               ledger={"url": ledger_url})))
    return path


def usage_csv(config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> list[list[str]]:
    assert cli.main(["usage", "--config", str(config), "--format", "csv", *args]) == 0
    return list(csv.reader(io.StringIO(capsys.readouterr().out)))


def test_usage_groups_by_team_key_model_and_tag_per_period(
        report_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    head = ["requests", "cached", "refunded", "credits", "saved"]
    assert usage_csv(report_config, capsys) == [
        ["team", *head], ["marketing", "1", "0", "0", "4", "0"],
        ["research", "5", "1", "1", "104.5", "2"]]
    assert usage_csv(report_config, capsys, "--by", "team,tag:project", "--period", "month") == [
        ["period", "team", "tag:project", *head],
        ["2026-10", "research", "search", "1", "0", "0", "2", "0"],
        ["2026-11", "marketing", "ads", "1", "0", "0", "4", "0"],
        ["2026-11", "research", "search", "2", "1", "0", "2.5", "2"],
        ["2026-11", "research", "video", "1", "0", "1", "0", "0"],
        ["2026-11", "research", "", "1", "0", "0", "100", "0"]]
    assert usage_csv(report_config, capsys, "--period", "month", "--until", "2026-11-01") == [
        ["period", "team", *head], ["2026-10", "research", "1", "0", "0", "2", "0"]]
    assert usage_csv(report_config, capsys, "--by", "key,model", "--period", "day",
                     "--team", "research", "--since", "2026-11-01") == [
        ["period", "key", "model", *head],
        ["2026-11-01", "r-ci", "gemini", "1", "1", "0", "0", "2"],
        ["2026-11-01", "r-ci", "kling-3", "1", "0", "1", "0", "0"],
        ["2026-11-01", "r-laptop", "gemini", "1", "0", "0", "2.5", "0"],
        ["2026-11-02", "r-ci", "kling-3", "1", "0", "0", "100", "0"]]


def test_usage_prints_a_table_and_refuses_bad_arguments(
        report_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["usage", "--config", str(report_config), "--by", "model"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["model", "requests", "cached", "refunded", "credits", "saved"]
    assert lines[1].split() == ["flux-2", "1", "0", "0", "4", "0"]
    assert lines[3].split() == ["kling-3", "2", "0", "1", "100", "0"]
    assert cli.main(["usage", "--config", str(report_config), "--by", "user"]) == 2
    assert "--by: unknown field 'user'" in capsys.readouterr().err
    assert cli.main(["usage", "--config", str(report_config), "--since", "yesterday"]) == 2
    assert "--since takes a date" in capsys.readouterr().err


def test_usage_of_a_memory_store_points_to_the_admin_api(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without a ledger of record, `usage` reads the store's ledger: a Redis store's
    (tests/test_usage.py); a memory:// store's lives in the running gateway, not here."""
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(base_config("http://127.0.0.1:9/api/v1")))
    for args in (["--by", "model"], ["--until", "2026-12-01"]):
        assert cli.main(["usage", "--config", str(path), *args]) == 1
        assert "GET /admin/v1/usage" in capsys.readouterr().err
