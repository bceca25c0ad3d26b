"""What the end of a request means for money, memory and ownership: one pure function.

Every way a request can end comes through `decide`: a forwarded answer, a stream that ran to its
end or was cut, no answer at all, another request's answer (single-flight), a cache hit, an
idempotent replay, a task poll (GET, or HEAD without a body), and the reconciler's look at a
reservation nobody settled (`reconcile`). The answer's facts are read once, at the boundary, by
`read_answer`: numbers from the upstream are validated (finite, non-negative, bounded) before any
decision or store script sees them. The README's Budgets section is the table this module
implements; tests/test_settlement.py checks every row.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

import orjson

from . import routes
from .budget import to_milli
from .records import record
from .store.base import Settle

FINAL = frozenset({"completed", "succeeded", "failed", "error", "cancelled"})
FAILED = frozenset({"failed", "error", "cancelled"})
MAX_CREDITS = 1_000_000_000  # per request: a larger `credits_consumed` is not believed


class Kind(enum.Enum):
    """What a request is, as far as its bill goes."""

    SYNC = "sync"  # a POST answered at once (chat/completions, or any other POST)
    CREATE = "create"  # a POST to an async endpoint: answered with a task
    POLL = "poll"  # GET tasks/{id}: may see the task's final status
    PEEK = "peek"  # HEAD tasks/{id}: no body, so it never sees a status
    READ = "read"  # any other request (GET, HEAD, ...): nothing reserved


class End(enum.Enum):
    """How a request ended."""

    ANSWER = "answer"  # the upstream answered in full (any status)
    STREAM = "stream"  # a 2xx event stream ran to its end
    CUT = "cut"  # a stream broke off after it began (the upstream or the client went away)
    NO_ANSWER = "no_answer"  # nothing usable came back: refused, timed out, dropped, cancelled
    COALESCED = "coalesced"  # another request's answer, received as a single-flight follower
    HIT = "hit"  # answered from the cache (carried out inside the store's `admit`)
    REPLAY = "replay"  # the Idempotency-Key's remembered answer


class TaskState(enum.Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class Charge(enum.Enum):
    NONE = "none"  # nothing to settle
    SETTLE = "settle"  # settle the reservation to `Decision.credits` (None: as reserved)
    REFUND = "refund"  # give the reservation back whole
    HOLD = "hold"  # keep it under `task:<id>` until the task's final status is seen


# what the store does with the reservation for each charge (the request's and the reconciler's)
STORE_SETTLE = {Charge.SETTLE: Settle.CHARGE, Charge.REFUND: Settle.REFUND,
                Charge.HOLD: Settle.HOLD}


@record
class Answer:
    """What an upstream answer says that matters to the bill, read once and validated."""

    status: int
    credits: int | None = None  # millicredits reported in `credits_consumed`, if believable
    task_id: str | None = None  # a well-formed task id in the body
    state: TaskState | None = None  # from the body's `status`, when it has one
    size: int = 0  # body bytes
    storable: bool = True  # the upstream did not say `Cache-Control: no-store`
    shareable: bool = True  # ... nor `private` (which keeps it out of an organisation cache)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def retryable(self) -> bool:
        """An answer the upstream may give differently on a retry."""
        return self.status == 429 or self.status >= 500


@record
class Billing:
    """The facts of a request that its bill depends on (see `request.ParsedRequest`)."""

    kind: Kind
    price: int = 0  # millicredits reserved before forwarding (0: nothing reserved)
    task_id: str | None = None  # POLL / PEEK: the task asked about
    idempotent: bool = False  # carries an Idempotency-Key
    cacheable: bool = False  # its answer may be stored in the cache
    shared: bool = False  # ... in the organisation-wide cache


@dataclass(frozen=True, slots=True)
class CacheRules:
    ttl_s: float
    task_ttl_s: float
    pending_task_ttl_s: float
    max_entry_bytes: int


@record
class Decision:
    charge: Charge = Charge.NONE
    credits: int | None = None  # with SETTLE: millicredits to charge; None = as reserved
    task: str | None = None  # the charge applies to `task:<id>`, not the request's reservation
    remember: bool = False  # keep the answer for the Idempotency-Key (else release the key)
    cache_ttl_s: float = 0.0  # store the answer in the cache for this long (0: do not)
    owner: str | None = None  # the task this team owns from now on
    saved: int = 0  # millicredits the team did not spend because another request paid


NOTHING = Decision()


def decide(req: Billing, end: End, answer: Answer | None, rules: CacheRules) -> Decision:
    """The one rule for what the end of a request does; every path calls it."""
    reserved = req.kind in (Kind.SYNC, Kind.CREATE)  # every POST reserves, even at price 0
    if end is End.REPLAY:
        return NOTHING  # the first request was charged and recorded
    if end is End.HIT:
        # carried out by the store's `admit`: charged nothing, recorded as cached (with what the
        # entry cost) and remembered for the key; an async task's id is this team's too
        task = answer.task_id if answer is not None and req.kind is Kind.CREATE else None
        return Decision(remember=req.idempotent, owner=task)
    if end is End.NO_ANSWER or answer is None:
        return Decision(Charge.REFUND if reserved else Charge.NONE)
    if end is End.CUT:  # the upstream did part of the work: charged as reported, or as reserved
        return Decision(Charge.SETTLE if reserved else Charge.NONE, credits=answer.credits)
    remember = req.idempotent and not answer.retryable
    if not answer.ok:
        if end is End.COALESCED:
            return Decision(remember=remember)
        return Decision(Charge.REFUND if reserved else Charge.NONE, remember=remember)

    owner = answer.task_id if req.kind is Kind.CREATE else None
    if end is End.COALESCED:
        saved = 0
        if req.kind in (Kind.SYNC, Kind.CREATE):
            saved = answer.credits if answer.credits is not None else req.price
        return Decision(remember=remember, owner=owner, saved=saved)

    cache_ttl = _cache_ttl(req, end, answer, rules)
    if req.kind is Kind.SYNC:
        return Decision(Charge.SETTLE, answer.credits, remember=remember, cache_ttl_s=cache_ttl)
    if req.kind is Kind.CREATE:
        running = answer.state is TaskState.RUNNING or (answer.state is None and owner)
        if running and owner is not None:
            return Decision(Charge.HOLD, task=owner, remember=remember, cache_ttl_s=cache_ttl,
                            owner=owner)
        return replace(_final(answer), remember=remember, cache_ttl_s=cache_ttl, owner=owner)
    if req.kind is Kind.POLL and answer.state in (TaskState.DONE, TaskState.FAILED):
        return replace(_final(answer), task=req.task_id, cache_ttl_s=cache_ttl)
    return Decision(cache_ttl_s=cache_ttl)  # a running task, a HEAD, a plain GET


def written_first(req: Billing, decision: Decision) -> bool:
    """Whether a later request relies on this end at once, so that it is in the store before
    the client sees the answer (it may retry, or poll another replica, straight away): the
    Idempotency-Key's answer (or its release, so that a retry is not refused as in flight), a
    task's owner, and a refund (a retry must find its credits back, not a spurious 402).
    Charges, the cache and the ledger follow after the answer."""
    return req.idempotent or decision.owner is not None or decision.charge is Charge.REFUND


def records_stream(req: Billing) -> bool:
    """Whether a stream is kept whole as it passes, for its end: only when `decide` may remember
    it, for an Idempotency-Key (it caches no stream: `_cache_ttl` takes whole answers alone).
    Any other stream keeps its tail, where its credits and usage are."""
    return req.idempotent


def reconcile(reservation_id: str, *, owner_alive: bool, poll: Answer | None) -> Decision | None:
    """What the reconciler does with a reservation past its deadline; None: leave it for now.

    A request's reservation is only settled once the process that made it is gone (it may
    still be answering, or retrying its bookkeeping): charged as reserved, since the upstream
    may have done the work. A task's reservation is settled as a poll of it would be (`poll`
    is the upstream's answer, None when none came); a task the upstream does not know is
    charged as reserved.
    """
    task_id = reservation_id.removeprefix("task:") if reservation_id.startswith("task:") else None
    if task_id is None:
        return None if owner_alive else Decision(Charge.SETTLE)
    if poll is None or (not poll.ok and poll.status != 404):
        return None
    if poll.status == 404:
        return Decision(Charge.SETTLE, task=task_id)
    decision = decide(Billing(Kind.POLL, task_id=task_id), End.ANSWER, poll,
                      CacheRules(0, 0, 0, 0))
    return decision if decision.charge is not Charge.NONE else Decision(Charge.HOLD, task=task_id)


def _final(answer: Answer) -> Decision:
    """A final answer's charge: what the upstream reported (as reserved when it said nothing);
    a failed task is refunded unless the upstream says it cost something."""
    if answer.state is TaskState.FAILED and not answer.credits:
        return Decision(Charge.REFUND)
    return Decision(Charge.SETTLE, answer.credits)


def _cache_ttl(req: Billing, end: End, answer: Answer, rules: CacheRules) -> float:
    if (not req.cacheable or end is not End.ANSWER or not answer.storable
            or (req.shared and not answer.shareable)
            or not 0 < answer.size <= rules.max_entry_bytes):
        return 0.0
    if req.kind is Kind.POLL:
        final = answer.state in (TaskState.DONE, TaskState.FAILED)
        return rules.task_ttl_s if final else rules.pending_task_ttl_s
    return rules.ttl_s


# -- reading an answer -----------------------------------------------------------------------


def read_answer(status: int, cache_control: bytes | None, body: bytes, *,
                stream: bool = False) -> Answer:
    """The facts of an upstream answer; `body` is a stream's tail when `stream` is true."""
    storable = shareable = True
    if cache_control is not None:
        directives = cache_control.lower()
        storable = b"no-store" not in directives
        shareable = b"private" not in directives
    if stream:
        return Answer(status, credits=_stream_credits(body), size=len(body),
                      storable=storable, shareable=shareable)
    data = _json_object(body)
    if data is None:
        return Answer(status, size=len(body), storable=storable, shareable=shareable)
    state = None
    value = data.get("status")
    if isinstance(value, str):
        word = value.lower()
        state = (TaskState.FAILED if word in FAILED else TaskState.DONE if word in FINAL
                 else TaskState.RUNNING)
    task_id = data.get("id")
    if not isinstance(task_id, str) or routes.task_id_of(f"tasks/{task_id}") is None:
        task_id = None
    return Answer(status, credits=credits_of(data.get("credits_consumed")), task_id=task_id,
                  state=state, size=len(body), storable=storable, shareable=shareable)


def credits_of(value: object) -> int | None:
    """`credits_consumed` in millicredits, or None when it is absent or not believable."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value) or not 0 <= value <= MAX_CREDITS:
        return None
    return to_milli(value)


def _json_object(body: bytes) -> dict[str, object] | None:
    if not body.lstrip().startswith(b"{"):
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _stream_credits(tail: bytes) -> int | None:
    """The `credits_consumed` of the last server-sent event that reports one."""
    for line in _reversed_lines(tail):
        if not line.startswith(b"data:"):
            continue
        data = _json_object(line[5:].strip())
        if data is not None and "credits_consumed" in data:
            return credits_of(data["credits_consumed"])
    return None


def _reversed_lines(text: bytes) -> Iterable[bytes]:
    return reversed(text.replace(b"\r\n", b"\n").split(b"\n"))
