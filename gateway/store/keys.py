"""Store key names, built in exactly one place.

Every key of a team carries the `{t:<team>}` hash tag, so one team's multi-key scripts stay in
one Redis Cluster slot; an organisation-scoped cache entry and its flight lock share a tag of
their own digest; organisation-wide keys share `{org}`.
"""

from __future__ import annotations

import hashlib

from .base import CacheRef


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def team(self, team: str, name: str) -> str:
        return f"{self.prefix}:{{t:{team}}}:{name}"

    def idempotency(self, team: str, digest: str) -> str:
        return self.team(team, f"idem:{digest}")

    def task(self, team: str, task_id: str) -> str:
        return self.team(team, f"task:{task_id}")

    def cache(self, team: str, ref: CacheRef) -> tuple[str, str]:
        """(entry key, flight lock key)."""
        tag = f"{{c:{ref.digest}}}" if ref.shared else f"{{t:{team}}}"
        return (f"{self.prefix}:{tag}:cache:{ref.route}:{ref.digest}",
                f"{self.prefix}:{tag}:flight:{ref.digest}")

    def cache_pattern(self, *, route: str | None, team: str | None) -> str:
        tag = f"{{t:{team}}}" if team is not None else "*"
        return f"{self.prefix}:{tag}:cache:{route or '*'}:*"

    def org(self, name: str) -> str:
        return f"{self.prefix}:{{org}}:{name}"


def digest(text: str) -> str:
    """A fixed-length, key-safe name for client-chosen text (Idempotency-Key)."""
    return hashlib.sha256(text.encode()).hexdigest()[:40]
