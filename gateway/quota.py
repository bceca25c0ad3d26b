"""Team request quotas: GCRA (generic cell rate algorithm) windows and their headers.

GCRA keeps one number per window, the theoretical arrival time (TAT) of the next request. It
gives an exact `Retry-After`, has no boundary burst (a fixed window lets 2x the limit through
around the window edge) and costs one hash field per window, whatever the traffic. The same maths
runs in `store/lua/admit.lua` on Redis's clock; this module is the reference the memory store uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Quota:
    """`limit` requests per `period_s`, with a burst of up to `limit`."""

    name: str
    limit: int
    period_s: float

    @property
    def period_ms(self) -> float:
        return self.period_s * 1000.0


@dataclass(frozen=True, slots=True)
class QuotaState:
    quota: Quota
    remaining: int
    reset_s: float


@dataclass(frozen=True, slots=True)
class Step:
    """The outcome of one GCRA test at `now`; `tat` is what to store when the request counts."""

    allowed: bool
    tat: float
    remaining: int
    reset_ms: float
    retry_ms: float


def gcra(quota: Quota, stored_tat: float | None, now_ms: float) -> Step:
    interval = quota.period_ms / quota.limit
    tat = now_ms if stored_tat is None or stored_tat < now_ms else stored_tat
    new_tat = tat + interval
    allow_at = new_tat - quota.period_ms
    if allow_at > now_ms:
        return Step(False, tat, 0, tat - now_ms, allow_at - now_ms)
    remaining = math.floor((now_ms + quota.period_ms - new_tat) / interval + 1e-9)
    return Step(True, new_tat, remaining, new_tat - now_ms, 0.0)


def peek(quota: Quota, stored_tat: float | None, now_ms: float) -> Step:
    """The window's state without counting a request."""
    interval = quota.period_ms / quota.limit
    tat = now_ms if stored_tat is None or stored_tat < now_ms else stored_tat
    remaining = math.floor((now_ms + quota.period_ms - tat) / interval + 1e-9)
    return Step(remaining > 0, tat, remaining, tat - now_ms, 0.0)


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
