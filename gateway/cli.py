"""The `aio-gateway` command: serve, check-config, keys, usage, ledger, mock-upstream."""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from . import config as cfg
from .auth import hash_key, new_key
from .budget import from_milli

if TYPE_CHECKING:
    from .ledger import LedgerDB
    from .ledger.report import Report

T = TypeVar("T")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aio-gateway", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True, help="path to the YAML config")
    serve.add_argument("--host", help="listen address (default: listen.host)")
    serve.add_argument("--port", type=int, help="listen port (default: listen.port)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")

    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")

    keys = commands.add_parser("keys", help="internal keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_commands.add_parser("new", help="print a new key once, and its config line")
    new.add_argument("--team", required=True)
    new.add_argument("--id", help="key id (default: <team>-<random>)")
    rotate = keys_commands.add_parser(
        "rotate", help="print a new secret for a key id once, and the config lines that keep "
                       "the old one valid for a grace period")
    rotate.add_argument("--team", required=True)
    rotate.add_argument("--id", required=True, help="the key id (it stays the same)")
    rotate.add_argument("--config", help="the config file: fills in the old key's sha256")
    until = rotate.add_mutually_exclusive_group()
    until.add_argument("--until", help="the old key works until this time (2027-03-01T00:00:00Z)")
    until.add_argument("--grace", default="24h",
                       help="or for this long from now: 90m, 24h, 7d (default 24h)")

    usage = commands.add_parser("usage", help="per-team totals or the raw ledger")
    usage.add_argument("--config", required=True)
    usage.add_argument("--team")
    usage.add_argument("--since", help="YYYY-MM-DD (UTC)")
    usage.add_argument("--format", choices=["table", "csv"], default="table")
    usage.add_argument("--by", help="with ledger.url: group by team,key,model,route,tag:<name> "
                                    "(default team)")
    usage.add_argument("--period", choices=["day", "month"],
                       help="with ledger.url: one row per UTC day or month")
    usage.add_argument("--until", help="with ledger.url: YYYY-MM-DD (UTC), excluded")

    ledger = commands.add_parser("ledger", help="the ledger of record in PostgreSQL")
    ledger_commands = ledger.add_subparsers(dest="ledger_command", required=True)
    migrate = ledger_commands.add_parser("migrate", help="create or upgrade its schema")
    migrate.add_argument("--config", required=True)

    mock = commands.add_parser("mock-upstream", help="run the offline stand-in for apiin.one")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=8099)
    mock.add_argument("--key", default=os.environ.get("MOCK_UPSTREAM_KEY", "aio_mock_key"),
                      help="the upstream key it accepts (env MOCK_UPSTREAM_KEY)")
    mock.add_argument("--task-delay", type=float, default=2.0, help="seconds a task takes")
    mock.add_argument("--rate-limit", type=int, default=60,
                      help="requests per minute before 429 (0 = none)")
    mock.add_argument("--fast", action="store_true",
                      help="benchmark mode: instant tasks, no rate limit, no request log")

    args = parser.parse_args(argv)
    try:
        handler = {"serve": _serve, "check-config": _check, "keys": _keys, "usage": _usage,
                   "ledger": _ledger, "mock-upstream": _mock}[args.command]
        return handler(args)
    except cfg.ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2


def _check(args: argparse.Namespace) -> int:
    config = cfg.load(args.file)
    print(f"config OK: {len(config.teams)} team(s), {len(config.admin.keys)} admin key(s), "
          f"store {config.store.url.split('://')[0]}://, upstream {config.upstream.base_url}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .app import CONFIG_ENV
    from .server import serve

    config = cfg.load(args.config)
    os.environ[CONFIG_ENV] = os.path.abspath(args.config)
    if args.workers > 1 and config.store.url.startswith("memory://"):
        print("config error: store.url: memory:// keeps state in one process; use Redis "
              "with --workers > 1", file=sys.stderr)
        return 2
    if args.workers > 1 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _multiprocess_metrics_dir()
    return serve(
        host=args.host or config.listen.host,
        port=args.port if args.port is not None else config.listen.port,
        workers=args.workers,
        grace_s=config.listen.shutdown_grace_s,
        head_timeout_s=config.listen.head_timeout_s,
    )


def _multiprocess_metrics_dir() -> None:
    """prometheus-client sums worker processes through files in this (fresh) directory."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path, exist_ok=True)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="aio-gateway-metrics-")


def _keys(args: argparse.Namespace) -> int:
    if not cfg._NAME.fullmatch(args.team):
        print("keys: --team uses letters, digits, '_', '.', '-'", file=sys.stderr)
        return 2
    if args.keys_command == "rotate":
        return _rotate(args)
    key = new_key()
    key_id = args.id or f"{args.team}-{os.urandom(3).hex()}"
    print(f"key (shown once, give it to team {args.team}): {key}")
    print(f"add under teams.{args.team}.keys:")
    print(f'  - {{id: {key_id}, sha256: "{hash_key(key)}"}}')
    return 0


_GRACE = re.compile(r"([1-9][0-9]{0,4})([mhd])")
_UNIT_S = {"m": 60, "h": 3600, "d": 86400}


def _rotate(args: argparse.Namespace) -> int:
    """A new secret for an existing key id; the old one stays valid until the grace ends."""
    if not cfg._NAME.fullmatch(args.id):
        print("keys rotate: --id uses letters, digits, '_', '.', '-'", file=sys.stderr)
        return 2
    now = datetime.now(UTC)
    if args.until is not None:
        until = cfg.instant(args.until, "--until")
    else:
        grace = _GRACE.fullmatch(args.grace)
        if grace is None or int(grace[1]) * _UNIT_S[grace[2]] > 366 * 86400:
            print("keys rotate: --grace takes minutes, hours or days up to a year: 90m, 24h, 7d",
                  file=sys.stderr)
            return 2
        until = now + timedelta(seconds=int(grace[1]) * _UNIT_S[grace[2]])
    until = until.replace(microsecond=0)
    if until <= now:
        print("keys rotate: the old key's end (--until) must be in the future", file=sys.stderr)
        return 2
    old = f"<the sha256 now under id {args.id}>"
    kept: list[cfg.PreviousKey] = []
    if args.config is not None:
        current = _configured_key(cfg.load(args.config), args.team, args.id)
        if current is None:
            print(f"keys rotate: no key {args.id!r} under teams.{args.team}.keys in "
                  f"{args.config}", file=sys.stderr)
            return 2
        if current.expires_at is not None and until > current.expires_at:
            print(f"keys rotate: the old key cannot outlive the key id, which expires at "
                  f"{_utc(current.expires_at)}", file=sys.stderr)
            return 2
        old = current.sha256
        kept = [p for p in current.previous if p.expires_at > now]
    key = new_key()
    print(f"key (shown once, give it to team {args.team}): {key}")
    print(f"in teams.{args.team}.keys, in the entry with id {args.id}, set these two fields "
          "(keep the others), then reload:")
    print(f'  sha256: "{hash_key(key)}"')
    print("  previous:")
    print(f'    - {{sha256: "{old}", expires_at: "{_utc(until)}"}}')
    for previous in kept:
        print(f'    - {{sha256: "{previous.sha256}", expires_at: "{_utc(previous.expires_at)}"}}')
    print(f"the new key works at once; the old one until {_utc(until)}, then it is refused")
    return 0


def _configured_key(config: cfg.Config, team: str, key_id: str) -> cfg.Key | None:
    keys = config.teams[team].keys if team in config.teams else ()
    return next((key for key in keys if key.id == key_id), None)


def _utc(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _on_ledger(db: LedgerDB, work: Callable[[], Awaitable[T]], command: str) -> T | None:
    """`work` on the PostgreSQL ledger, which is closed after; None (said on stderr) when it
    cannot be reached."""
    from .ledger import LedgerUnavailable

    async def run() -> T:
        try:
            return await work()
        finally:
            await db.close()

    try:
        return asyncio.run(run())
    except LedgerUnavailable as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return None


def _ledger(args: argparse.Namespace) -> int:
    from .ledger.migrate import migrate

    config = cfg.load(args.config)
    db = _ledger_db(config)
    if db is None:
        print("ledger migrate: the config has no ledger.url", file=sys.stderr)
        return 2

    async def run() -> list[str]:
        return [f"{m.version:04d}_{m.name}" for m in await migrate(db)]

    applied = _on_ledger(db, run, "ledger migrate")
    if applied is None:
        return 1
    print(f"applied: {', '.join(applied)}" if applied else "the schema is up to date")
    return 0


def _ledger_db(config: cfg.Config) -> LedgerDB | None:
    from .ledger import LedgerDB

    if config.ledger.url is None:
        return None
    return LedgerDB(config.ledger.url, timeout_s=config.ledger.timeout_s, max_connections=1)


def _usage(args: argparse.Namespace) -> int:
    config = cfg.load(args.config)
    if args.team is not None and args.team not in config.teams:
        print(f"usage: no team named {args.team!r} in the config", file=sys.stderr)
        return 2
    try:
        since, until = _date(args.since, "--since"), _date(args.until, "--until")
    except ValueError as exc:
        print(f"usage: {exc}", file=sys.stderr)
        return 2
    db = _ledger_db(config)
    if db is not None:
        return _usage_report(args, db, since, until)
    if config.store.url.startswith("memory://"):
        print("usage: memory:// keeps the ledger inside the running gateway; read it with "
              "GET /admin/v1/usage or GET /admin/v1/teams/{team}/ledger, or use a Redis store",
              file=sys.stderr)
        return 1
    since_ms = int(since.timestamp() * 1000) if since else 0
    teams = [args.team] if args.team else list(config.teams)
    events = asyncio.run(_read_ledger(config, teams, since_ms))
    if until is not None:
        events = [e for e in events if e["time_ms"] < until.timestamp() * 1000]
    if args.by or args.period:
        from .ledger.report import group, parse_by

        try:
            by = parse_by(args.by or "team")
        except ValueError as exc:
            print(f"usage: {exc}", file=sys.stderr)
            return 2
        _print_report(args, group(events, by, period=args.period))
    elif args.format == "csv":
        _print_csv(events)
    else:
        _print_totals(events, teams)
    return 0


def _date(text: str | None, option: str) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise ValueError(f"{option} takes a date, YYYY-MM-DD") from None


def _usage_report(args: argparse.Namespace, db: LedgerDB, since: datetime | None,
                  until: datetime | None) -> int:
    from .ledger.report import parse_by, usage

    try:
        by = parse_by(args.by or "team")
    except ValueError as exc:
        print(f"usage: {exc}", file=sys.stderr)
        return 2

    async def run() -> Report:
        return await usage(db, by, period=args.period, since=since, until=until, team=args.team)

    report = _on_ledger(db, run, "usage")
    if report is None:
        return 1
    _print_report(args, report)
    return 0


def _print_report(args: argparse.Namespace, report: Report) -> None:
    if args.format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(report.header)
        writer.writerows(report.rows)
    else:
        _print_table(report)


def _print_table(report: Report) -> None:
    from .ledger.report import TOTALS

    cells = [list(report.header), *([str(v) for v in row] for row in report.rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(report.header))]
    labels = len(report.header) - len(TOTALS)  # the rest are numbers: right-aligned
    for row in cells:
        print("  ".join(v.ljust(w) if i < labels else v.rjust(w)
                        for i, (v, w) in enumerate(zip(row, widths, strict=True))).rstrip())


async def _read_ledger(config: cfg.Config, teams: list[str], since_ms: int) -> list[dict[str, Any]]:
    from .store import open_store

    store = open_store(config.store.url, prefix=config.store.key_prefix,
                       timeout_s=max(config.store.timeout_s, 5.0))
    events: list[dict[str, Any]] = []
    try:
        for team in teams:
            after = f"{since_ms - 1}-18446744073709551615" if since_ms > 0 else "-"
            while True:
                page = await store.ledger(team, after=after, limit=1000)
                for entry in page:
                    event = orjson.loads(entry.event)
                    event["time_ms"] = int(entry.id.split("-")[0])
                    event["time"] = datetime.fromtimestamp(event["time_ms"] / 1000,
                                                           UTC).isoformat()
                    events.append(event)
                if len(page) < 1000:
                    break
                after = page[-1].id
    finally:
        await store.close()
    return events


_FIELDS = ("time", "team", "key_id", "model", "route", "kind", "credits", "reserved", "cached",
           "saved", "request_id", "period")


def _print_csv(events: list[dict[str, Any]]) -> None:
    writer = csv.writer(sys.stdout)
    writer.writerow(_FIELDS)
    for event in events:
        row = []
        for name in _FIELDS:
            value = event.get(name, "")
            if name in ("credits", "reserved", "saved") and value != "":
                value = from_milli(value)
            row.append(value)
        writer.writerow(row)


def _print_totals(events: list[dict[str, Any]], teams: list[str]) -> None:
    totals = {t: {"requests": 0, "cached": 0, "refunded": 0, "credits": 0, "saved": 0}
              for t in teams}
    for event in events:
        row = totals.setdefault(event["team"], dict.fromkeys(totals[teams[0]], 0))
        row["requests"] += 1
        row["cached"] += bool(event.get("cached"))
        row["refunded"] += event.get("kind") == "refund"
        row["credits"] += event.get("credits", 0)
        row["saved"] += event.get("saved", 0)
    print(f"{'team':<20} {'requests':>9} {'cached':>7} {'refunded':>9} {'credits':>12} "
          f"{'saved':>12}")
    for team, row in totals.items():
        print(f"{team:<20} {row['requests']:>9} {row['cached']:>7} {row['refunded']:>9} "
              f"{from_milli(row['credits']):>12} {from_milli(row['saved']):>12}")


def _mock(args: argparse.Namespace) -> int:
    import uvicorn

    from .mock_upstream import Settings, create_mock_app

    settings = Settings(
        api_key=args.key,
        task_delay_s=0.0 if args.fast else args.task_delay,
        rate_limit=None if args.fast or args.rate_limit == 0 else args.rate_limit,
        record=not args.fast,
    )
    uvicorn.run(create_mock_app(settings), host=args.host, port=args.port, loop="uvloop",
                http="httptools", log_level="warning", access_log=False, server_header=False)
    return 0
