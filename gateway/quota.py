"""Team request quotas: GCRA (generic cell rate algorithm) windows and their headers.

GCRA gives an exact `Retry-After`, has no boundary burst (a fixed window lets 2x the limit
through around the window edge) and costs one hash field per window, whatever the traffic.
Its state is kept as a request debt that drains at `limit / period` (the "leaky bucket as a
meter" form, equivalent to storing the theoretical arrival time) so that usage so far keeps its
meaning when a reload changes the limit. The same maths runs in `store/lua/admit.lua` on Redis's
clock; this module is the reference the memory store uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .records import record


@dataclass(frozen=True, slots=True)
class Quota:
    """`limit` requests per `period_s`, with a burst of up to `limit`. `name` is what the
    `RateLimit` headers call it; `field` where the store keeps its state (a key's windows sit
    beside its team's); `key` the key id it limits ('' = the whole team)."""

    name: str
    limit: int
    period_s: float
    field: str = ""
    key: str = ""

    @property
    def period_ms(self) -> float:
        return self.period_s * 1000.0

    @property
    def store_field(self) -> str:
        return self.field or self.name


@record
class QuotaState:
    quota: Quota
    remaining: int
    reset_s: float


@dataclass(frozen=True, slots=True)
class Step:
    """The outcome of one GCRA test at `now`; `debt` is what to store when the request counts."""

    allowed: bool
    debt: float  # requests not yet drained, this one included when it counts
    remaining: int
    reset_ms: float  # until the debt has drained away
    retry_ms: float


def _drained(quota: Quota, state: tuple[float, float] | None, now_ms: float) -> float:
    if state is None:
        return 0.0
    debt, at_ms = state
    return max(debt - (now_ms - at_ms) * quota.limit / quota.period_ms, 0.0)


def gcra(quota: Quota, state: tuple[float, float] | None, now_ms: float) -> Step:
    """Count one request against `state` = (debt, when it was measured)."""
    per_ms = quota.limit / quota.period_ms
    debt = _drained(quota, state, now_ms)
    if debt + 1 > quota.limit + 1e-9:
        return Step(False, debt, 0, debt / per_ms, (debt + 1 - quota.limit) / per_ms)
    debt += 1
    return Step(True, debt, math.floor(quota.limit - debt + 1e-9), debt / per_ms, 0.0)


def peek(quota: Quota, state: tuple[float, float] | None, now_ms: float) -> Step:
    """The window's state without counting a request."""
    debt = _drained(quota, state, now_ms)
    remaining = math.floor(quota.limit - debt + 1e-9)
    return Step(remaining > 0, debt, remaining, debt * quota.period_ms / quota.limit, 0.0)


def policy_header(quotas: tuple[Quota, ...]) -> str:
    """`RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers): `"minute";q=120;w=60`."""
    return ", ".join(f'"{q.name}";q={q.limit};w={_whole(q.period_s)}' for q in quotas)


def state_header(states: tuple[QuotaState, ...]) -> str:
    """`RateLimit`: what is left of each window and the seconds until it is whole again."""
    return ", ".join(
        f'"{s.quota.name}";r={s.remaining};t={math.ceil(max(s.reset_s, 0.0))}' for s in states
    )


def _whole(seconds: float) -> str:
    return str(int(seconds)) if seconds == int(seconds) else f"{seconds:g}"
