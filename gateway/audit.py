"""The audit log: who changed what in the running gateway, when.

Every admin action (revoke, accept again, cache flush, reload) and every config change is an
entry in a bounded stream in the store (shared by every replica, read with `GET
/admin/v1/audit`) and a line in the log. Entries name keys by id and changes by what they
touched: never a secret, never a hash.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import orjson

from .config import Config, Key
from .store import Store, StoreError

MAX_ENTRIES = 100_000
log = logging.getLogger("gateway.audit")


async def record(store: Store, actor: str, action: str, **details: Any) -> None:
    """Write one entry (and its log line); a store that is away loses only the stored copy."""
    entry = {"actor": actor, "action": action, **details}
    log.info("audit: %s by %s", action, actor, extra={"fields": entry})
    try:
        await store.audit(orjson.dumps(entry), MAX_ENTRIES)
    except StoreError:
        log.warning("audit: the store is unreachable; the entry is only in this log",
                    extra={"fields": {"action": action}})


def config_changes(old: Config, new: Config) -> dict[str, Any]:
    """What a reload changes, as operators read it: sections, teams, and keys by id."""
    out: dict[str, Any] = {}
    teams_added = sorted(set(new.teams) - set(old.teams))
    teams_removed = sorted(set(old.teams) - set(new.teams))
    if teams_added:
        out["teams_added"] = teams_added
    if teams_removed:
        out["teams_removed"] = teams_removed
    changed: dict[str, Any] = {}
    for name in sorted(set(old.teams) & set(new.teams)):
        before, after = old.teams[name], new.teams[name]
        team: dict[str, Any] = _keys(before.keys, after.keys)
        limits = [f for f in ("requests_per_minute", "requests_per_day", "budget", "models")
                  if getattr(before, f) != getattr(after, f)]
        if limits:
            team["limits"] = limits
        if team:
            changed[name] = team
    if changed:
        out["teams_changed"] = changed
    admin = _keys(old.admin.keys, new.admin.keys)
    if admin:
        out["admin_keys"] = admin
    sections = [f.name for f in dataclasses.fields(Config) if f.name not in ("teams", "admin")
                and getattr(old, f.name) != getattr(new, f.name)]
    if sections:
        out["sections"] = sections
    return out


def _keys(before: tuple[Key, ...], after: tuple[Key, ...]) -> dict[str, Any]:
    old, new = {k.id: k for k in before}, {k.id: k for k in after}
    out: dict[str, Any] = {}
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    both = sorted(set(old) & set(new))
    rotated = [i for i in both if (old[i].sha256, old[i].previous) != (new[i].sha256,
                                                                        new[i].previous)]
    other = [i for i in both if i not in rotated and old[i] != new[i]]
    for name, ids in (("keys_added", added), ("keys_removed", removed),
                      ("keys_rotated", rotated), ("keys_changed", other)):
        if ids:
            out[name] = ids
    return out
