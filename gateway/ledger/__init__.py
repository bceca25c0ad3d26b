"""The ledger of record: every charge copied from the store's ledger streams into PostgreSQL.

    store (Redis stream / memory list per team)  --shipper.py-->  PostgreSQL ledger_events
                                                                   (migrations/*.sql, migrate.py)
    aio-gateway usage, GET /admin/v1/teams/{team}/ledger  <--report.py, postgres.py--

The store's stream is the buffer: the shipper never runs on the request path, copies each page
of a team's stream in one transaction together with the team's cursor, and keys every row by the
event's unique id, so a retried page never doubles a row and a crash resumes from the cursor.
"""

from .postgres import LedgerDB, LedgerUnavailable
from .shipper import Shipper

__all__ = ["LedgerDB", "LedgerUnavailable", "Shipper"]
