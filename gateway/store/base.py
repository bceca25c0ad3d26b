"""The store interface: every piece of shared state, behind a few atomic operations.

`admit` is the hot path: one round trip decides a proxied request (revocation, idempotency,
quota, task ownership, cache lookup and single-flight lock, budget reservation, upstream pacing)
and writes only when the request is let through. `finish` carries out what the end of a request
decided (settle, cache, remember, own, record) in one more round trip; it is idempotent per
ticket, so the bookkeeping may send it again until it lands. Both backends run the same Lua
scripts (`lua/*.lua`): Redis on its own clock, `memory://` in-process on the injected clock.

Failures: `StoreError` means the store could not be reached or did not answer in time (fail open
or closed is decided in one place); `maybe_ran` says whether the command may still have run.
`ScriptFailed` means the store answered with an error: a defect, never retried.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ..quota import Quota, QuotaState
from ..records import record

if TYPE_CHECKING:
    from .hooks import Claimed, Hook, Update


class StoreError(Exception):
    """The store could not be reached or did not answer in time."""

    def __init__(self, message: str, *, maybe_ran: bool = True) -> None:
        super().__init__(message)
        self.maybe_ran = maybe_ran  # False: the command certainly never reached the store


class ScriptFailed(Exception):
    """The store ran a script and it failed (a defect: retrying gives the same error)."""


class Verdict(enum.IntEnum):
    ADMIT = 0  # forward upstream; reservation, flight lock and pacing slot taken as asked
    HIT = 1  # answered from the cache entry in `AdmitResult.entry`
    FOLLOW = 2  # another request is fetching this cache key; wait for its answer
    REPLAY = 3  # Idempotency-Key seen before: replay `AdmitResult.entry`
    QUOTA = 4  # a quota window is spent (the team's or the key's)
    BUDGET = 5  # the team's budget cannot hold the reservation
    PACE = 6  # the organisation's upstream allowance is spent beyond the queue timeout
    NOT_FOUND = 7  # task unknown to this team
    REVOKED = 8  # key revoked at run time
    IDEM_BUSY = 9  # same Idempotency-Key still in flight
    IDEM_MISMATCH = 10  # same Idempotency-Key, another body
    CANCELLED = 11  # `cancel` ran first for this ticket: nothing was done
    KEY_BUDGET = 12  # the key's own budget cannot hold the reservation
    QUEUED = 13  # let through like ADMIT, but waiting for an upstream slot (`Store.claim`)
    QUEUE_FULL = 14  # the team has `max_waiting` requests waiting for a slot already
    UNAVAILABLE = 15  # no upstream account is left for this request


CANCEL_TTL_MS = 10 * 60 * 1000  # how long a cancelled ticket's tombstone stays
IDEMPOTENCY_TTL_MS = 24 * 3600 * 1000  # how long an Idempotency-Key's answer is kept
GUARD_TTL_MS = 7 * 24 * 3600 * 1000  # a guarded completion is never applied twice in this time


@record
class CacheRef:
    """A cache entry: `digest` names it; `shared` entries are visible to every team."""

    route: str
    digest: str
    shared: bool = False


@dataclass(frozen=True, slots=True)
class AccountPace:
    """One upstream account's allowance: a slot every `interval_ms` (0: unpaced), `burst` at
    once; `per_minute` is its limit (for the slots-free meter), `credits` its balance to watch."""

    id: str
    interval_ms: float
    burst: int
    per_minute: int | None = None
    credits: int | None = None  # millicredits


@dataclass(frozen=True, slots=True)
class SlotAsk:
    """What a request asks of the upstream accounts: a slot on one of `usable` (the accounts
    of the organisation are `accounts`), in its team's fair share: `weight`, a reserved minimum
    of one slot every `min_interval_ms` (0: none), at most `max_waiting` of the team's requests
    waiting, each for at most `queue_ms`."""

    accounts: tuple[AccountPace, ...]
    usable: tuple[str, ...]
    weight: float = 1.0
    min_interval_ms: float = 0.0
    max_waiting: int = 50
    queue_ms: float = 10_000.0


@dataclass(frozen=True, slots=True)
class Slot:
    """The store's answer about one request's upstream slot."""

    verdict: Verdict  # ADMIT (granted), QUEUED, PACE, QUEUE_FULL or UNAVAILABLE
    account: str | None = None  # the account granted
    wait_s: float = 0.0  # QUEUED: the estimated wait; PACE / QUEUE_FULL: until a retry fits
    probe: bool = False  # the account granted was out of rotation (no other was left)


@dataclass(frozen=True, slots=True)
class Claim:
    """A waiting request's turn: granted (`account`), still waiting (`wait_s` estimated), or
    gone (its place expired, or it left)."""

    account: str | None = None
    wait_s: float = 0.0
    gone: bool = False
    probe: bool = False


@dataclass(frozen=True, slots=True)
class AccountState:
    """An upstream account as the store sees it."""

    id: str
    down_s: float  # until it is back in rotation (0: in rotation)
    slots_free: int | None  # of its per-minute limit, not used in the last minute (None: unpaced)
    credits_left: int | None  # millicredits of the balance to watch (None: none set)
    down_status: int | None = None  # while out of rotation: the status that took it out
    slots_used: int = 0  # slots granted through it in the last minute (a sliding estimate)


@record
class LedgerTrim:
    """How the ledger stream is kept bounded: entries before `min_ms`, beyond `max_len`."""

    min_ms: int = 0
    max_len: int = 1_000_000


@record
class Reservation:
    """Credits held from a team's budget (and its key's, if `key` is set) for one request."""

    id: str
    period: str
    amount: int  # millicredits
    context: bytes  # the ledger event's JSON object: team, key id, model, route, ids
    key: str = ""  # "<key id>/<its period>": the key's own budget holds it too ('' = none)


@record
class Admission:
    team: str
    key_id: str
    ticket: str  # unique per request (clients may reuse an X-Request-ID); owns locks
    hold_ms: int  # lifetime of the flight lock, the idempotency lock and the reservation
    quotas: tuple[Quota, ...] = ()
    count_quota: bool = True
    idempotency: tuple[str, str] | None = None  # (key digest, body fingerprint)
    task_id: str | None = None  # GET /tasks/{id}: the team must own it
    cache: CacheRef | None = None  # look up; on a miss take the flight lock
    reservation: Reservation | None = None
    budget_limit: int | None = None  # millicredits; None = no team budget
    key_budget_limit: int | None = None  # millicredits; None = no budget for the key
    slot: SlotAsk | None = None  # None: no upstream slot to take (one unpaced account)
    hit_event: bytes | None = None  # ledger context to record if answered from cache
    ledger: LedgerTrim = LedgerTrim()
    served: tuple[bytes, int] | None = None  # (entry, ttl ms) found elsewhere: a hit


@record
class AdmitResult:
    verdict: Verdict
    now: float  # the store's clock, epoch seconds
    quotas: tuple[QuotaState, ...] = ()
    retry_after_s: float = 0.0
    entry: bytes | None = None
    entry_ttl_s: float = 0.0
    account: str | None = None  # ADMIT: the upstream account whose slot was granted
    wait_s: float = 0.0  # QUEUED: the estimated wait for a slot
    probe: bool = False  # the account granted is out of rotation (no other was left)
    task_account: str | None = None  # a task poll: the account that created the task, if known
    budget_used: int | None = None  # spent + reserved in the period, millicredits
    key_budget_used: int | None = None  # the same for the key's own budget


class Settle(enum.Enum):
    CHARGE = "charge"  # settle the reservation to `Completion.charge` (None: as reserved)
    REFUND = "refund"  # release it whole
    HOLD = "hold"  # keep it, keyed by the task id, until the task's final status


@record
class Completion:
    """All the bookkeeping of one finished request, done in one round trip, idempotently:
    a reservation is settled once (by whoever removes it), locks are only released by their
    owner, and an `event` with no reservation behind it is guarded per ticket."""

    team: str
    ticket: str
    settle: Settle | None = None
    reservation_id: str | None = None
    period: str | None = None  # the reservation's period (for the budget gauge)
    charge: int | None = None  # millicredits; None with CHARGE = the reserved amount
    hold_id: str | None = None  # with HOLD: the reservation's new id (task:<id>)
    hold_ms: int = 0
    cache_put: tuple[CacheRef, bytes, int] | None = None  # (ref, entry, ttl ms)
    release: CacheRef | None = None  # flight lock to release, if still ours
    idempotency: tuple[str, bytes | None, int] | None = None  # (digest, answer or None = drop, ttl)
    task_owner: tuple[str, int] | None = None  # (task id, ttl ms): the team may poll it
    task_account: str | None = None  # with task_owner: the account the task was created on
    event: bytes | None = None  # a ledger event no reservation stands behind (coalesced)
    ledger: LedgerTrim = LedgerTrim()
    # the reservation itself, when it was made while this store was away (`on_error: open`):
    # settled as if it had been held here, once per ticket
    direct: Reservation | None = None


@record
class Settled:
    settled: bool  # False: the reservation was already settled (or never existed)
    spent: int = 0  # the reservation's period, after settling
    reserved: int = 0
    charged: int = 0  # millicredits this settlement added to `spent`


@dataclass(frozen=True, slots=True)
class Flight:
    entry: bytes | None
    entry_ttl_s: float
    held: bool


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    id: str  # "<ms>-<seq>", ordered
    event: bytes  # JSON


@dataclass(frozen=True, slots=True)
class BudgetUsage:
    spent: int
    reserved: int


@dataclass(slots=True)
class PendingReservation:
    id: str
    deadline_ms: int
    period: str
    amount: int
    key: str = ""
    context: bytes = field(default=b"", repr=False)


FORGET_PROCESS_MS = 24 * 3600 * 1000  # a process silent this long is no longer listed


@dataclass(frozen=True, slots=True)
class Processes:
    """The gateway processes sharing the store, as they last reported."""

    generation: int  # the organisation's config generation (bumped by each reload)
    seen: dict[str, tuple[int, int]]  # process -> (config generation it runs, ms since heard)

    def alive(self, within_ms: int) -> set[str]:
        return {name for name, (_, age) in self.seen.items() if age <= within_ms}


def process_of(reservation_id: str) -> str:
    """The process that made a request's reservation (tickets are `<process>.<n>`)."""
    process, dot, _ = reservation_id.partition(".")
    return process if dot else ""


class Store(Protocol):
    async def connect(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None: ...
    async def now(self) -> float: ...

    async def admit(self, admission: Admission) -> AdmitResult: ...
    async def finish(self, completion: Completion) -> Settled: ...
    async def finish_many(self, completions: Sequence[Completion]) -> list[Settled | Exception]:
        """Many completions in one round trip; each result is its `Settled`, or the error that
        kept it from landing (`StoreError`: try again; anything else: it never will)."""
        ...
    async def cancel(self, admission: Admission) -> None: ...
    async def slot(self, team: str, ticket: str, ask: SlotAsk, *,
                   task_account: str | None = None) -> Slot:
        """A slot for a request already admitted without one (Redis Cluster's second step; a
        request moving to another account): granted, queued, or refused."""
        ...
    async def claim(self, tickets: Sequence[str], accounts: Sequence[AccountPace], *,
                    leave: bool = False) -> list[Claim]:
        """Where waiting requests stand (slots that came free are granted first); with `leave`,
        those still waiting give up their place."""
        ...
    async def pace(self, account: AccountPace, queue_ms: float) -> tuple[bool, float]:
        """Book `account`'s next slot outside the queue (a retry, a reconciler's poll): (True,
        seconds to wait for it), or (False, seconds until one would come within `queue_ms`)."""
        ...
    async def account_states(self, accounts: Sequence[AccountPace], *,
                             down: tuple[str, float, int] | None = None,
                             up: str | None = None, spend: Sequence[tuple[str, int]] = ()
                             ) -> tuple[list[AccountState], bool]:
        """The accounts' states, after taking `down` = (account, seconds, the upstream status
        that refused it) out of rotation, putting `up` back, and counting `spend` = [(account,
        millicredits)] against their balances; and whether `down` found its account in
        rotation until then."""
        ...
    async def task_account(self, team: str, task_id: str) -> str | None: ...
    async def flight(self, team: str, ref: CacheRef) -> Flight: ...

    async def heartbeat(self, process: str, generation: int) -> Processes: ...
    async def processes(self) -> Processes: ...
    async def bump_config(self) -> int: ...
    async def budgets(self, teams: Sequence[tuple[str, str]]) -> list[BudgetUsage]: ...
    async def key_budgets(self, keys: Sequence[tuple[str, str, str]]) -> list[BudgetUsage]: ...
    async def reservations(self, team: str) -> list[PendingReservation]: ...
    async def ledger(self, team: str, *, after: str = "-",
                     limit: int = 100) -> list[LedgerEntry]: ...
    async def revoke(self, team: str, key_id: str, revoked: bool) -> None: ...
    async def revoked(self, team: str) -> set[str]: ...
    async def revoked_many(self, teams: Sequence[str]) -> list[set[str]]: ...
    async def flush_cache(self, *, route: str | None = None, team: str | None = None) -> int: ...
    async def try_lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        """Take the lock `name` for `ttl_ms`, or extend it if `owner` holds it already."""
    async def audit(self, entry: bytes, max_entries: int) -> None: ...
    async def audit_log(self, *, after: str = "-", limit: int = 100) -> list[LedgerEntry]: ...

    # task webhooks (store/hooks.py)
    async def hook_watch(self, hook: Hook, delay_ms: int) -> bool: ...
    async def hook_claim(self, owner: str, lease_ms: int, limit: int) -> list[Claimed]: ...
    async def hook_update(self, hook: Hook, update: Update) -> bool: ...
    async def hook_redeliver(self, hook_id: str) -> bool: ...
    async def hooks_failed(self, *, after: tuple[int, str] | None = None,
                           limit: int = 100) -> list[Hook]: ...
