"""Redis Cluster: the same scripts, each kept inside one hash slot.

A team's keys share the `{t:<team>}` slot, an organisation-scoped cache entry and its lock the
`{c:<digest>}` slot, the upstream accounts and their queue the `{org}` slot. A single Redis runs
`admit` as one script over all of them; on a cluster, a request whose keys span slots runs one
script per slot:

- organisation-scoped cache: `lookup.lua` in the entry's slot first (hit, follow, or take the
  lock), then the team's `admit` without the cache, releasing the lock if the team is refused;
- upstream slots: after the team's `admit` let the request through, `slot.lua` in `{org}`
  (granted, or a place in the queue); if refused, the admission is cancelled (reservation and
  locks given back).

Each step is atomic in its slot; the steps in between can only over-hold (briefly keep a lock or
a reservation), never over-spend. Bookkeeping (`finish`, `cancel`) splits the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import orjson

from .base import (
    Admission,
    AdmitResult,
    CacheRef,
    Completion,
    ScriptFailed,
    Settled,
    StoreError,
    Verdict,
)
from .scripts import ScriptStore

_LEAD, _HIT = 0, 1


class ClusterStore(ScriptStore):
    async def admit(self, a: Admission) -> AdmitResult:
        shared = a.cache if a.cache is not None and a.cache.shared else None
        if shared is not None:
            state, entry, ttl_ms = await self.engine.run(
                "lookup", list(self.keys.cache(a.team, shared)),
                [orjson.dumps({"ticket": a.ticket, "hold_ms": a.hold_ms})])
            if state == _HIT:  # the team's script answers it, bookkeeping included
                return await super().admit(replace(a, cache=None, reservation=None, slot=None,
                                                   served=(entry, max(ttl_ms, 0))))
            if state != _LEAD:  # another request is fetching it: count this one, no more
                team = await super().admit(replace(a, cache=None, reservation=None, slot=None))
                if team.verdict is not Verdict.ADMIT:
                    return team
                return replace(team, verdict=Verdict.FOLLOW)
        result = await super().admit(replace(a, cache=None if shared else a.cache, slot=None))
        if result.verdict is not Verdict.ADMIT:
            if shared is not None:
                await self._store_entry(a.team, shared, a.ticket, release=True)
            return result
        if a.slot is None:
            return result
        slot = await self.slot(a.team, a.ticket, a.slot, task_account=result.task_account)
        if slot.verdict not in (Verdict.ADMIT, Verdict.QUEUED):
            await self.cancel(a)
            return replace(result, verdict=slot.verdict, retry_after_s=slot.wait_s)
        return replace(result, verdict=slot.verdict, account=slot.account, wait_s=slot.wait_s,
                       probe=slot.probe)

    async def finish(self, c: Completion) -> Settled:
        ref = c.cache_put[0] if c.cache_put else c.release
        if ref is None or not ref.shared:
            return await super().finish(c)
        await self._store_entry(c.team, ref, c.ticket, release=c.release is not None,
                                entry=c.cache_put[1] if c.cache_put else b"",
                                ttl_ms=c.cache_put[2] if c.cache_put else 0)
        return await super().finish(replace(c, cache_put=None, release=None))

    async def finish_many(self, completions: Sequence[Completion]) -> list[Settled | Exception]:
        """One at a time: a completion may span two slots (see above)."""
        out: list[Settled | Exception] = []
        for completion in completions:
            try:
                out.append(await self.finish(completion))
            except (StoreError, ScriptFailed) as exc:
                out.append(exc)
        return out

    async def cancel(self, a: Admission) -> None:
        if a.cache is not None and a.cache.shared:
            await self._store_entry(a.team, a.cache, a.ticket, release=True)
            a = replace(a, cache=None)
        await super().cancel(a)

    async def _store_entry(self, team: str, ref: CacheRef, ticket: str, *, release: bool,
                           entry: bytes = b"", ttl_ms: int = 0) -> None:
        fields = {"ticket": ticket, "release": release or None,
                  "cache_ttl_ms": ttl_ms if entry else None}
        await self.engine.run("store_entry", list(self.keys.cache(team, ref)),
                              [orjson.dumps({k: v for k, v in fields.items() if v is not None}),
                               entry])
