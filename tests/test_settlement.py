"""The settlement policy's specification: one row per way a request can end.

README.md's Budgets section is this table in words; `settlement.decide` is the one function
every path calls (forwarded answers, streams, coalesced answers, hits, replays, polls, the
reconciler).
"""

from __future__ import annotations

import pytest

from gateway.settlement import (
    MAX_CREDITS,
    Answer,
    Billing,
    CacheRules,
    Charge,
    Decision,
    End,
    Kind,
    TaskState,
    credits_of,
    decide,
    read_answer,
    reconcile,
    written_first,
)

RULES = CacheRules(ttl_s=60, task_ttl_s=600, pending_task_ttl_s=2, max_entry_bytes=1000)
SYNC = Billing(Kind.SYNC, price=10_000, cacheable=True)
SYNC_KEYED = Billing(Kind.SYNC, price=10_000, idempotent=True)
CREATE = Billing(Kind.CREATE, price=4_000, idempotent=True)
POLL = Billing(Kind.POLL, task_id="task_1", cacheable=True)
PEEK = Billing(Kind.PEEK, task_id="task_1")
READ = Billing(Kind.READ, cacheable=True)
SHARED = Billing(Kind.SYNC, price=10_000, cacheable=True, shared=True)


def ok(**kw: object) -> Answer:
    return Answer(200, size=100, **kw)  # type: ignore[arg-type]


ROWS: list[tuple[str, Billing, End, Answer | None, Decision]] = [
    # synchronous POSTs (chat)
    ("chat answered with credits", SYNC, End.ANSWER, ok(credits=3_000),
     Decision(Charge.SETTLE, 3_000, cache_ttl_s=60)),
    ("chat answered without credits: as reserved", SYNC, End.ANSWER, ok(),
     Decision(Charge.SETTLE, None, cache_ttl_s=60)),
    ("chat too big to cache", SYNC, End.ANSWER, Answer(200, 2_000, size=5_000),
     Decision(Charge.SETTLE, 2_000)),
    ("chat, upstream says no-store", SYNC, End.ANSWER, ok(credits=1, storable=False),
     Decision(Charge.SETTLE, 1)),
    ("chat, upstream says private, organisation cache", SHARED, End.ANSWER,
     ok(credits=1, shareable=False), Decision(Charge.SETTLE, 1)),
    ("chat, upstream 400 is remembered", SYNC_KEYED, End.ANSWER, Answer(400, size=50),
     Decision(Charge.REFUND, remember=True)),
    ("chat, upstream 500 is not remembered", SYNC_KEYED, End.ANSWER, Answer(500, size=50),
     Decision(Charge.REFUND)),
    ("chat, upstream 429 is not remembered", SYNC_KEYED, End.ANSWER, Answer(429),
     Decision(Charge.REFUND)),
    ("no answer at all", SYNC_KEYED, End.NO_ANSWER, None, Decision(Charge.REFUND)),
    ("never sent: its upstream slot did not come in time (429), or no account was left",
     SYNC_KEYED, End.NO_ANSWER, None, Decision(Charge.REFUND)),
    ("task never sent: no upstream slot in time", CREATE, End.NO_ANSWER, None,
     Decision(Charge.REFUND)),
    ("remembered 2xx", SYNC_KEYED, End.ANSWER, ok(credits=5),
     Decision(Charge.SETTLE, 5, remember=True)),
    # streams
    ("stream ran to its end", SYNC_KEYED, End.STREAM, Answer(200, credits=2_500),
     Decision(Charge.SETTLE, 2_500, remember=True)),
    ("stream ended without credits", SYNC, End.STREAM, Answer(200),
     Decision(Charge.SETTLE, None)),
    ("stream cut after its credits came", SYNC_KEYED, End.CUT, Answer(200, credits=900),
     Decision(Charge.SETTLE, 900)),
    ("stream cut: as reserved, key released", SYNC_KEYED, End.CUT, Answer(200),
     Decision(Charge.SETTLE, None)),
    # async POSTs (tasks)
    ("task created and running: held, owned", CREATE, End.ANSWER,
     ok(task_id="task_9", state=TaskState.RUNNING),
     Decision(Charge.HOLD, task="task_9", remember=True, owner="task_9")),
    ("task answered without a status: held", CREATE, End.ANSWER, ok(task_id="task_9"),
     Decision(Charge.HOLD, task="task_9", remember=True, owner="task_9")),
    ("task failed at once, no credits: refunded", CREATE, End.ANSWER,
     ok(task_id="task_9", state=TaskState.FAILED),
     Decision(Charge.REFUND, remember=True, owner="task_9")),
    ("task failed at once, credits reported", CREATE, End.ANSWER,
     ok(task_id="task_9", state=TaskState.FAILED, credits=1_000),
     Decision(Charge.SETTLE, 1_000, remember=True, owner="task_9")),
    ("task done at once", CREATE, End.ANSWER,
     ok(task_id="task_9", state=TaskState.DONE, credits=7_000),
     Decision(Charge.SETTLE, 7_000, remember=True, owner="task_9")),
    ("running task without an id: as reserved", CREATE, End.ANSWER,
     ok(state=TaskState.RUNNING), Decision(Charge.SETTLE, None, remember=True)),
    # polls
    ("poll of a running task: nothing, briefly cached", POLL, End.ANSWER,
     ok(state=TaskState.RUNNING), Decision(cache_ttl_s=2)),
    ("poll sees it done: the task's reservation settled", POLL, End.ANSWER,
     ok(state=TaskState.DONE, credits=6_000),
     Decision(Charge.SETTLE, 6_000, task="task_1", cache_ttl_s=600)),
    ("poll sees it failed: refunded", POLL, End.ANSWER, ok(state=TaskState.FAILED),
     Decision(Charge.REFUND, task="task_1", cache_ttl_s=600)),
    ("poll answered 404 by the upstream", POLL, End.ANSWER, Answer(404, size=20), Decision()),
    ("HEAD poll never settles", PEEK, End.ANSWER, Answer(200), Decision()),
    ("plain GET: cached, no charge", READ, End.ANSWER, ok(), Decision(cache_ttl_s=60)),
    ("plain GET, no answer", READ, End.NO_ANSWER, None, Decision()),
    # answers another request paid for
    ("coalesced chat: saved what the leader paid", SYNC_KEYED, End.COALESCED, ok(credits=3_000),
     Decision(remember=True, saved=3_000)),
    ("coalesced chat without credits: saved the price", SYNC, End.COALESCED, ok(),
     Decision(saved=10_000)),
    ("coalesced 500: not remembered", SYNC_KEYED, End.COALESCED, Answer(500), Decision()),
    ("coalesced 429: not remembered", SYNC_KEYED, End.COALESCED, Answer(429), Decision()),
    ("coalesced 400: remembered", SYNC_KEYED, End.COALESCED, Answer(400),
     Decision(remember=True)),
    ("coalesced task: owned by this team too", CREATE, End.COALESCED,
     ok(task_id="task_9", state=TaskState.RUNNING, credits=None),
     Decision(remember=True, owner="task_9", saved=4_000)),
    ("coalesced poll: nothing", POLL, End.COALESCED, ok(state=TaskState.DONE), Decision()),
    ("cache hit: remembered (in admit)", SYNC_KEYED, End.HIT, ok(), Decision(remember=True)),
    ("cache hit of a task: owned", CREATE, End.HIT, ok(task_id="task_9"),
     Decision(remember=True, owner="task_9")),
    ("replay: nothing at all", SYNC_KEYED, End.REPLAY, ok(), Decision()),
]


@pytest.mark.parametrize(("billing", "end", "answer", "expected"),
                         [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_every_end_of_a_request(billing: Billing, end: End, answer: Answer | None,
                                expected: Decision) -> None:
    assert decide(billing, end, answer, RULES) == expected


def test_state_a_later_request_relies_on_goes_first() -> None:
    assert written_first(SYNC_KEYED, Decision(remember=True))
    assert written_first(SYNC_KEYED, Decision(Charge.REFUND))  # the key's release, too
    assert written_first(CREATE, Decision(Charge.HOLD, task="t", owner="t"))
    assert written_first(SYNC, Decision(Charge.REFUND))  # a retry finds its credits back
    assert not written_first(SYNC, Decision(Charge.SETTLE, 5, cache_ttl_s=60))
    assert not written_first(POLL, Decision(cache_ttl_s=2))


@pytest.mark.parametrize(("reservation", "alive", "poll", "expected"), [
    ("abc.1", True, None, None),  # a live process is still answering it
    ("abc.1", False, None, Decision(Charge.SETTLE)),  # its process died: as reserved
    ("lost", False, None, Decision(Charge.SETTLE)),
    ("task:t1", True, None, None),  # the upstream could not be asked: next round
    ("task:t1", True, Answer(503), None),
    ("task:t1", True, Answer(404), Decision(Charge.SETTLE, task="t1")),
    ("task:t1", True, Answer(200, state=TaskState.RUNNING), Decision(Charge.HOLD, task="t1")),
    ("task:t1", True, Answer(200, credits=8_000, state=TaskState.DONE),
     Decision(Charge.SETTLE, 8_000, task="t1")),
    ("task:t1", True, Answer(200, state=TaskState.FAILED), Decision(Charge.REFUND, task="t1")),
])
def test_the_reconciler(reservation: str, alive: bool, poll: Answer | None,
                        expected: Decision | None) -> None:
    assert reconcile(reservation, owner_alive=alive, poll=poll) == expected


# -- reading what the upstream said -------------------------------------------------------------


@pytest.mark.parametrize(("value", "milli"), [
    (3, 3_000), (0, 0), (2.5, 2_500), (0.0004, 0), (MAX_CREDITS, MAX_CREDITS * 1000),
    (-1, None), (MAX_CREDITS + 1, None), (float("inf"), None), (float("nan"), None),
    (True, None), ("3", None), (None, None), ([3], None),
])
def test_credits_are_believed_only_when_sane(value: object, milli: int | None) -> None:
    assert credits_of(value) == milli


def test_an_answer_is_read_once() -> None:
    body = b'{"id": "task_42", "status": "Pending", "credits_consumed": 1.5}'
    assert read_answer(200, b"max-age=60", body) == Answer(
        200, credits=1_500, task_id="task_42", state=TaskState.RUNNING, size=len(body))
    assert read_answer(200, None, b'{"status": "FAILED"}').state is TaskState.FAILED
    assert read_answer(200, None, b'{"status": "succeeded"}').state is TaskState.DONE
    assert read_answer(200, None, b'{"id": "../etc"}').task_id is None
    assert read_answer(200, b"no-store", b"{}").storable is False
    assert read_answer(200, b"Private, max-age=5", b"{}").shareable is False
    # not JSON, or credits that JSON cannot hold: nothing is believed, nothing raises
    assert read_answer(200, None, b'{"credits_consumed": 1e999}').credits is None
    assert read_answer(200, None, b"<html>").credits is None
    assert read_answer(200, None, b"").state is None  # a HEAD answer


def test_a_stream_reports_its_credits_in_its_last_events() -> None:
    tail = (b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'
            b'data: {"choices": [], "credits_consumed": 2}\r\n\r\n'
            b"data: [DONE]\n\n")
    assert read_answer(200, None, tail, stream=True).credits == 2_000
    broken = b'data: {"credits_consumed": "1.2.3"}\n\ndata: [DONE]\n\n'
    assert read_answer(200, None, broken, stream=True).credits is None
    huge = b'data: {"credits_consumed": 1e999}\n\n'
    assert read_answer(200, None, huge, stream=True).credits is None
    assert read_answer(200, None, b"data: partial", stream=True).credits is None
