"""The outage drill: Redis killed and restarted under steady load, in both `store.on_error`
modes. Afterwards every team's spent, its tasks and its revocations are what they would have
been without the outage: closed refused what it could not decide, open replayed what it did."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from gateway.tasks import Reconciler

from .conftest import KEYS, GatewayFactory, Mock, RedisServer, RunningGateway, eventually


class Load:
    """Chats and task creations for research, in a thread, until stopped; each answer's status
    is counted by phase (before, during, after the outage)."""

    def __init__(self, gateway: RunningGateway) -> None:
        self.gateway, self.phase = gateway, "before"
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.tasks: list[tuple[str, str]] = []  # (phase, task id)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {KEYS['research']}"}
        with httpx.Client(base_url=self.gateway.url, timeout=30) as client:
            i = 0
            while not self.stop.is_set():
                i += 1
                phase = self.phase
                if i % 4:
                    answer = client.post("/api/v1/chat/completions", headers=headers, json={
                        "model": "gemini", "mock_credits": 1.5,
                        "messages": [{"role": "user", "content": f"drill {i}"}]})
                else:
                    answer = client.post("/api/v1/images/generations", headers=headers, json={
                        "model": "flux-2", "prompt": f"drill {i}", "mock_delay_s": 0.1,
                        "mock_credits": 3})
                    if answer.status_code == 200:
                        self.tasks.append((phase, answer.json()["id"]))
                self.statuses[phase, answer.status_code] += 1

    def wait_for(self, phase: str, n: int) -> None:
        deadline = time.monotonic() + 30
        while sum(v for (p, _), v in self.statuses.items() if p == phase) < n:
            assert time.monotonic() < deadline, f"no answers {phase} the outage"
            time.sleep(0.02)


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_an_outage_under_load(make_gateway: GatewayFactory, mock: Mock, aof_redis: RedisServer,
                              mode: str) -> None:
    gateway = make_gateway(aof_redis.url, store={"on_error": mode, "timeout_s": 0.3},
                           task_check_s=0.1)
    before = gateway.call("POST", "images/generations",
                          json={"model": "flux-2", "prompt": "before", "mock_delay_s": 0.1})
    assert before.status_code == 200
    old_task = before.json()["id"]
    assert gateway.admin("POST", "keys/marketing-key/revoke").status_code == 200
    gateway.drain()
    if mode == "open":  # the revocation reaches this process's own copy with a heartbeat
        gateway.run(gateway.app.runtime._copy_revocations())

    load = Load(gateway)
    load.thread.start()
    load.wait_for("before", 8)
    aof_redis.stop()
    load.phase = "during"
    load.wait_for("during", 8)
    revoked = gateway.chat("a revoked key, during the outage", team="marketing")
    old = gateway.call("GET", f"tasks/{old_task}")
    aof_redis.start()
    load.phase = "after"
    load.wait_for("after", 8)
    load.stop.set()
    load.thread.join(60)

    during = {status for (phase, status), _ in load.statuses.items() if phase == "during"}
    assert revoked.status_code in (401, 503)  # never served: refused, or in doubt
    if mode == "closed":
        assert during <= {200, 503}  # a 200 is a request admitted before the store went away
        assert old.status_code == 503
    else:
        assert 200 in during and during <= {200, 503}
        assert revoked.status_code == 401  # the copy of the revocations holds
        assert old.status_code == 200  # this process created it: still the team's
        made_during = [task for phase, task in load.tasks if phase == "during"]
        assert made_during, load.statuses
        for task_id in made_during:  # its owner reached the store when it came back
            assert gateway.call("GET", f"tasks/{task_id}").status_code == 200

    # let every task finish and be settled, then the books: what the upstream billed is what
    # the team spent, nothing is left held, the ledger adds up, each charge recorded once
    eventually(lambda: not mock.client.get("/_mock/bill").json()["pending_tasks"],
               "every task finished upstream", timeout=30)
    gateway.drain()
    reconciler = Reconciler(gateway.app.runtime)
    runtime: Any = gateway.app.runtime

    def settled() -> bool:  # held reservations come due task_check_s after their last check
        gateway.run(reconciler.once())
        gateway.drain()
        return not gateway.run(runtime.store.reservations("research"))

    eventually(settled, "every reservation settled", timeout=30)
    research = gateway.team()
    bill = mock.client.get("/_mock/bill").json()
    assert research["reserved"] == 0
    assert round(research["spent"] + gateway.team("marketing")["spent"], 3) == round(
        bill["total"], 3), (load.statuses, bill)
    entries = gateway.admin("GET", "teams/research/ledger", params={"limit": 1000}).json()[
        "entries"]
    assert round(sum(e["credits"] for e in entries), 3) == round(research["spent"], 3)
    assert len({e["event_id"] for e in entries}) == len(entries)
