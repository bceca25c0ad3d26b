"""The upstream engine (gateway/upstream.py) against real servers: cancellation at any await and
early close leave the pool clean, and the request goes out as the gateway built it."""

from __future__ import annotations

import asyncio
import gzip
import ssl
from collections.abc import Awaitable, Callable, Iterator

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import config as cfg
from gateway import http1
from gateway.sweep import DEADLINE_INTERVAL_S, Deadline, Sweep, sweep_of
from gateway.upstream import Upstream, response_headers

from .conftest import KEYS, UPSTREAM_KEY, GatewayFactory, Mock, ServerThread

CHAT = orjson.dumps({"model": "gemini", "messages": [{"role": "user", "content": "hi there"}]})
JSON = [(b"content-type", b"application/json")]


def engine(base_url: str) -> Upstream:
    """An upstream with a pool of ONE connection: a connection not given back, or given back
    half-read, fails the next request."""
    config = cfg.Upstream(base_url=base_url, api_key=UPSTREAM_KEY, timeout_s=5,
                          connect_timeout_s=1, retries=0, max_connections=1)
    return Upstream(config, verify=ssl.create_default_context())


def run(base_url: str, test: Callable[[Upstream], Awaitable[None]]) -> None:
    async def main() -> None:
        upstream = engine(base_url)
        try:
            await test(upstream)
        finally:
            await upstream.aclose()

    asyncio.run(main())


async def chat(upstream: Upstream, *, stream: bool = False) -> http1.Response:
    return await upstream.send("POST", "chat/completions", b"", JSON, CHAT, stream=stream)


async def answers_whole(upstream: Upstream) -> bytes:
    """The next request gets its own complete answer (not another's leftovers) and gives its
    connection back."""
    response = await chat(upstream)
    assert response.status_code == 200
    assert orjson.loads(response.content)["object"] == "chat.completion"
    assert upstream.in_use == 0
    return response.content


async def seen_by(mock: Mock, n: int) -> None:
    """Until the mock has received `n` chat requests."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while await asyncio.to_thread(mock.count, "POST chat/completions") < n:
        assert loop.time() < deadline, "the mock never saw the request"
        await asyncio.sleep(0.01)


def test_cancelled_while_reading_a_stream(mock: Mock) -> None:
    """The lead's overall deadline cancels a reader mid-body: the connection is closed, not
    lent again, and `aclose()` afterwards is harmless."""
    mock.fault(drip_s=0.1)  # 8 bytes every 0.1 s: the whole answer takes seconds

    async def test(upstream: Upstream) -> None:
        response = await chat(upstream, stream=True)
        got: list[bytes] = []
        first = asyncio.Event()

        async def read() -> None:
            async for chunk in response.aiter_bytes():
                got.append(chunk)
                first.set()

        reader = asyncio.create_task(read())
        await first.wait()
        assert upstream.in_use == 1
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        assert upstream.in_use == 0
        await response.aclose()
        await response.aclose()
        whole = await answers_whole(upstream)
        assert 0 < len(b"".join(got)) < len(whole)  # it really was cut mid-body

    run(mock.api_url, test)


@pytest.mark.parametrize("fault", [{"delay_s": 5}, {"drip_s": 0.1}],
                         ids=["waiting-for-headers", "reading-the-body"])
def test_cancelled_send(mock: Mock, fault: dict[str, float]) -> None:
    """Cancelled inside `send` (before the answer's headers, or while it reads the body)."""
    mock.fault(**fault)

    async def test(upstream: Upstream) -> None:
        sending = asyncio.create_task(chat(upstream))
        await seen_by(mock, 1)
        assert upstream.in_use == 1
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
        assert upstream.in_use == 0
        await answers_whole(upstream)

    run(mock.api_url, test)


def test_closed_early_by_its_reader(mock: Mock) -> None:
    """A client that goes away mid-stream: the gateway closes the answer before its end."""
    mock.fault(drip_s=0.1)

    async def test(upstream: Upstream) -> None:
        response = await chat(upstream, stream=True)
        chunks = response.aiter_bytes()
        assert await anext(chunks)
        await response.aclose()
        assert upstream.in_use == 0
        await answers_whole(upstream)
        await answers_whole(upstream)  # the pool's one connection, reused

    run(mock.api_url, test)


def test_read_to_the_end_gives_the_connection_back(mock: Mock) -> None:
    async def test(upstream: Upstream) -> None:
        response = await chat(upstream, stream=True)
        body = b"".join([chunk async for chunk in response.aiter_bytes()])
        assert orjson.loads(body)["object"] == "chat.completion"
        assert upstream.in_use == 0
        await response.aclose()
        for _ in range(3):
            await answers_whole(upstream)

    run(mock.api_url, test)


def test_broken_body_is_a_transport_error(mock: Mock) -> None:
    """The upstream cuts the connection mid-body: `Broken`, and a clean pool after."""
    mock.fault(drop=True)

    async def test(upstream: Upstream) -> None:
        response = await chat(upstream, stream=True)
        with pytest.raises(http1.Broken):
            await response.aread()
        await response.aclose()
        assert upstream.in_use == 0
        await answers_whole(upstream)

    run(mock.api_url, test)


def test_client_gone_mid_stream_leaves_the_gateway_working(make_gateway: GatewayFactory,
                                                           mock: Mock) -> None:
    """End to end, one upstream connection: a client that disconnects mid-stream does not
    keep it, nor poison it for the next request."""
    gateway = make_gateway(upstream={"max_connections": 1})
    body = {"model": "gemini", "stream": True, "mock_hold": True, "mock_chunk_delay_s": 0,
            "messages": [{"role": "user", "content": "one two three four five"}]}
    headers = {"Authorization": f"Bearer {KEYS['research']}"}
    with httpx.stream("POST", f"{gateway.url}/api/v1/chat/completions", json=body,
                      headers=headers, timeout=10) as response:
        assert next(line for line in response.iter_lines() if line).startswith("data: ")
    mock.release()  # the upstream goes on; nobody is listening at the gateway any more
    for n in range(3):
        answer = gateway.chat(f"after {n}")
        assert answer.status_code == 200, answer.text
        assert answer.json()["object"] == "chat.completion"


# -- what goes on the wire ---------------------------------------------------------------------


def small_upstream() -> ServerThread:
    """An upstream that echoes what it got, redirects, and answers gzip."""

    async def echo(request: Request) -> Response:
        seen = {"headers": [[k.decode(), v.decode()] for k, v in request.headers.raw],
                "body": (await request.body()).decode()}
        return Response(orjson.dumps(seen), media_type="application/json")

    async def moved(request: Request) -> Response:
        return Response(status_code=307, headers={"location": "/api/v1/echo"})

    async def zipped(request: Request) -> Response:
        return Response(gzip.compress(b'{"zipped": true}'), media_type="application/json",
                        headers={"content-encoding": "gzip"})

    app = Starlette(routes=[Route("/api/v1/echo", echo, methods=["GET", "POST"]),
                            Route("/api/v1/moved", moved), Route("/api/v1/zipped", zipped)])
    return ServerThread(app).start()


@pytest.fixture(scope="module")
def upstream_url() -> Iterator[str]:
    server = small_upstream()
    yield f"{server.url}/api/v1"
    server.stop()


def test_request_goes_out_as_built(upstream_url: str) -> None:
    """The key, the gateway's headers and the body; no other header; one Host."""

    async def test(upstream: Upstream) -> None:
        response = await upstream.send("POST", "echo", b"", [*JSON, (b"x-request-id", b"r1")],
                                       b'{"model": "m"}')
        seen = orjson.loads(response.content)
        names = [k for k, _ in seen["headers"]]
        headers = dict(seen["headers"])
        assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert headers["x-request-id"] == "r1" and headers["content-type"] == "application/json"
        assert headers["accept-encoding"] == "gzip, deflate"
        assert headers["user-agent"].startswith("aio-gateway/")
        assert names.count("host") == 1 and names.count("content-length") == 1
        assert seen["body"] == '{"model": "m"}'
        # the client's own User-Agent wins over the gateway's
        agent = await upstream.send("GET", "echo", b"", [(b"user-agent", b"team-tool/2")], b"")
        assert dict(orjson.loads(agent.content)["headers"])["user-agent"] == "team-tool/2"

    run(upstream_url, test)


def test_redirects_are_not_followed(upstream_url: str) -> None:
    async def test(upstream: Upstream) -> None:
        response = await upstream.send("GET", "moved", b"", [], b"")
        assert response.status_code == 307
        assert response.header(b"location") == b"/api/v1/echo"

    run(upstream_url, test)


def test_compressed_answer_is_decoded_once(upstream_url: str) -> None:
    """The gzip body is decoded, and the framing is not passed on."""

    async def test(upstream: Upstream) -> None:
        response = await upstream.send("GET", "zipped", b"", [], b"")
        assert orjson.loads(response.content) == {"zipped": True}
        assert b"content-encoding" not in dict(response_headers(response.headers))

    run(upstream_url, test)


def test_environment_proxies_are_ignored(upstream_url: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)

    async def test(upstream: Upstream) -> None:
        assert (await upstream.send("GET", "echo", b"", [], b"")).status_code == 200

    run(upstream_url, test)


def test_default_engine_verifies_tls_with_certifi() -> None:
    """Built from config alone: TLS verified against certifi's bundle."""
    upstream = Upstream(cfg.Upstream(base_url="https://apiin.one/api/v1", api_key="aio_x",
                                     max_connections=7))
    assert upstream._tls.verify_mode == ssl.CERT_REQUIRED
    assert upstream._tls.get_ca_certs()  # certifi's roots, loaded once
    asyncio.run(upstream.aclose())


# -- the overall deadline (sweep.Deadline) ----------------------------------------------------


def test_the_deadline_ends_the_call_as_a_timeout() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError), Deadline(loop, loop.time() + 0.01):
            await asyncio.Event().wait()
        with Deadline(loop, loop.time() + 60):  # met: nothing happens, and nothing is left
            await asyncio.sleep(0)
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        assert not sweep_of(loop, "deadlines", DEADLINE_INTERVAL_S)._due

    asyncio.run(main())


def test_a_cancellation_from_elsewhere_stays_one() -> None:
    """The caller's own cancellation during the deadline is not turned into a timeout, even
    when the deadline expired in the same turn."""
    scopes: list[Deadline] = []

    async def body(started: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        with Deadline(loop, loop.time() + 60) as scope:
            scopes.append(scope)
            started.set()
            await asyncio.Event().wait()

    async def main() -> None:
        for expired in (False, True):
            started = asyncio.Event()
            task = asyncio.create_task(body(started))
            await started.wait()
            if expired:
                scopes[-1].expire()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())


def test_a_sweep_calls_what_is_due_once_and_stops_its_timer() -> None:
    """Items are called once their time has passed (one may stop another meanwhile), never
    after being stopped, and no timer is left once nothing waits."""

    class Item:
        def __init__(self, sweep: Sweep, stops: list[Item] | None = None) -> None:
            self.sweep, self.stops, self.calls = sweep, stops or [], 0

        def overdue(self) -> None:
            self.calls += 1
            for other in self.stops:
                self.sweep.stop(other)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        sweep = Sweep(loop, 0.01)
        late, stopped, later = Item(sweep), Item(sweep), Item(sweep)
        first = Item(sweep, stops=[late])
        sweep.wait(first, loop.time())
        sweep.wait(late, loop.time())
        sweep.wait(stopped, loop.time())
        sweep.wait(later, loop.time() + 0.2)
        sweep.stop(stopped)
        while not later.calls:
            await asyncio.sleep(0.01)
        assert (first.calls, late.calls, stopped.calls, later.calls) == (1, 0, 0, 1)
        assert loop.time() >= started + 0.2
        await asyncio.sleep(0.03)
        assert sweep._timer is None and not sweep._due
        # one sweep per loop and purpose, at the shortest interval any user asked for
        shared = sweep_of(loop, "test", 1.0)
        assert sweep_of(loop, "test", 0.5) is shared and shared.interval_s == 0.5
        assert sweep_of(loop, "test", 2.0) is shared and shared.interval_s == 0.5
        assert sweep_of(loop, "other", 2.0) is not shared

    asyncio.run(main())
