"""The bill is exact: each way a request's end was once charged wrongly (issue 11), on
memory:// and Redis, against the mock upstream, which keeps its own bill."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest

from gateway import config as cfg
from gateway.app import create_app
from gateway.store import StoreError, open_store
from gateway.store.payload import Args
from gateway.store.scripts import Call, Engine, ScriptStore

from .conftest import (
    KEYS,
    GatewayFactory,
    Mock,
    RedisServer,
    RunningGateway,
    ServerThread,
    base_config,
)
from .test_limits import teams_with
from .test_proxy import error_of, wait_ledger
from .test_tasks import create, poll_until_final

CHAT = {"model": "gemini", "messages": [{"role": "user", "content": "exact"}]}


def budget_gateway(make_gateway: GatewayFactory, store_url: str, **kw: Any) -> RunningGateway:
    return make_gateway(store_url, teams=teams_with(budget={"credits": 1000}), **kw)


def books(gateway: RunningGateway) -> tuple[float, float]:
    """(spent, reserved) of research's budget, once the bookkeeping has landed."""
    gateway.drain()
    row = gateway.team()
    return row["spent"], row["reserved"]


def in_background(call: Any) -> tuple[threading.Thread, list[httpx.Response]]:
    out: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: out.append(call()))
    thread.start()
    return thread, out


# -- 1. a HEAD poll settles nothing --------------------------------------------------------------


def test_a_head_poll_never_settles_a_task(make_gateway: GatewayFactory, store_url: str,
                                          mock: Mock) -> None:
    gateway = budget_gateway(make_gateway, store_url)
    done = create(gateway, mock_delay_s=0.3, mock_credits=7)
    failing = create(gateway, mock_delay_s=0.3, mock_fail=True)
    for task_id in (done, failing):
        for _ in range(3):
            peek = gateway.call("HEAD", f"tasks/{task_id}")
            assert peek.status_code == 200 and peek.content == b""
    assert books(gateway) == (0, 8)  # flux-2 reserves 4 each: nothing settled by a HEAD
    assert poll_until_final(gateway, done)["credits_consumed"] == 7
    assert poll_until_final(gateway, failing)["status"] == "failed"
    assert books(gateway) == (7, 0)  # the real cost, and the failed task refunded
    assert mock.count(f"HEAD tasks/{done}") == 3


# -- 2. an async POST that fails at once --------------------------------------------------------


@pytest.mark.parametrize(("body", "spent"), [
    ({"mock_final": "failed"}, 0),  # failed, no credits reported: refunded
    ({"mock_final": "failed", "mock_credits": 1}, 1),  # failed, but the upstream charged 1
    ({"mock_final": "completed", "mock_credits": 3}, 3),  # done at once
])
def test_an_async_post_answered_with_a_final_status(make_gateway: GatewayFactory, store_url: str,
                                                    body: dict[str, Any], spent: float) -> None:
    gateway = budget_gateway(make_gateway, store_url)
    task_id = create(gateway, **body)
    assert books(gateway) == (spent, 0)
    assert gateway.call("GET", f"tasks/{task_id}").status_code == 200  # still the team's


# -- 3. a streamed chat with an Idempotency-Key runs once -----------------------------------------


def test_a_streamed_chat_with_an_idempotency_key_runs_once(
        make_gateway: GatewayFactory, store_url: str, mock: Mock) -> None:
    gateway = budget_gateway(make_gateway, store_url)
    body = {**CHAT, "stream": True, "mock_credits": 3, "mock_chunk_delay_s": 0}
    first = gateway.chat(extra=body, headers={"Idempotency-Key": "stream-1"})
    assert first.status_code == 200 and b"[DONE]" in first.content
    again = gateway.chat(extra=body, headers={"Idempotency-Key": "stream-1"})
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert again.headers["content-type"].startswith("text/event-stream")
    assert mock.count("POST chat/completions") == 1
    assert books(gateway) == (3, 0)


# -- 4. a follower does not remember another request's 5xx ----------------------------------------


@pytest.mark.parametrize("status", [500, 429])
def test_a_follower_does_not_remember_a_leaders_failure(
        make_gateway: GatewayFactory, store_url: str, mock: Mock, status: int) -> None:
    gateway = budget_gateway(make_gateway, store_url)
    mock.fault(status=status, delay_s=0.5, retry_after="1")
    leader, _ = in_background(lambda: gateway.chat("follow me"))
    mock.wait_for("POST chat/completions")
    follower = gateway.chat("follow me", headers={"Idempotency-Key": "f-1"})
    leader.join()
    assert follower.status_code == status and follower.headers["x-cache"] == "COALESCED"
    retry = gateway.chat("follow me", headers={"Idempotency-Key": "f-1"})
    assert retry.status_code == 200 and "idempotent-replayed" not in retry.headers
    assert mock.count("POST chat/completions") == 2
    assert books(gateway)[1] == 0


# -- 5. a follower whose leader got no answer goes on with its own ---------------------------------


def test_a_follower_with_a_key_whose_leader_failed_is_not_409(
        make_gateway: GatewayFactory, store_url: str, mock: Mock) -> None:
    gateway = budget_gateway(make_gateway, store_url)
    mock.fault(drop=True, delay_s=0.5)
    leader, led = in_background(lambda: gateway.chat("no answer"))
    mock.wait_for("POST chat/completions")
    follower = gateway.chat("no answer", headers={"Idempotency-Key": "f-2"})
    leader.join()
    assert led[0].status_code == 502
    assert follower.status_code == 200, follower.text
    replay = gateway.chat("no answer", headers={"Idempotency-Key": "f-2"})
    assert replay.headers["idempotent-replayed"] == "true" and replay.json() == follower.json()
    assert books(gateway) == (2, 0)  # only the follower's own call (gemini: 2)


# -- 6. the deadline bounds the whole call ---------------------------------------------------------


def test_a_slow_upstream_ends_every_identical_request_by_its_deadline(
        make_gateway: GatewayFactory, store_url: str, mock: Mock) -> None:
    """With the deadline shorter than the lock, no second leader can start while the first one
    runs: identical requests all end cleanly, none with a 500, nothing stays reserved."""
    gateway = budget_gateway(make_gateway, store_url,
                             upstream={"timeout_s": 0.5, "queue_timeout_s": 0, "retries": 0})
    for _ in range(6):
        mock.fault(delay_s=2)
    threads = [in_background(lambda: gateway.chat("slow")) for _ in range(4)]
    for thread, _ in threads:
        thread.join()
    statuses = [out[0].status_code for _, out in threads]
    assert 504 in statuses and set(statuses) <= {503, 504}, statuses  # followers may give up
    assert all(error_of(out[0])["type"] == "upstream_unavailable" for _, out in threads)
    assert books(gateway) == (0, 0)
    assert len(gateway.app.runtime.flights) == 0


# -- 7. a bookkeeping outage loses nothing ---------------------------------------------------------


class Outage:
    """Makes the store unreachable for a while: the real Redis is frozen (SIGSTOP); the
    embedded store's engine answers as an unreachable one would."""

    def __init__(self, redis: RedisServer | None) -> None:
        self.redis = redis
        self.down = False

    def begin(self) -> None:
        self.down = True
        if self.redis is not None:
            self.redis.pause()

    def end(self) -> None:
        self.down = False
        if self.redis is not None:
            self.redis.resume()


class _Unreachable:
    """The embedded engine, unreachable while `outage.down`."""

    def __init__(self, engine: Engine, outage: Outage) -> None:
        self.engine, self.outage = engine, outage

    def _check(self) -> None:
        if self.outage.down:
            raise StoreError("store unreachable (test)")

    async def connect(self) -> None:
        await self.engine.connect()

    async def close(self) -> None:
        await self.engine.close()

    async def run(self, name: str, keys: Sequence[str], args: Args) -> Any:
        self._check()
        return await self.engine.run(name, keys, args)

    async def run_many(self, calls: Sequence[Call]) -> list[Any]:
        self._check()
        return await self.engine.run_many(calls)

    async def delete_matching(self, pattern: str) -> int:
        self._check()
        return await self.engine.delete_matching(pattern)


def wait_for_failed_bookkeeping(gateway: RunningGateway, attempts: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        text = gateway.metrics()
        line = next((x for x in text.splitlines()
                     if x.startswith('gateway_store_errors_total{operation="finish"}')), "")
        if line and float(line.split()[-1]) >= attempts:
            return
        assert time.monotonic() < deadline, "the bookkeeping never tried during the outage"
        time.sleep(0.05)


@pytest.fixture
def outage_gateway(request: pytest.FixtureRequest, store_url: str,
                   mock: Mock) -> Iterator[tuple[RunningGateway, Outage]]:
    raw = base_config(mock.api_url, store_url, teams=teams_with(budget={"credits": 1000}),
                      store={"timeout_s": 0.3})
    if store_url.startswith("memory://"):
        outage = Outage(None)
        memory = open_store("memory://")
        store = ScriptStore(_Unreachable(memory.engine, outage))
    else:
        server: RedisServer = request.getfixturevalue("private_redis")
        outage = Outage(server)
        raw["store"]["url"] = server.url
        store = None
    app = create_app(cfg.from_dict(raw), store=store)
    gateway = RunningGateway(ServerThread(app).start(), app)
    yield gateway, outage
    outage.end()
    gateway.close()


def test_bookkeeping_waits_out_a_store_outage(outage_gateway: tuple[RunningGateway, Outage],
                                              mock: Mock) -> None:
    """Requests admitted before the outage answer during it; what their ends decided (refunds,
    charges, a task's owner, an idempotent answer) reaches the store once it is back."""
    gateway, outage = outage_gateway
    mock.fault(delay_s=0.6, path="chat", count=2)
    mock.fault(status=500, delay_s=0.6, path="videos")
    mock.fault(delay_s=0.6, path="images")
    calls = [
        in_background(lambda: gateway.chat("charged", extra={"mock_credits": 3})),
        in_background(lambda: gateway.chat("remembered", headers={"Idempotency-Key": "o-1"})),
        in_background(lambda: gateway.call("POST", "videos/generations", json={
            "model": "kling-3", "prompt": "refunded"})),
        in_background(lambda: gateway.call("POST", "images/generations", json={
            "model": "flux-2", "prompt": "owned", "mock_delay_s": 0})),
    ]
    mock.wait_for("POST chat/completions", 2)
    mock.wait_for("POST videos/generations")
    mock.wait_for("POST images/generations")
    outage.begin()
    for thread, _ in calls:
        thread.join()
    answers = [out[0] for _, out in calls]
    assert [a.status_code for a in answers] == [200, 200, 500, 200]
    wait_for_failed_bookkeeping(gateway, 3)  # the outage lasts: attempts fail meanwhile
    outage.end()
    task_id = answers[3].json()["id"]
    assert books(gateway) == (3 + 2, 4)  # charged, remembered (gemini: 2), the task held (4)
    assert poll_until_final(gateway, task_id)["status"] == "completed"
    assert books(gateway) == (3 + 2 + 4, 0)
    replay = gateway.chat("remembered", headers={"Idempotency-Key": "o-1"})
    assert replay.headers["idempotent-replayed"] == "true"
    assert gateway.call("GET", f"tasks/{task_id}").status_code == 200
    kinds = sorted(e["kind"] for e in wait_ledger(gateway, 4))
    assert kinds == ["charge", "charge", "charge", "refund"]


# -- 9. numbers from the upstream that do not parse ------------------------------------------------


@pytest.mark.parametrize("raw", ["1e999", "-5", '"1.2.3"'])
def test_unbelievable_credits_charge_the_reservation(make_gateway: GatewayFactory,
                                                     store_url: str, mock: Mock,
                                                     raw: str) -> None:
    gateway = budget_gateway(make_gateway, store_url)
    mock.fault(delay_s=0.3)
    body = {**CHAT, "mock_raw_credits": raw}
    threads = [in_background(lambda: gateway.chat(extra=body)) for _ in range(3)]
    for thread, _ in threads:
        thread.join()
    assert [out[0].status_code for _, out in threads] == [200] * 3
    assert mock.count("POST chat/completions") == 1
    assert books(gateway) == (2, 0)  # as reserved (gemini: 2)
    streamed = gateway.chat(extra={**body, "stream": True, "mock_chunk_delay_s": 0})
    assert streamed.status_code == 200 and b"[DONE]" in streamed.content
    assert books(gateway) == (4, 0)
    assert len(gateway.app.runtime.flights) == 0


# -- the client going away mid-stream -------------------------------------------------------------


def test_a_stream_the_client_leaves_is_charged_as_the_upstream_bills_it(
        make_gateway: GatewayFactory, store_url: str, mock: Mock) -> None:
    gateway = budget_gateway(make_gateway, store_url)
    body = {**CHAT, "stream": True, "mock_hold": True, "mock_credits": 1}
    with httpx.Client(base_url=gateway.url, timeout=10) as client, client.stream(
            "POST", "/api/v1/chat/completions", json=body,
            headers={"Authorization": f"Bearer {KEYS['research']}"}) as stream:
        first = next(stream.iter_raw())
        assert first.startswith(b"data: ")
    # the client is gone; the stream was cut while the upstream held it
    deadline = time.monotonic() + 10
    while mock.client.get("/_mock/bill").json()["answers"] == 0:
        assert time.monotonic() < deadline, "the upstream never saw the stream cut"
        time.sleep(0.02)
    mock.release()
    assert books(gateway) == (2, 0)  # the list price: what the upstream bills for a cut stream
    assert mock.client.get("/_mock/bill").json()["total"] == 2
