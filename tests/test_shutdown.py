"""SIGTERM: stop accepting, finish what is in flight (streams too), settle, exit 0."""

from __future__ import annotations

import asyncio
import gc
import signal
import threading
import time
from typing import Any

import httpx
import orjson

from gateway import config as cfg
from gateway.app import YOUNG_COLLECTION_EVERY, create_app
from gateway.store import open_store

from .conftest import KEYS, Mock, RedisServer, ServerThread, base_config
from .test_limits import teams_with


def test_sigterm_finishes_in_flight_requests_and_exits_0(redis_server: RedisServer, mock: Mock,
                                                         gateway_process: Any) -> None:
    redis_server.cli("FLUSHALL")
    config = base_config(mock.api_url, redis_server.url,
                         teams=teams_with(budget={"credits": 1000}),
                         listen={"shutdown_grace_s": 20})
    gateway = gateway_process(config)
    headers = {"Authorization": f"Bearer {KEYS['research']}"}
    results: dict[str, Any] = {}

    def slow_chat() -> None:
        body = {"model": "gemini", "mock_credits": 3,
                "messages": [{"role": "user", "content": "slow"}]}
        results["chat"] = httpx.post(f"{gateway.url}/api/v1/chat/completions", json=body,
                                     headers=headers, timeout=30)

    def stream() -> None:
        body = {"model": "gemini", "stream": True, "mock_chunk_delay_s": 0.3, "mock_credits": 4,
                "messages": [{"role": "user", "content": "one two three four five"}]}
        with httpx.stream("POST", f"{gateway.url}/api/v1/chat/completions", json=body,
                          headers=headers, timeout=30) as response:
            results["stream"] = b"".join(response.iter_bytes())

    mock.fault(delay_s=1.5, path="chat/completions")  # the first chat call is slow
    workers = [threading.Thread(target=slow_chat), threading.Thread(target=stream)]
    workers[0].start()
    time.sleep(0.2)
    workers[1].start()
    time.sleep(0.5)
    gateway.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    try:
        httpx.get(f"{gateway.url}/healthz", timeout=2)
        accepted_after_sigterm = True
    except httpx.HTTPError:
        accepted_after_sigterm = False
    for worker in workers:
        worker.join(30)

    assert gateway.stop() == 0
    assert not accepted_after_sigterm
    assert results["chat"].status_code == 200
    assert results["stream"].endswith(b"data: [DONE]\n\n")

    async def ledger() -> tuple[list[dict[str, Any]], Any]:
        store = open_store(redis_server.url)
        entries = [orjson.loads(e.event) for e in await store.ledger("research")]
        (usage,) = await store.budgets([("research", time.strftime("m%Y-%m", time.gmtime()))])
        await store.close()
        return entries, usage

    entries, usage = asyncio.run(ledger())
    assert sorted(e["credits"] for e in entries) == [3000, 4000]  # millicredits, both settled
    assert (usage.spent, usage.reserved) == (7000, 0)


def test_the_serving_process_settles_its_heap_once_started(mock: Mock) -> None:
    """`serve` (create_app_from_env: owns_process) freezes what start-up made and spaces young
    collections out, once the app has started; an app that shares its process (a test's) leaves
    the garbage collector as it found it."""
    before = gc.get_threshold(), gc.get_freeze_count()
    try:
        for owns_process in (False, True):
            app = create_app(cfg.from_dict(base_config(mock.api_url)), owns_process=owns_process)
            server = ServerThread(app).start()
            try:
                assert httpx.get(f"{server.url}/healthz").status_code == 200
                settled = gc.get_threshold()[0] == YOUNG_COLLECTION_EVERY
                assert settled is owns_process, (owns_process, gc.get_threshold())
                assert (gc.get_freeze_count() > 0) is owns_process
            finally:
                server.stop()
    finally:
        gc.unfreeze()
        gc.set_threshold(*before[0])
