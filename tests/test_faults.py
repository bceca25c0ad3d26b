"""Faults injected while load is running: afterwards nothing is stranded, nothing partial is
cached, every charge adds up, and the gateway still serves."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest

from .conftest import KEYS, GatewayFactory, Mock, RedisServer, RunningGateway
from .test_limits import teams_with

BODIES = [{"model": "gemini", "messages": [{"role": "user", "content": f"load {i}"}]}
          for i in range(8)]
STATUSES_UNDER_FAULT = {200, 429, 500, 502, 503, 504}


async def _load(url: str, stop: threading.Event, *, workers: int, timeout: float,
                bodies: list[dict[str, Any]]) -> Counter[int]:
    statuses: Counter[int] = Counter()
    headers = {"Authorization": f"Bearer {KEYS['research']}"}
    async with httpx.AsyncClient(timeout=timeout,
                                 limits=httpx.Limits(max_connections=workers)) as client:
        async def worker(w: int) -> None:
            for i in range(2000):  # bounded, whatever happens
                if stop.is_set():
                    return
                body = bodies[(w * 7 + i) % len(bodies)]
                try:
                    answer = await client.post(f"{url}/api/v1/chat/completions", json=body,
                                               headers=headers)
                    statuses[answer.status_code] += 1
                except httpx.TimeoutException:
                    statuses[0] += 1  # the client gave up (a disconnect mid-request)
        await asyncio.gather(*(worker(w) for w in range(workers)))
    return statuses


class Load:
    """Concurrent requests in the background until the block ends, while a fault is injected.

    Most bodies repeat (cache hits, coalescing), some are new each time (misses upstream)."""

    def __init__(self, gateway: RunningGateway, *, workers: int = 6, timeout: float = 30,
                 seconds: float = 1.5) -> None:
        self.statuses: Counter[int] = Counter()
        self.seconds = seconds
        self._stop = threading.Event()
        fresh = [{"model": "gemini", "messages": [{"role": "user", "content": f"new {i}"}]}
                 for i in range(4000)]
        bodies = BODIES + fresh
        self._thread = threading.Thread(target=lambda: self.statuses.update(asyncio.run(
            _load(gateway.url, self._stop, workers=workers, timeout=timeout, bodies=bodies))))

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(self.seconds)
        self._stop.set()
        self._thread.join(120)
        assert not self._thread.is_alive()


def assert_consistent(gateway: RunningGateway) -> None:
    """No reservation stranded, the ledger adds up to the budget's counters, nothing partial was
    cached, and the gateway still answers."""
    gateway.drain()
    deadline = time.monotonic() + 20
    while True:
        research = gateway.team()
        entries, after = [], "-"
        while True:
            page = gateway.admin("GET", f"teams/research/ledger?limit=1000&after={after}").json()
            entries += page["entries"]
            if page["next"] is None:
                break
            after = page["next"]
        charged = round(sum(e["credits"] for e in entries), 3)
        if research["reserved"] == 0 and charged == research["spent"]:
            break
        assert time.monotonic() < deadline, (research["spent"], research["reserved"], charged)
        time.sleep(0.2)
    for body in BODIES:  # every cached answer is whole
        answer = gateway.call("POST", "chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        assert orjson.loads(answer.content)["choices"][0]["message"]["content"]
    assert gateway.chat("still serving", headers={"Cache-Control": "no-store"}).status_code == 200


@pytest.fixture
def loaded_gateway(make_gateway: GatewayFactory, store_url: str) -> Iterator[RunningGateway]:
    yield make_gateway(store_url, teams=teams_with(budget={"credits": 100_000}),
                       upstream={"timeout_s": 0.5, "retries": 1})


FAULTS: dict[str, Callable[[Mock], None]] = {
    "upstream_5xx": lambda m: m.fault(status=500, count=15),
    "upstream_503_429": lambda m: (m.fault(status=503, count=8), m.fault(status=429, count=8,
                                                                         retry_after="1")),
    "upstream_timeouts": lambda m: m.fault(delay_s=1.0, count=6),
    "dropped_connections": lambda m: m.fault(drop=True, count=10),
    "slow_drip": lambda m: m.fault(drip_s=0.02, count=6),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_upstream_faults_under_load(loaded_gateway: RunningGateway, mock: Mock,
                                    fault: str) -> None:
    with Load(loaded_gateway) as load:
        time.sleep(0.3)
        FAULTS[fault](mock)
    assert set(load.statuses) <= STATUSES_UNDER_FAULT, load.statuses
    assert load.statuses[200] > 0
    assert_consistent(loaded_gateway)


def test_clients_disconnecting_mid_request(loaded_gateway: RunningGateway, mock: Mock) -> None:
    mock.fault(delay_s=0.4, count=30)
    with Load(loaded_gateway, timeout=0.2) as load:
        pass
    assert load.statuses[0] > 0  # some clients did give up
    assert_consistent(loaded_gateway)


def test_clients_disconnecting_mid_stream(loaded_gateway: RunningGateway, mock: Mock) -> None:
    headers = {"Authorization": f"Bearer {KEYS['research']}"}
    body = {"model": "gemini", "stream": True, "mock_chunk_delay_s": 0.1,
            "messages": [{"role": "user", "content": "a long answer " * 5}]}

    def cut_short() -> None:
        with httpx.stream("POST", f"{loaded_gateway.url}/api/v1/chat/completions", json=body,
                          headers=headers, timeout=10) as response:
            next(response.iter_bytes())  # the first event, then hang up

    threads = [threading.Thread(target=cut_short) for _ in range(5)]
    with Load(loaded_gateway):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert_consistent(loaded_gateway)
    stream_charges = [e for e in loaded_gateway.admin(
        "GET", "teams/research/ledger?limit=1000").json()["entries"] if e["credits"] == 2
        and not e["cached"]]
    assert len(stream_charges) >= 5  # each cut stream was charged what it reserved


def _durable_redis() -> RedisServer:
    server = RedisServer("--appendonly", "yes", "--appendfsync", "always")
    server.start()
    return server


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    server = _durable_redis()
    yield server
    server.close()


def test_redis_killed_and_restarted_under_load(durable_redis: RedisServer,
                                               make_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = make_gateway(durable_redis.url, teams=teams_with(budget={"credits": 100_000}))
    with Load(gateway, seconds=1.0) as load:
        time.sleep(0.3)
        durable_redis.stop()
        time.sleep(0.7)
        durable_redis.start()
    assert load.statuses[503] > 0 and load.statuses[200] > 0
    assert set(load.statuses) <= {200, 503}
    assert_consistent(gateway)


def test_redis_slow_under_load(durable_redis: RedisServer, make_gateway: GatewayFactory,
                               mock: Mock) -> None:
    gateway = make_gateway(durable_redis.url, teams=teams_with(budget={"credits": 100_000}),
                           store={"timeout_s": 0.5})  # Redis sleeps past it
    with Load(gateway) as load:
        time.sleep(0.3)
        threading.Thread(target=lambda: durable_redis.cli("DEBUG", "SLEEP", "1.5")).start()
    assert load.statuses[503] > 0 and load.statuses[200] > 0
    assert_consistent(gateway)

