"""Task completion webhooks: `X-Callback-URL` on an async POST, the gateway's own polling of the
task (shared by replicas through the store, paced, coalesced with the clients' polls), and the
signed delivery to a real receiver (a small HTTP server started here), retried, given up and
redelivered. The refusals (SSRF) come first: nothing is forwarded or reserved for them.

Signatures are checked here with a Standard Webhooks verification written from the spec, not
with the gateway's own signing code.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import re
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import callbacks
from gateway import config as cfg
from gateway.app import create_app
from gateway.webhooks import post

from .conftest import (
    ADMIN_KEY,
    KEYS,
    GatewayFactory,
    Mock,
    RedisServer,
    RunningGateway,
    ServerThread,
    base_config,
    eventually,
    team_config,
)
from .test_deploy import (
    API_KEY,
    HelmError,
    container,
    helm,
    needs_helm,
    only,
    render,
    rendered_config,
)
from .test_openapi import conforms

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
CI_SECRET = "whsec_" + base64.b64encode(bytes(range(100, 132))).decode()
ID = re.compile(r"msg_[0-9a-f]{32}")


# -- a receiver -----------------------------------------------------------------------------------


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    path: str


class Receiver:
    """A webhook receiver on a free port: records what it gets, and answers as told (`plan`:
    statuses to answer in turn, `hang` to never answer; then 200)."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.plan: list[int | str] = []
        self._lock = threading.Lock()
        self._release = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.server = ServerThread(Starlette(routes=[
            Route("/{path:path}", self._receive, methods=["POST"])])).start()

    @property
    def port(self) -> int:
        return self.server.port

    async def _receive(self, request: Request) -> Response:
        body = await request.body()
        self._loop = asyncio.get_running_loop()
        with self._lock:
            self.deliveries.append(Delivery(dict(request.headers), body, request.url.path))
            step = self.plan.pop(0) if self.plan else 200
        if step == "hang":
            await self._release.wait()
            return Response(status_code=200)
        assert isinstance(step, int)
        return Response(b"ok", status_code=step)

    def wait_for(self, n: int, timeout: float = 30) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while len(self.deliveries) < n:
            assert time.monotonic() < deadline, f"{len(self.deliveries)} deliveries, not {n}"
            time.sleep(0.02)
        return self.deliveries

    def close(self) -> None:
        if self._loop is not None:  # answer the hanging requests, so that the server stops
            self._loop.call_soon_threadsafe(self._release.set)
        self.server.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Standard Webhooks verification, from the spec: HMAC-SHA256 over "id.timestamp.body"
    with the base64-decoded part of the secret after `whsec_`, any of the `v1,` signatures."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    sent = [part.split(",", 1)[1] for part in headers["webhook-signature"].split()
            if part.startswith("v1,")]
    return any(hmac.compare_digest(expected, s) for s in sent)


# -- configs --------------------------------------------------------------------------------------


def callback_teams(allow: list[str], **research: Any) -> dict[str, Any]:
    return {
        "research": team_config("research", callbacks={
            "allow": allow, "secret": SECRET, "secrets": {"ci": CI_SECRET}}, **research),
        "marketing": team_config("marketing"),
    }


def fast_hooks(**overrides: Any) -> dict[str, Any]:
    return {"poll_interval_s": 0.1, "max_poll_interval_s": 0.5, "first_retry_s": 0.1,
            "max_retry_interval_s": 0.5, "timeout_s": 1, "tick_s": 0.05, **overrides}


def create(gateway: RunningGateway, callback: str | None, *, team: str = "research",
           headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    sent = {**({"X-Callback-URL": callback} if callback else {}), **(headers or {})}
    return gateway.call("POST", "images/generations", team=team, headers=sent,
                        json={"model": "flux-2", "prompt": "a cat", **body})


def metric(gateway: RunningGateway, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in gateway.metrics().splitlines():
        if line.startswith(f"{name}{{{wanted}}} ") or (not labels and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- delivery -------------------------------------------------------------------------------------


def test_a_task_webhook_is_delivered_signed_and_settled_like_a_poll(
        make_gateway: GatewayFactory, store_url: str, mock: Mock, receiver: Receiver) -> None:
    gateway = make_gateway(store_url, teams=callback_teams([f"http://127.0.0.1:{receiver.port}/"]),
                           webhooks=fast_hooks(), cache={"pending_task_ttl_s": 0.1})
    url = f"http://127.0.0.1:{receiver.port}/hooks/tasks?token=abc"
    created = create(gateway, url, mock_delay_s=0.2, mock_credits=3)
    assert created.status_code == 200, created.text
    task = created.json()
    assert task["status"] == "pending"
    sent = next(r for r in mock.requests() if r["method"] == "POST")
    assert not any(name.startswith("x-callback") for name in sent["headers"])

    [delivery] = receiver.wait_for(1)
    assert delivery.path == "/hooks/tasks"
    headers = delivery.headers
    assert ID.fullmatch(headers["webhook-id"])
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    assert headers["content-type"] == "application/json"
    assert verify(SECRET, headers, delivery.body)
    assert not verify(CI_SECRET, headers, delivery.body)
    assert not verify(SECRET, headers, delivery.body + b" ")
    final = orjson.loads(delivery.body)
    assert final["id"] == task["id"] and final["status"] == "completed"
    assert final["credits_consumed"] == 3

    # settled once, as a client's poll settles it: charged what the upstream reported
    gateway.drain()
    eventually(lambda: gateway.team()["reserved"] == 0, what="the task's reservation settled")
    assert gateway.team()["spent"] == 3
    eventually(lambda: metric(gateway, "gateway_webhook_deliveries_total",
                              result="delivered") == 1, what="the delivered metric")
    # the client's own poll now comes from the cache the gateway's poll filled
    polls = mock.count(f"GET tasks/{task['id']}")
    status = gateway.call("GET", f"tasks/{task['id']}")
    assert status.json() == final and status.headers["x-cache"] == "HIT"
    assert mock.count(f"GET tasks/{task['id']}") == polls
    assert len(receiver.deliveries) == 1


def test_x_callback_secret_id_picks_the_signing_secret(
        make_gateway: GatewayFactory, mock: Mock, receiver: Receiver) -> None:
    gateway = make_gateway(teams=callback_teams([f"http://127.0.0.1:{receiver.port}/"]),
                           webhooks=fast_hooks(), cache={"pending_task_ttl_s": 0.1})
    created = create(gateway, f"http://127.0.0.1:{receiver.port}/ci",
                     headers={"X-Callback-Secret-Id": "ci"}, mock_final="completed")
    assert created.status_code == 200, created.text
    [delivery] = receiver.wait_for(1)
    assert verify(CI_SECRET, delivery.headers, delivery.body)
    assert not verify(SECRET, delivery.headers, delivery.body)
    assert orjson.loads(delivery.body)["status"] == "completed"


def test_retries_after_receiver_500s_and_timeouts_keep_the_webhook_id(
        make_gateway: GatewayFactory, store_url: str, mock: Mock, receiver: Receiver) -> None:
    gateway = make_gateway(store_url, teams=callback_teams([f"http://127.0.0.1:{receiver.port}/"]),
                           webhooks=fast_hooks(timeout_s=0.5), cache={"pending_task_ttl_s": 0.1})
    receiver.plan = [500, "hang", 503]
    assert create(gateway, f"http://127.0.0.1:{receiver.port}/", mock_final="completed",
                  mock_credits=2).status_code == 200
    deliveries = receiver.wait_for(4)
    assert len({d.headers["webhook-id"] for d in deliveries}) == 1
    assert all(verify(SECRET, d.headers, d.body) for d in deliveries)
    assert len({d.body for d in deliveries}) == 1
    eventually(lambda: metric(gateway, "gateway_webhook_deliveries_total",
                              result="delivered") == 1, what="delivered")
    assert metric(gateway, "gateway_webhook_deliveries_total", result="retried") == 3
    assert metric(gateway, "gateway_webhook_deliveries_total", result="failed") == 0
    assert len(receiver.deliveries) == 4


def test_a_webhook_nobody_takes_fails_and_is_redelivered(
        make_gateway: GatewayFactory, store_url: str, mock: Mock, receiver: Receiver) -> None:
    gateway = make_gateway(store_url, teams=callback_teams([f"http://127.0.0.1:{receiver.port}/"]),
                           webhooks=fast_hooks(retry_for_s=0.4), cache={"pending_task_ttl_s": 0.1})
    receiver.plan = [500] * 1000
    url = f"http://127.0.0.1:{receiver.port}/secret-path?token=s3cret"
    task = create(gateway, url, mock_final="completed").json()
    eventually(lambda: metric(gateway, "gateway_webhook_deliveries_total", result="failed") == 1,
               what="the webhook to fail")
    attempts = len(receiver.deliveries)
    assert attempts >= 2
    listed = conforms(gateway.admin("GET", "webhooks/failed"))
    assert listed.status_code == 200
    [failed] = listed.json()["webhooks"]
    assert listed.json()["next"] is None
    assert failed["id"] == receiver.deliveries[0].headers["webhook-id"]
    assert failed["team"] == "research" and failed["task_id"] == task["id"]
    assert failed["callback"] == f"http://127.0.0.1:{receiver.port}"  # no path, no query
    assert "s3cret" not in listed.text and "secret-path" not in listed.text
    assert failed["error"] == "http_500" and failed["attempts"] == attempts
    assert failed["task_status"] == "completed"

    receiver.plan = []
    redone = conforms(gateway.admin("POST", f"webhooks/{failed['id']}/redeliver"))
    assert redone.status_code == 200 and redone.json() == {"id": failed["id"],
                                                           "redelivering": True}
    delivered = receiver.wait_for(attempts + 1)[-1]
    assert delivered.headers["webhook-id"] == failed["id"]
    assert verify(SECRET, delivered.headers, delivered.body)
    eventually(lambda: gateway.admin("GET", "webhooks/failed").json()["webhooks"] == [],
               what="the failed list to empty")
    again = conforms(gateway.admin("POST", f"webhooks/{failed['id']}/redeliver"))
    assert again.status_code == 404 and again.json()["error"]["type"] == "not_found"
    assert gateway.admin("POST", "webhooks/nonsense/redeliver").status_code == 404
    for params in ({"after": "yesterday"}, {"limit": "many"}):
        assert conforms(gateway.admin("GET", "webhooks/failed", params=params)).status_code == 400
    teamkey = gateway.client.get("/admin/v1/webhooks/failed",
                                 headers={"Authorization": f"Bearer {KEYS['research']}"})
    assert teamkey.status_code == 403


def test_a_watch_made_while_the_store_is_away_is_recorded_once_it_is_back(
        private_redis: RedisServer, make_gateway: GatewayFactory, mock: Mock,
        receiver: Receiver) -> None:
    """`store.on_error: open`: a task created while Redis is down keeps its watch in the
    process, recorded (and then polled and delivered) once Redis is back."""
    gateway = make_gateway(private_redis.url, store={"on_error": "open"},
                           teams=callback_teams([f"http://127.0.0.1:{receiver.port}/"]),
                           webhooks=fast_hooks(), cache={"pending_task_ttl_s": 0.1})
    eventually(lambda: gateway.runtime._revocations_known, what="the first heartbeat")
    private_redis.stop()
    created = create(gateway, f"http://127.0.0.1:{receiver.port}/", mock_final="completed")
    assert created.status_code == 200, created.text
    assert len(gateway.runtime.webhooks._unrecorded) == 1  # kept in the process
    assert receiver.deliveries == []
    private_redis.start()
    [delivery] = receiver.wait_for(1)
    assert orjson.loads(delivery.body)["id"] == created.json()["id"]
    assert verify(SECRET, delivery.headers, delivery.body)


# -- refusals: nothing forwarded, nothing reserved ---------------------------------------------


REFUSED = {
    "a name that resolves to loopback": "http://localhost:8080/hook",
    "a private address": "http://10.1.2.3/x/",
    "a private address, named, on another path": "http://10.1.2.3/x/",
    "cloud metadata (link-local)": "http://169.254.169.254/x/latest/meta-data",
    "IPv6 loopback": "http://[::1]:8080/x/",
    "IPv4-mapped loopback": "http://[::ffff:127.0.0.1]/x/",
    "a loopback IP not named by a pattern": "http://127.0.0.2/x/",
    "a number as a host": "http://2130706433/x/",
    "a hexadecimal host": "http://0x7f000001/x/",
    "credentials": "http://user:pw@hooks.example.test/x/",
    "a fragment": "http://hooks.example.test/x/#frag",
    "another scheme": "ftp://hooks.example.test/x/",
    "an upper-case scheme": "HTTP://hooks.example.test/x/",
    "a path the team does not allow": "http://hooks.example.test/elsewhere",
    "a space": "http://hooks.example.test/x/a b",
    "too long": "http://hooks.example.test/x/" + "a" * 2100,
    "no host": "http:///x/",
    "a port out of range": "http://hooks.example.test:70000/x/",
}


def test_refused_callbacks_answer_400_before_anything_is_reserved(
        make_gateway: GatewayFactory, store_url: str, mock: Mock) -> None:
    gateway = make_gateway(store_url, teams=callback_teams(
        ["http://localhost:*/", "http://*/x/", "http://127.0.0.1:*/", "http://10.1.2.3/y/"],
        budget={"credits": 1000, "period": "month"}, requests_per_minute=1000))
    for what, url in REFUSED.items():
        answer = conforms(create(gateway, url))
        assert answer.status_code == 400, (what, answer.status_code, answer.text)
        assert answer.json()["error"]["type"] == "invalid_request", what
        assert url not in answer.text, what
    others = {
        "on a synchronous endpoint": gateway.chat(headers={"X-Callback-URL":
                                                           "http://127.0.0.1:9/"}),
        "on a task poll": gateway.call("GET", "tasks/task_x",
                                       headers={"X-Callback-URL": "http://127.0.0.1:9/"}),
        "a team without callbacks": create(gateway, "http://127.0.0.1:9/", team="marketing"),
        "an unknown secret id": create(gateway, "http://127.0.0.1:9/",
                                       headers={"X-Callback-Secret-Id": "nope"}),
        "a secret id without a URL": create(gateway, None,
                                            headers={"X-Callback-Secret-Id": "ci"}),
        "a URL that is not ASCII": gateway.call(
            "POST", "images/generations", json={"model": "flux-2"},
            headers={"Authorization": f"Bearer {KEYS['research']}",
                     "X-Callback-URL": "http://127.0.0.1:9/\u00e9".encode()}),
    }
    for what, answer in others.items():
        assert answer.status_code == 400, (what, answer.status_code, answer.text)
    twice = gateway.client.post(
        "/api/v1/images/generations", json={"model": "flux-2"},
        headers=[("Authorization", f"Bearer {KEYS['research']}"),
                 ("X-Callback-URL", "http://127.0.0.1:9/"),
                 ("X-Callback-URL", "http://127.0.0.1:10/")])
    assert twice.status_code == 400
    assert mock.upstream_calls() == 0
    team = gateway.team()
    assert team["spent"] == 0 and team["reserved"] == 0
    assert team["budget"]["remaining"] == 1000
    # and the same team's named loopback IP is accepted
    assert create(gateway, "http://127.0.0.1:9/", mock_delay_s=60).status_code == 200
    assert mock.upstream_calls() == 1


@dataclass
class Dns:
    """Host names as the test says they resolve, and who asked."""

    answers: dict[str, list[list[str]]]
    asked: list[str]

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        queue = self.answers.get(host) or [[]]
        return queue.pop(0) if len(queue) > 1 else queue[0]


def gateway_with_dns(mock: Mock, dns: Dns, allow: list[str], **sections: Any) -> RunningGateway:
    raw = base_config(mock.api_url, teams=callback_teams(allow),
                      webhooks=fast_hooks(**sections.pop("webhooks", {})),
                      cache={"pending_task_ttl_s": 0.1}, **sections)
    app = create_app(cfg.from_dict(raw), reconcile_interval_s=3600, lookup=dns)
    return RunningGateway(ServerThread(app).start(), app)


def test_a_name_that_rebinds_to_a_private_address_is_never_called(
        mock: Mock, receiver: Receiver) -> None:
    """Checked public when the task was created, the name answers loopback at delivery: each
    attempt resolves, checks and connects to nothing but what it checked."""
    dns = Dns({"hooks.rebind.test": [["93.184.216.34"], ["127.0.0.1"]]}, [])
    gateway = gateway_with_dns(mock, dns, ["http://hooks.rebind.test:*/"],
                               webhooks={"retry_for_s": 0.3})
    try:
        created = create(gateway, f"http://hooks.rebind.test:{receiver.port}/",
                         mock_final="completed")
        assert created.status_code == 200, created.text
        eventually(lambda: metric(gateway, "gateway_webhook_deliveries_total",
                                  result="failed") == 1, what="the webhook to fail")
        [failed] = gateway.admin("GET", "webhooks/failed").json()["webhooks"]
        assert failed["error"] == "private_address"
        assert receiver.deliveries == []
        assert dns.asked.count("hooks.rebind.test") >= 2
    finally:
        gateway.close()


def test_a_delivery_connects_only_to_the_addresses_it_checked(receiver: Receiver) -> None:
    """`hooks.pinned.test` exists in no DNS: the POST reaches the receiver only because it
    connects to the checked address, with the name in its Host header; and an address that was
    not checked is refused by the socket itself, whatever the URL says."""
    tls = ssl.create_default_context()
    loopback = ipaddress.ip_address("127.0.0.1")

    def send(url: str, checked: list[Any]) -> int:
        return asyncio.run(post(callbacks.parse(url), checked, {"x-test": "1"}, b"{}",
                                timeout_s=5, tls=tls))

    assert send(f"http://hooks.pinned.test:{receiver.port}/in", [loopback]) == 200
    [delivery] = receiver.deliveries
    assert delivery.headers["host"] == f"hooks.pinned.test:{receiver.port}"
    assert delivery.path == "/in" and delivery.body == b"{}"
    with pytest.raises(aiohttp.ClientError, match="not checked"):
        send(f"http://127.0.0.1:{receiver.port}/x", [ipaddress.ip_address("127.0.0.2")])
    assert len(receiver.deliveries) == 1


# -- replicas share the work --------------------------------------------------------------------


def test_a_replica_killed_mid_poll_leaves_its_task_to_another(
        redis_server: RedisServer, mock: Mock, receiver: Receiver, gateway_process: Any) -> None:
    """Two gateway processes on one Redis: the first claims the hook and dies while its poll is
    in the upstream's hands; the second takes the hook up once the lease ends, polls, settles
    the task once and delivers."""
    redis_server.cli("FLUSHALL")
    config = base_config(
        mock.api_url, redis_server.url,
        teams=callback_teams([f"http://127.0.0.1:{receiver.port}/"]),
        upstream={"timeout_s": 1, "queue_timeout_s": 0},
        webhooks=fast_hooks(poll_interval_s=0.2, timeout_s=0.5),
        cache={"pending_task_ttl_s": 0.1})
    first = gateway_process(config)
    mock.fault(path="tasks/", delay_s=5)  # the first poll: slow, so it is under way at the kill
    headers = {"Authorization": f"Bearer {KEYS['research']}",
               "X-Callback-URL": f"http://127.0.0.1:{receiver.port}/done"}
    created = httpx.post(f"{first.url}/api/v1/images/generations", headers=headers,
                         json={"model": "flux-2", "prompt": "x", "mock_delay_s": 0.5,
                               "mock_credits": 3}, timeout=10)
    assert created.status_code == 200, created.text
    task_id = created.json()["id"]
    mock.wait_for(f"GET tasks/{task_id}")
    first.kill()
    assert receiver.deliveries == []

    second = gateway_process(config)
    [delivery] = receiver.wait_for(1, timeout=60)
    assert verify(SECRET, delivery.headers, delivery.body)
    final = orjson.loads(delivery.body)
    assert final["id"] == task_id and final["status"] == "completed"
    assert mock.count(f"GET tasks/{task_id}") == 2  # the dead replica's, and the other's

    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}

    def research() -> dict[str, Any]:
        teams = httpx.get(f"{second.url}/admin/v1/teams", headers=admin).json()["teams"]
        return next(t for t in teams if t["team"] == "research")  # type: ignore[no-any-return]

    eventually(lambda: research()["reserved"] == 0, what="the task's reservation settled")
    assert research()["spent"] == 3
    assert len(receiver.deliveries) == 1


# -- one upstream poll per task per interval, whoever asks -------------------------------------


class Clock:
    """The gateway's clock (and the memory store's), driven by the test."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def poll_all(url: str, tasks: list[str]) -> list[int]:
    headers = {"Authorization": f"Bearer {KEYS['research']}"}
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as c:
        answers = await asyncio.gather(*(c.get(f"{url}/api/v1/tasks/{t}", headers=headers)
                                         for t in tasks))
    return [a.status_code for a in answers]


def test_fifty_tasks_cost_one_upstream_poll_per_interval_whoever_asks(
        make_gateway: GatewayFactory, mock: Mock, receiver: Receiver) -> None:
    """On the memory store's clock, stopped: within one interval the gateway's own polls and
    every client's poll of the same 50 tasks make exactly one upstream call per task."""
    clock = Clock()
    gateway = make_gateway(
        clock=clock, teams=callback_teams([f"http://127.0.0.1:{receiver.port}/"]),
        webhooks={"poll_interval_s": 2, "max_poll_interval_s": 2, "tick_s": 3600,
                  "concurrency": 64},
        cache={"pending_task_ttl_s": 2})
    hooks = gateway.runtime.webhooks
    tasks = [create(gateway, f"http://127.0.0.1:{receiver.port}/", mock_delay_s=600).json()["id"]
             for _ in range(50)]
    assert gateway.run(hooks.once()) == 0  # nothing is due before the first interval
    assert mock.count("GET tasks/" + tasks[0]) == 0
    for interval in range(1, 4):
        clock.now += 2.001  # a cache entry is fresh for its whole TTL, its end included
        gateway_round = asyncio.run_coroutine_threadsafe(hooks.once(), gateway.runtime.loop)
        assert asyncio.run(poll_all(gateway.url, tasks)) == [200] * 50  # at the same time
        assert gateway_round.result(60) == 50
        assert asyncio.run(poll_all(gateway.url, tasks)) == [200] * 50
        assert gateway.run(hooks.once()) == 0
        for task in tasks:
            assert mock.count(f"GET tasks/{task}") == interval, task
    assert receiver.deliveries == []


def test_fifty_tasks_polled_by_clients_and_the_gateway_on_redis(
        make_gateway: GatewayFactory, redis_server: RedisServer, mock: Mock,
        receiver: Receiver) -> None:
    """On Redis's own clock: however often clients poll, no task is polled upstream more than
    once per `cache.pending_task_ttl_s` (successive polls start at least that far apart)."""
    redis_server.cli("FLUSHALL")
    gateway = make_gateway(
        redis_server.url, teams=callback_teams([f"http://127.0.0.1:{receiver.port}/"]),
        webhooks=fast_hooks(poll_interval_s=0.5, max_poll_interval_s=0.5, concurrency=64),
        cache={"pending_task_ttl_s": 0.5})
    started = time.monotonic()
    tasks = [create(gateway, f"http://127.0.0.1:{receiver.port}/", mock_delay_s=600).json()["id"]
             for _ in range(50)]
    while time.monotonic() - started < 3:
        assert asyncio.run(poll_all(gateway.url, tasks)) == [200] * 50
    polls = [mock.count(f"GET tasks/{task}") for task in tasks]
    elapsed = time.monotonic() - started  # after the counts: a later poll cannot slip in
    assert all(1 <= n <= int(elapsed / 0.5) + 1 for n in polls), (polls, elapsed)


def test_the_gateway_polls_only_with_a_free_upstream_slot(
        make_gateway: GatewayFactory, mock: Mock, receiver: Receiver) -> None:
    """One upstream request a minute, taken by the task's creation: the gateway's poll waits for
    the next free slot (it never queues ahead of the clients), then delivers."""
    clock = Clock()
    gateway = make_gateway(
        clock=clock, teams=callback_teams([f"http://127.0.0.1:{receiver.port}/"]),
        upstream={"requests_per_minute": 1, "burst": 1, "queue_timeout_s": 10},
        webhooks={"poll_interval_s": 2, "max_poll_interval_s": 2, "tick_s": 3600},
        cache={"pending_task_ttl_s": 2})
    hooks = gateway.runtime.webhooks
    task = create(gateway, f"http://127.0.0.1:{receiver.port}/", mock_delay_s=0).json()["id"]
    for _ in range(3):
        clock.now += 2.001
        assert gateway.run(hooks.once()) == 1
    assert mock.count(f"GET tasks/{task}") == 0 and receiver.deliveries == []
    clock.now += 60
    assert gateway.run(hooks.once()) == 1
    assert mock.count(f"GET tasks/{task}") == 1
    [delivery] = receiver.wait_for(1)
    assert orjson.loads(delivery.body)["status"] == "completed"


def test_the_gateways_poll_is_a_clients_poll(make_gateway: GatewayFactory, mock: Mock) -> None:
    """What the gateway asks for a hook's task is what a client's `GET /tasks/{id}` asks: the same
    bill (settlement), the same cache entry and single flight, the upstream slot aside."""
    from gateway.request import Head, parse

    gateway = make_gateway(teams=callback_teams(["http://127.0.0.1:*/"]))
    seen: list[Any] = []
    hooks = gateway.runtime.webhooks

    async def capture(req: Any) -> Any:
        seen.append(req)
        raise RuntimeError("not sent")

    policy, team = gateway.runtime.policy, gateway.runtime.policy.teams["research"]
    hooks._poll = capture
    from gateway.store.hooks import Hook

    with pytest.raises(RuntimeError):
        gateway.run(hooks._poll_task("research", Hook("msg_" + "0" * 32, "research",
                                                          "task_1", "http://127.0.0.1:9/")))
    client = parse(policy, team, "research-key", request_id="r", method="GET", path="tasks/task_1",
                   route="tasks", query=b"", head=Head([]), raw_headers=[], body=b"",
                   payload=None, model=None, ticket="t", now=0.0)
    [ours] = seen
    assert ours.billing == client.billing
    assert (ours.cache, ours.lookup, ours.flight) == (client.cache, client.lookup, client.flight)
    assert ours.admission.task_id == "task_1" and ours.admission.count_quota is False


# -- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("callbacks_section", "message"), [
    ({"allow": [], "secret": SECRET}, "teams.research.callbacks.allow: list 1 to 100"),
    ({"allow": ["https://user@x.example/"], "secret": SECRET},
     "teams.research.callbacks.allow[0]: must be http(s)://host"),
    ({"allow": ["http://127.1/"], "secret": SECRET},
     "teams.research.callbacks.allow[0]: an IPv4 address must be written"),
    ({"allow": ["http://x.example:0/"], "secret": SECRET},
     "teams.research.callbacks.allow[0]: the port must be 1-65535"),
    ({"allow": ["http://x.example/"], "secret": "not-a-secret-at-all-but-long-enough"},
     "teams.research.callbacks.secret: must be whsec_"),
    ({"allow": ["http://x.example/"], "secret": "whsec_" + "A" * 33},
     "teams.research.callbacks.secret: must be whsec_ and the base64 of 24 to 64 bytes"),
    ({"allow": ["http://x.example/"], "secret": "whsec_" + base64.b64encode(b"x" * 80).decode()},
     "teams.research.callbacks.secret: must be whsec_"),
    ({"allow": ["http://x.example/"], "secret": SECRET, "secrets": {"-bad": CI_SECRET}},
     "teams.research.callbacks.secrets.-bad: secret ids use"),
    ({"allow": ["http://x.example/"], "secret": SECRET, "secrets": {"ci": "whsec_short"}},
     "teams.research.callbacks.secrets.ci: must be whsec_"),
    ({"allow": ["http://x.example/"]}, "teams.research.callbacks.secret: required field"),
])
def test_bad_callbacks_are_refused_without_showing_the_secret(
        callbacks_section: dict[str, Any], message: str, mock: Mock) -> None:
    raw = base_config(mock.api_url, teams={
        "research": team_config("research", callbacks=callbacks_section)})
    with pytest.raises(cfg.ConfigError) as refused:
        cfg.from_dict(raw)
    text = str(refused.value)
    assert text.startswith(message), text
    assert "\n" not in text
    for secret in (callbacks_section.get("secret"), *callbacks_section.get("secrets", {}).values()):
        if secret:
            assert secret not in text and secret.removeprefix("whsec_") not in text


def test_webhook_settings_are_checked(mock: Mock) -> None:
    for section, message in (
            ({"max_poll_interval_s": 1, "poll_interval_s": 5},
             "webhooks.max_poll_interval_s: must be at least poll_interval_s"),
            ({"first_retry_s": 10, "max_retry_interval_s": 5},
             "webhooks.max_retry_interval_s: must be at least first_retry_s"),
            ({"timeout_s": 0}, "webhooks.timeout_s: must be greater than 0"),
            ({"concurrency": 0}, "webhooks.concurrency: must be at least 1"),
            ({"retry_for_s": float("inf")}, "webhooks.retry_for_s: must be a finite number"),
            ({"surprise": 1}, "webhooks.surprise: unknown field")):
        with pytest.raises(cfg.ConfigError, match=f"^{re.escape(message)}"):
            cfg.from_dict(base_config(mock.api_url, webhooks=section))
    good = cfg.from_dict(base_config(mock.api_url, teams=callback_teams(["https://*.x.example/"])))
    assert SECRET not in repr(good) and CI_SECRET not in repr(good)


# -- the Helm chart ----------------------------------------------------------------------------


@needs_helm
def test_helm_gives_webhook_secrets_to_the_pods_only_through_a_secret() -> None:
    teams = {"research": {"keys": [], "callbacks": {
        "allow": ["https://*.research.example.com/"], "secret": "${RESEARCH_WEBHOOK_SECRET}",
        "secrets": {"ci": "${RESEARCH_CI_WEBHOOK_SECRET}"}}}}
    chart_values = {"config": {"teams": teams},
                    "webhooks": {"secrets": {"RESEARCH_WEBHOOK_SECRET": SECRET,
                                             "RESEARCH_CI_WEBHOOK_SECRET": CI_SECRET}},
                    "ledger": {"url": "postgresql://gateway:pw@postgres:5432/aio"},
                    "upstream": {"apiKey": API_KEY}}
    report = helm("lint", chart_values, kube_version="v1.23.0")
    assert not [m for m in report["messages"] if m["severity"] >= 2] and not report["errors"]
    m = render(**chart_values)
    everything = json.dumps(m)
    assert SECRET not in everything and CI_SECRET not in everything
    (secret,) = [s for s in m["Secret"] if s["metadata"]["name"].endswith("-webhooks")]
    assert base64.b64decode(secret["data"]["RESEARCH_WEBHOOK_SECRET"]).decode() == SECRET
    (job,) = m["Job"]
    (migrate,) = job["spec"]["template"]["spec"]["containers"]
    for runs in (container(m), migrate):  # both read the config, so both need the variables
        assert runs["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]
    annotations = only(m, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/webhooks-secret" in annotations
    config = cfg.parse(rendered_config(m), env={
        "APIINONE_API_KEY": API_KEY, "AIO_GATEWAY_LEDGER_URL": "postgresql://g@db/aio",
        "RESEARCH_WEBHOOK_SECRET": SECRET, "RESEARCH_CI_WEBHOOK_SECRET": CI_SECRET})
    callbacks_section = config.teams["research"].callbacks
    assert callbacks_section is not None and callbacks_section.secret == SECRET

    mine = render(config={"teams": teams}, webhooks={"existingSecret": "org-webhooks"})
    assert container(mine)["envFrom"] == [{"secretRef": {"name": "org-webhooks"}}]
    assert not any(s["metadata"]["name"].endswith("-webhooks") for s in mine["Secret"])
    assert "envFrom" not in container(render())

    for chart_values, message in (
            ({"webhooks": {"secrets": {"A": SECRET}, "existingSecret": "s"}}, "not both"),
            ({"webhooks": {"secrets": {"not-a-variable": SECRET}}}, "environment variable"),
            ({"config": {"teams": {"research": {"keys": [], "callbacks": {
                "allow": ["https://x.example/"], "secret": SECRET}}}}},
             "must not be in the config")):
        with pytest.raises(HelmError, match=re.escape(message)):
            render(**chart_values)
