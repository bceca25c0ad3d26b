"""`aio-gateway ledger migrate`: apply the numbered SQL files of migrations/ that are not applied.

Each file runs once, in order, recorded in `schema_migrations`. Everything runs in one
transaction under an advisory lock, so two replicas migrating at once apply each file once,
and a failed file leaves the schema as it was.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from .postgres import LedgerDB

_FILE = re.compile(r"([0-9]{4})_([a-z0-9_]+)\.sql")
_LOCK_KEY = 0x6169_6f67_6c64_6731  # "aioglgd1": pg_advisory_xact_lock takes a bigint


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The package's migrations, in order."""
    found = []
    for item in resources.files(__package__).joinpath("migrations").iterdir():
        match = _FILE.fullmatch(item.name)
        if match is not None:
            found.append(Migration(int(match.group(1)), match.group(2), item.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError("two migrations share a number")
    return found


async def migrate(db: LedgerDB) -> list[Migration]:
    """Apply what is missing; returns the migrations applied now (empty: already up to date)."""
    applied = []
    async with db.connection() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        await conn.execute("""
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version    integer     PRIMARY KEY,
                name       text        NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )""")
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for migration in migrations():
            if migration.version in done:
                continue
            await conn.execute(migration.sql)
            await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                               migration.version, migration.name)
            applied.append(migration)
    return applied
