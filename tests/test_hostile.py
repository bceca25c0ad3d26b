"""Hostile input over a running gateway (issue 12).

Every case goes, as raw bytes, to a real gateway (uvicorn with the gateway's HTTP protocol,
memory:// and Redis) in front of the mock upstream. Each must be answered 4xx in the error shape,
or the connection closed where HTTP says so, and leave no trace: nothing forwarded to the mock
upstream, no traceback or error in the logs, the team's quota and budget as they were (a probe
request afterwards is the day's first: `"day";r=99`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import select
import socket
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from uvicorn.server import ServerState

from gateway import inbound
from gateway.asgi import DisconnectWatch
from gateway.server import Config, HttpProtocol

from .conftest import (
    KEYS,
    GatewayFactory,
    GatewayProcess,
    Mock,
    RedisServer,
    RunningGateway,
    base_config,
    eventually,
    team_config,
)

KEY = KEYS["research"]
CHAT = b'{"model": "gemini", "messages": [{"role": "user", "content": "hi"}]}'
CONTROLS = [*range(0x00, 0x20), 0x7F]


# -- a raw HTTP/1.1 client ---------------------------------------------------------------------


@dataclass
class Answer:
    """One HTTP answer as read off the socket; status 0: the connection closed without one."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def error(self) -> dict[str, Any]:
        """The error object, after checking the upstream's error shape."""
        assert self.headers.get("content-type") == "application/json", self
        data = json.loads(self.body)
        assert set(data) == {"error"} and set(data["error"]) == {"code", "message", "type"}, data
        assert data["error"]["code"] == self.status, data
        return data["error"]  # type: ignore[no-any-return]


class Raw:
    """A socket to the gateway: bytes go out exactly as given, answers are read one by one."""

    def __init__(self, port: int, timeout: float = 20.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""
        self.eof = False

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buffer += chunk
        return True

    def answer(self) -> Answer:
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                assert not self.buffer, f"a partial answer: {self.buffer[:200]!r}"
                return Answer(0)
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"{name} twice in {head!r}"
            headers[name.lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length and self._fill():
            pass
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Answer(int(status_line.split(" ")[1]), headers, body)

    def closed(self) -> bool:
        """True once the gateway has closed the connection (and sent nothing more)."""
        while self._fill():
            pass
        return not self.buffer


def request(method: str, target: str, *headers: str, body: bytes | None = None,
            key: str = KEY) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: gateway"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    lines += headers
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + (body or b"")


# -- the gateway under attack ------------------------------------------------------------------


@dataclass
class Target:
    gateway: RunningGateway
    mock: Mock
    caplog: pytest.LogCaptureFixture

    @property
    def port(self) -> int:
        return self.gateway.server.port

    def send(self, data: bytes) -> Answer:
        """One request on its own connection; its answer (status 0: closed without one)."""
        with Raw(self.port) as conn:
            conn.send(data)
            return conn.answer()

    def refused(self, data: bytes, status: int = 400, kind: str = "invalid_request") -> Answer:
        answer = self.send(data)
        assert answer.status == status, (data[:120], answer)
        assert answer.error()["type"] == kind, answer
        assert answer.headers.get("x-request-id"), answer
        return answer

    def wait_until(self, condition: Callable[[], bool], what: str = "the condition") -> None:
        eventually(condition, what, timeout=20)

    def wait_idle(self) -> None:
        """Until no request is in flight in the gateway (a cut connection ends in its time)."""
        self.wait_until(lambda: "gateway_inflight_requests 0.0" in self.gateway.metrics(),
                        "the end of every request")

    def assert_untouched(self) -> None:
        """Nothing forwarded, nothing logged as an error, quota and budget untouched."""
        self.wait_idle()
        assert self.mock.upstream_calls() == 0, self.mock.requests()
        problems = [f"{r.name} {r.levelname} {r.getMessage()} {getattr(r, 'fields', '')}"
                    for r in self.caplog.records if r.exc_info or r.levelno >= logging.ERROR]
        assert not problems, problems
        row = self.gateway.team("research")
        assert (row["spent"], row["reserved"]) == (0, 0), row
        probe = self.gateway.chat("probe")
        assert probe.status_code == 200, probe.text
        assert '"day";r=99;' in probe.headers["ratelimit"], probe.headers["ratelimit"]


@pytest.fixture
def target(make_gateway: GatewayFactory, store_url: str, mock: Mock,
           caplog: pytest.LogCaptureFixture) -> Iterator[Target]:
    caplog.set_level(logging.INFO)
    teams = {
        "research": team_config("research", requests_per_day=100, models=["gemini", "flux-2"],
                                budget={"credits": 1000, "period": "month"}),
        "marketing": team_config("marketing"),
    }
    gateway = make_gateway(store_url, teams=teams,
                           listen={"body_timeout_s": 1, "max_body_bytes": SMALL_LIMIT})
    yield Target(gateway, mock, caplog)


# -- control characters: path, query, header values; raw and percent-encoded -----------------


def outcome(answer: Answer) -> tuple[int, str]:
    """(status, error type), or (status, the start of the body) for what is not an error."""
    if answer.status >= 400 and answer.headers.get("content-type") == "application/json":
        return answer.status, answer.error()["type"]
    return answer.status, answer.body[:80].decode("latin-1")


def _name(byte: int) -> str:
    return f"0x{byte:02x}"


CONTROL_PLACES = {
    "path-raw": lambda c: request("GET", f"/api/v1/tasks/task{chr(c)}x"),
    "path-encoded": lambda c: request("GET", f"/api/v1/tasks/task%{c:02X}x"),
    "path-encoded-end": lambda c: request("POST", f"/api/v1/chat/completions%{c:02X}",
                                          body=CHAT),
    "query-raw": lambda c: request("POST", f"/api/v1/chat/completions?q=a{chr(c)}b", body=CHAT),
    "query-encoded": lambda c: request("POST", f"/api/v1/chat/completions?q=a%{c:02x}b",
                                       body=CHAT),
    "header-raw": lambda c: request("POST", "/api/v1/chat/completions", f"X-Note: a{chr(c)}b",
                                    body=CHAT),
}


@pytest.mark.parametrize("place", sorted(CONTROL_PLACES))
def test_control_characters_are_refused_before_anything_else(target: Target, place: str) -> None:
    """Every byte 0x00-0x1f and 0x7f: 400 invalid_request in the error shape (from the gateway,
    or from its HTTP parser for what it cannot parse), never a 500, never forwarded or counted.
    HTAB is allowed in header values (RFC 9110, 5.5); see the test below."""
    outcomes = {}
    for byte in CONTROLS:
        if place == "header-raw" and byte == 0x09:
            continue
        outcomes[_name(byte)] = outcome(target.send(CONTROL_PLACES[place](byte)))
    wrong = {b: o for b, o in outcomes.items() if o != (400, "invalid_request")}
    assert not wrong, wrong
    target.assert_untouched()


def test_newline_at_the_end_of_a_path_is_not_a_500(target: Target) -> None:
    """Regression (issue 12, defect 3): `$` matched before the newline of `%0A`, so the path
    passed as safe, and the upstream URL could not be built: 500, a traceback, a counted quota."""
    for path in ("chat/completions%0A", "models%0A", "tasks/task_1%0A", "chat/completions%0D%0A"):
        answer = target.refused(request("POST", f"/api/v1/{path}", body=CHAT))
        assert "control characters" in answer.error()["message"].lower()
    target.assert_untouched()


def test_tab_in_a_header_value_is_allowed(target: Target) -> None:
    """RFC 9110 (5.5) allows HTAB inside a field value; such a header is not an attack."""
    answer = target.send(request("POST", "/api/v1/chat/completions", "X-Note: a\tb", body=CHAT))
    assert answer.status == 200, answer
    assert target.mock.requests()[-1]["headers"].get("x-note") == "a\tb"


# -- a client that goes away mid-upload ----------------------------------------------------------


def test_client_gone_mid_upload_is_a_499(target: Target) -> None:
    """Regression (issue 12, defect 5): uvicorn gives the app `http.disconnect` when the client
    closes in the middle of the body; that was logged as an unexpected error and counted 500."""
    body = b'{"model": "gemini", "messages": [{"role": "user", "content": "' + b"x" * 5000
    head = request("POST", "/api/v1/chat/completions", body=b"")
    head = head.replace(b"Content-Length: 0", f"Content-Length: {len(body) + 1000}".encode())
    with Raw(target.port) as conn:
        conn.send(head + body[: len(body) // 2])
        target.wait_until(lambda: "gateway_inflight_requests 1.0" in target.gateway.metrics())
    target.wait_idle()
    metrics = target.gateway.metrics()
    assert re.search(r'gateway_requests_total\{[^}]*status="499"[^}]*\} 1\.0', metrics), metrics
    assert 'status="500"' not in metrics
    access = [getattr(r, "fields", {}) for r in target.caplog.records
              if r.name == "gateway.access"]
    assert [a["status"] for a in access] == [499], access
    target.assert_untouched()


# -- slow clients: a head or a body that never ends ----------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_slow_loris_head_is_cut_off(gateway_process: Callable[..., GatewayProcess], mock: Mock,
                                    redis_server: RedisServer, workers: int) -> None:
    """A head sent a byte at a time: uvicorn has no bound on it (its keep-alive timeout starts
    after an answer, and the first byte stops it). `listen.head_timeout_s` cuts it: 408 in the
    error shape, then the connection closes, long before the head could end. With --workers,
    the setting travels to each worker process."""
    store = "memory://" if workers == 1 else redis_server.url
    gateway = gateway_process(base_config(mock.api_url, store, listen={"head_timeout_s": 1}),
                              workers=workers)
    head = request("GET", "/api/v1/tasks/task_x", "X-Drip: " + "x" * 400)
    with Raw(gateway.port, timeout=30) as conn:
        for sent in range(len(head)):  # a byte every 0.1 s, until the gateway says something
            conn.send(head[sent:sent + 1])
            if select.select([conn.sock], [], [], 0.1)[0]:
                break
        answer = conn.answer()
        assert conn.closed()
    assert sent < len(head), "the gateway waited for the whole slow head"
    assert answer.status == 408 and answer.error()["type"] == "invalid_request", answer
    assert mock.upstream_calls() == 0


def test_a_connection_that_sends_nothing_is_closed(
        gateway_process: Callable[..., GatewayProcess], mock: Mock) -> None:
    """No request at all, or none after an answer: closed without a word (an unasked-for 408
    would be read by a pooling client as the answer to its next request)."""
    gateway = gateway_process(base_config(mock.api_url, listen={"head_timeout_s": 1}))
    with Raw(gateway.port, timeout=30) as conn:
        assert conn.closed()
    with Raw(gateway.port, timeout=30) as conn:
        conn.send(request("GET", "/healthz", key=""))
        assert conn.answer().status == 200
        assert conn.closed()


def test_a_busy_connection_outlives_the_head_timeout(
        gateway_process: Callable[..., GatewayProcess], mock: Mock) -> None:
    """The head timeout bounds the wait for a head, not the request or the connection: on one
    connection, requests the upstream takes 1.5 s each to answer (longer than the 1 s a head
    may take: the timer set for the previous wait fires mid-request), each sent as soon as the
    last was answered, are all answered there; once idle, the connection is closed."""
    gateway = gateway_process(base_config(mock.api_url, listen={"head_timeout_s": 1}))
    mock.fault(delay_s=1.5, count=2)
    with Raw(gateway.port, timeout=30) as conn:
        for n in range(2):
            conn.send(chat(body=b'{"model": "gemini", "n": %d}' % n))
            assert conn.answer().status == 200, n
        assert conn.closed()
    assert mock.count("POST chat/completions") == 2


def test_servers_on_one_loop_watch_heads_at_the_shortest_timeout() -> None:
    """One timer per event loop looks over every connection waiting for a head, often enough
    for the shortest head timeout among the loop's servers (a head is cut within 1.25x of its
    own timeout)."""
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("no request is made")

    async def main() -> tuple[bool, float]:
        state = ServerState()
        slow = HttpProtocol(Config(app, head_timeout_s=10), server_state=state, app_state={})
        quick = HttpProtocol(Config(app, head_timeout_s=1), server_state=state, app_state={})
        return slow._watch is quick._watch, quick._watch.interval_s

    assert asyncio.run(main()) == (True, 0.25)


async def serve_protocol(app: Any) -> tuple[asyncio.Server, ServerState, int]:
    """The gateway's protocol serving `app` on a free port of the running loop."""
    state, loop = ServerState(), asyncio.get_running_loop()
    config = Config(app, head_timeout_s=10, log_config=None)
    server = await loop.create_server(
        lambda: HttpProtocol(config, server_state=state, app_state={}), "127.0.0.1", 0)
    return server, state, server.sockets[0].getsockname()[1]


def test_a_connection_keeps_to_its_class_attribute_table() -> None:
    """CPython keeps an object's attributes in a table its class shares while they number
    fewer than 30; with the 30th the object gets a dictionary of its own, 1.5 KB more for every
    open connection. uvicorn's protocol sets 28 over a request; the gateway's adds one. And the
    three queues a held request keeps (its connection's pipeline, the waiters of its flow control
    and of its request) are lists, not 0.77 KB deques, with a pipelined request still served."""
    held = asyncio.Event()
    release = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/held":
            held.set()
            await release.wait()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def main() -> tuple[list[str], list[type]]:
        server, state, port = await serve_protocol(app)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /held HTTP/1.1\r\nhost: gw\r\n\r\n"
                     b"GET /next HTTP/1.1\r\nhost: gw\r\n\r\n")
        await held.wait()
        (protocol,) = state.connections
        while not protocol.pipeline:  # the second head arrives after the first is held
            await asyncio.sleep(0.01)
        kinds = [type(protocol.pipeline), type(protocol.flow._is_writable_event._waiters),
                 type(protocol.cycle.message_event._waiters)]
        release.set()
        for _ in range(2):
            assert (await reader.readline()).startswith(b"HTTP/1.1 204")
            while (await reader.readline()) != b"\r\n":
                pass
        names = list(vars(protocol))
        writer.close()
        server.close()
        return names, kinds

    names, kinds = asyncio.run(main())
    assert "url" in names and len(names) < 30, names
    assert all(issubclass(kind, list) for kind in kinds), kinds


@pytest.mark.parametrize("server", ["gateway", "other", "gone first"])
def test_a_watch_sees_the_client_leave(server: str) -> None:
    """A stream's relay learns that its client left without reading `receive`: under the
    gateway's server from the server itself (no task: the extension `gateway.disconnect`),
    under another server, or when the client had left before the watch began, from a task
    that waits on `receive`. Stopped, it calls nothing."""
    gone = asyncio.Event()
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # the body
        connection = receive.__self__.transport
        if server == "other":  # a server without the extension: the scope has none
            cycle_receive = receive

            async def receive() -> Any:
                return await cycle_receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        deadline = asyncio.get_running_loop().time() + 10
        while server == "gone first" and not connection.is_closing():
            assert asyncio.get_running_loop().time() < deadline, "the client never left"
            await asyncio.sleep(0.01)
        stopped = DisconnectWatch(receive, lambda: seen.setdefault("stopped", True))
        stopped.stop()
        await asyncio.sleep(0)  # a cancelled task ends at the loop's next turn
        tasks = len(asyncio.all_tasks())
        watch = DisconnectWatch(receive, gone.set)
        seen["tasks"] = len(asyncio.all_tasks()) - tasks
        await gone.wait()
        watch.stop()
        seen["gone"] = watch.gone

    async def main() -> None:
        listening, _, port = await serve_protocol(app)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /s HTTP/1.1\r\nhost: gw\r\ncontent-length: 2\r\n\r\n{}")
        assert b"first" in await reader.readuntil(b"first")
        writer.close()
        await asyncio.wait_for(gone.wait(), 10)
        listening.close()

    asyncio.run(main())
    assert seen == {"tasks": 0 if server == "gateway" else 1, "gone": True}


def test_a_body_that_stalls_is_408(target: Target) -> None:
    """Content-Length larger than the body sent, and the client waits: without a bound the
    gateway would wait for ever; `listen.body_timeout_s` answers 408 and closes."""
    data = request("POST", "/api/v1/chat/completions", body=CHAT)
    with Raw(target.port) as conn:
        conn.send(data.replace(f"Content-Length: {len(CHAT)}".encode(),
                               f"Content-Length: {len(CHAT) + 10}".encode()))
        answer = conn.answer()
        assert conn.closed()
    assert answer.status == 408 and answer.error()["type"] == "invalid_request", answer
    target.assert_untouched()


# -- tables of hostile requests ------------------------------------------------------------------


def raw(method: str, target: str, *lines: bytes | str, body: bytes = b"") -> bytes:
    """A request exactly as given: no header added but Host."""
    head = [f"{method} {target} HTTP/1.1".encode(), b"Host: gateway"]
    head += [line.encode("latin-1") if isinstance(line, str) else line for line in lines]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def chat(*lines: bytes | str, body: bytes = CHAT, length: int | None = None) -> bytes:
    """A chat completion with a valid key and these header lines and body."""
    size = len(body) if length is None else length
    return raw("POST", "/api/v1/chat/completions", f"Authorization: Bearer {KEY}",
               "Content-Type: application/json", f"Content-Length: {size}", *lines, body=body)


def chat_as(authorization: bytes | str | None) -> bytes:
    lines = [] if authorization is None else [b"Authorization: " + (
        authorization.encode("latin-1") if isinstance(authorization, str) else authorization)]
    return raw("POST", "/api/v1/chat/completions", *lines, "Content-Type: application/json",
               f"Content-Length: {len(CHAT)}", body=CHAT)


def nested(depth: int) -> bytes:
    return b'{"model": "gemini", "x": ' + b"[" * depth + b"]" * depth + b"}"


def with_number(number: str) -> bytes:
    return b'{"model": "gemini", "seed": ' + number.encode() + b"}"


def run_table(target: Target, table: dict[str, tuple[bytes, int, str]]) -> None:
    """Each request on its own connection: the expected (status, error type) for every one."""
    seen = {name: outcome(target.send(data)) for name, (data, _, _) in table.items()}
    wrong = [f"{name}: got {seen[name]}, expected {(status, kind)}"
             for name, (_, status, kind) in table.items() if seen[name] != (status, kind)]
    assert not wrong, "\n".join(wrong)


AUTH = "authentication_error"
INVALID = "invalid_request"

AUTHORIZATION = {
    "none": (chat_as(None), 401, AUTH),
    "empty": (chat_as(""), 401, AUTH),
    "no-scheme": (chat_as(KEY), 401, AUTH),
    "scheme-only": (chat_as("Bearer"), 401, AUTH),
    "other-scheme": (chat_as("Basic " + KEY), 401, AUTH),
    "token-and-more": (chat_as(f"Bearer {KEY} {KEY}"), 401, AUTH),
    "comma": (chat_as(f"Bearer {KEY},"), 401, AUTH),
    "30-kb-token": (chat_as("Bearer " + "k" * 30_000), 401, AUTH),
    "100-kb-token": (chat_as("Bearer " + "k" * 100_000), 431, INVALID),
    "utf-8-token": (chat_as("Bearer ключ".encode()), 401, AUTH),
    "latin-1-token": (chat_as(b"Bearer \xff\xfe" + KEY.encode()), 401, AUTH),
    "upstream-scheme-with-key-prefix": (chat_as(f"Bearer  Bearer {KEY}"), 401, AUTH),
    "two-headers": (raw("POST", "/api/v1/chat/completions", "Authorization: Bearer nope",
                        f"Authorization: Bearer {KEY}", "Content-Type: application/json",
                        f"Content-Length: {len(CHAT)}", body=CHAT), 400, INVALID),
}


def test_malformed_authorization(target: Target) -> None:
    """Every malformed credential is the same 401 (or 431 beyond the 32 KiB head limit); two
    Authorization headers (a singleton field, RFC 9110 11.6.2) are 400: which one counts would
    depend on who reads them."""
    run_table(target, AUTHORIZATION)
    target.assert_untouched()


def test_bearer_with_two_spaces_is_a_valid_credential(target: Target) -> None:
    """RFC 9110 (11.4): credentials = auth-scheme [ 1*SP token68 ]: more than one space is
    allowed, so `Bearer  <key>` is the team's key, not an attack."""
    assert target.send(chat_as(f"Bearer  {KEY}")).status == 200


BODIES = {
    "not-utf-8": (chat(body=b'{"model": "gemini", "x": "\xff\xfe"}'), 400, INVALID),
    "utf-16": (chat(body='{"model": "gemini"}'.encode("utf-16")), 400, INVALID),
    "utf-8-bom": (chat(body=b"\xef\xbb\xbf" + CHAT), 400, INVALID),
    "lone-surrogate": (chat(body=b'{"model": "gemini", "x": "\\ud800"}'), 400, INVALID),
    "nan": (chat(body=b'{"model": "gemini", "x": NaN}'), 400, INVALID),
    "infinity": (chat(body=b'{"model": "gemini", "x": Infinity}'), 400, INVALID),
    "1e400": (chat(body=with_number("1e400")), 400, INVALID),
    "-1e400": (chat(body=with_number("-1e400")), 400, INVALID),
    "2**70": (chat(body=with_number(str(2**70))), 400, INVALID),
    "-2**70": (chat(body=with_number(str(-(2**70)))), 400, INVALID),
    "2**64": (chat(body=with_number(str(2**64))), 400, INVALID),
    "1e300": (chat(body=with_number("1e300")), 400, INVALID),
    "nested-255-levels": (chat(body=nested(254)), 400, INVALID),
    "nested-300": (chat(body=nested(300)), 400, INVALID),
    "nested-1000": (chat(body=nested(1000)), 400, INVALID),
    "nested-40000": (chat(body=nested(40_000)), 400, INVALID),
    "nested-objects": (chat(body=b'{"model": "gemini", "x": ' + b'{"a": ' * 500 + b"1"
                            + b"}" * 500 + b"}"), 400, INVALID),
    "empty": (chat(body=b""), 400, INVALID),
    "array": (chat(body=b"[" + CHAT + b"]"), 400, INVALID),
    "trailing-garbage": (chat(body=CHAT + b"}"), 400, INVALID),
    "two-documents": (chat(body=CHAT + b" " + CHAT), 400, INVALID),
    "model-not-a-string": (chat(body=b'{"model": ["gemini"]}'), 400, INVALID),
    "model-not-allowed": (chat(body=b'{"model": "kling-3"}'), 403, "permission_denied"),
}


def test_bad_bodies(target: Target) -> None:
    """Bodies orjson refuses, and bodies it reads but the gateway could not pass on exactly:
    nested deeper than 254 levels (orjson reads 1023, writes 254: the canonical form the cache
    key is made of failed with a 500), numbers of magnitude 2**64 and more (orjson reads a
    larger integer as an inexact float)."""
    run_table(target, BODIES)
    target.assert_untouched()


def test_numbers_and_nesting_within_bounds_pass(target: Target) -> None:
    for body in (with_number(str(2**63 - 1)), with_number(str(-(2**63))),
                 with_number(str(2**64 - 1)), with_number("1.5e19"), nested(253),
                 b'{"model": "gemini", "text": "one e+1 two", "x": [[1.0e+3]]}'):
        answer = target.send(chat(body=body))
        assert answer.status == 200, (body[:60], answer)


def test_the_canonical_body_is_held_in_a_buffer_of_its_size() -> None:
    """A held request keeps its canonical body until the upstream answers: 5,000 held requests
    keep 5,000 of them. orjson returns a document in at least 4 KB (3.13), which the gateway
    must not keep."""
    body = b'{"model": "gemini", "messages": [{"role": "user", "content": "hi"}]}'
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        held = [inbound.json_object(body, b"application/json")[1] for _ in range(100)]
        per_body = (tracemalloc.get_traced_memory()[0] - before) / len(held)
    finally:
        tracemalloc.stop()
    assert held[0] == b'{"messages":[{"content":"hi","role":"user"}],"model":"gemini"}'
    assert per_body < 2 * len(body) + 100, per_body


def test_duplicate_names_never_smuggle_a_forbidden_model(target: Target) -> None:
    """orjson keeps the last of duplicate names, an upstream may keep the first: the model the
    gateway checks must be the one the upstream sees. Research may use gemini, not kling-3.
    Whatever the answer, kling-3 never reaches the upstream (issue 12, defect 4)."""
    smuggled = [  # each one different, so that none is answered from the cache
        b'{"model": "kling-3", "model": "gemini", "n": 1}',
        b'{"model": "gemini", "model": "kling-3", "n": 2}',
        b'{"model": "kling-3", "messages": [], "model": "gemini", "n": 3}',
        b'{"model": "kling-3", "m\\u006fdel": "gemini", "n": 4}',
    ]
    answers = [target.send(chat(body=body)) for body in smuggled]
    assert all(a.status in (200, 400, 403) for a in answers), answers
    sent = [r["body"] for r in target.mock.requests()]
    assert not [body for body in sent if "kling-3" in body], sent


SMALL_LIMIT = 100_000

FRAMING = {
    "length-smaller-than-body": (chat(length=len(CHAT) - 10), 400, INVALID),
    "length-not-a-number": (chat(length=None).replace(
        f"Content-Length: {len(CHAT)}".encode(), b"Content-Length: abc"), 400, INVALID),
    "length-negative": (chat().replace(f"Content-Length: {len(CHAT)}".encode(),
                                       b"Content-Length: -1"), 400, INVALID),
    "length-twice-different": (chat(f"Content-Length: {len(CHAT) + 1}"), 400, INVALID),
    "length-and-chunked": (chat("Transfer-Encoding: chunked"), 400, INVALID),
    "length-huge": (chat().replace(f"Content-Length: {len(CHAT)}".encode(),
                                   b"Content-Length: 99999999999999999999999"), 400, INVALID),
    "length-over-the-limit": (chat(length=SMALL_LIMIT + 1), 413, "request_too_large"),
    "chunked-bad-size": (raw("POST", "/api/v1/chat/completions", f"Authorization: Bearer {KEY}",
                             "Transfer-Encoding: chunked", body=b"zz\r\nabc\r\n0\r\n\r\n"),
                         400, INVALID),
    "chunked-huge-size": (raw("POST", "/api/v1/chat/completions", f"Authorization: Bearer {KEY}",
                              "Transfer-Encoding: chunked",
                              body=b"fffffffffffffffffff\r\nabc\r\n0\r\n\r\n"), 400, INVALID),
    "chunked-over-the-limit": (raw("POST", "/api/v1/chat/completions",
                                   f"Authorization: Bearer {KEY}", "Transfer-Encoding: chunked",
                                   body=b"%x\r\n" % (SMALL_LIMIT + 1) + b"x" * (SMALL_LIMIT + 1)
                                   + b"\r\n0\r\n\r\n"), 413, "request_too_large"),
    "chunked-then-identity": (raw("POST", "/api/v1/chat/completions",
                                  f"Authorization: Bearer {KEY}",
                                  "Transfer-Encoding: chunked, identity",
                                  body=b"5\r\nabcde\r\n0\r\n\r\n"), 400, INVALID),
    "chunked-unterminated": (raw("POST", "/api/v1/chat/completions",
                                 f"Authorization: Bearer {KEY}", "Transfer-Encoding: chunked",
                                 body=b"5\r\n{\"mod\r\n"), 408, INVALID),
}


def test_content_length_and_chunked_framing(target: Target) -> None:
    """Content-Length larger or smaller than the body, malformed or doubled, with chunked
    encoding; chunk sizes that are not hex or overflow; bodies over the limit either way."""
    run_table(target, FRAMING)
    target.assert_untouched()


def test_a_body_cut_short_by_a_half_close(target: Target) -> None:
    """Content-Length promises more than comes, then the client shuts its side: an incomplete
    request, which the gateway may only drop (RFC 9112, 8); counted 499."""
    with Raw(target.port) as conn:
        conn.send(chat(length=len(CHAT) + 100))
        conn.sock.shutdown(socket.SHUT_WR)
        assert conn.answer().status == 0
    target.assert_untouched()


def test_a_valid_chunked_body_is_read_whole(target: Target) -> None:
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                      for part in (CHAT[:10], CHAT[10:30], CHAT[30:])) + b"0\r\n\r\n"
    answer = target.send(raw("POST", "/api/v1/chat/completions", f"Authorization: Bearer {KEY}",
                             "Content-Type: application/json", "Transfer-Encoding: chunked",
                             body=chunks))
    assert answer.status == 200, answer
    # what was checked goes upstream: the same document, as canonical JSON
    assert json.loads(target.mock.requests()[-1]["body"]) == json.loads(CHAT)


def test_pipelined_hostile_requests_are_answered_in_order(target: Target) -> None:
    """Several requests in one write: each one answered, in order, none forwarded; after a
    framing error the connection closes and what follows is never read as a request."""
    batch = [
        (request("GET", "/api/v1/tasks/task%0Ax"), 400),
        (chat(body=b"{not json"), 400),
        (chat_as("Bearer nope"), 401),
        (chat(body=nested(300)), 400),
        (raw("GET", "/api/v1/tasks/task_x", "Connection: close"), 401),
    ]
    with Raw(target.port) as conn:
        conn.send(b"".join(data for data, _ in batch))
        statuses = [conn.answer().status for _ in batch]
        assert conn.closed()
    assert statuses == [status for _, status in batch]

    smuggling = chat("Transfer-Encoding: chunked") + chat()  # the second is never read
    with Raw(target.port) as conn:
        conn.send(smuggling)
        first = conn.answer()
        assert conn.closed()
    assert first.status == 400
    target.assert_untouched()


# -- random requests, as bytes, over the whole proxied surface ---------------------------------

SEGMENTS = st.builds(
    lambda word, tail: word + tail,
    st.sampled_from(["chat", "completions", "tasks", "images", "generations", "task_1", "..",
                     ".", "", "~x", "models"]),
    st.one_of(st.sampled_from(["", "%2e%2e", "%2F", "%00", "%0A", "%0D%0A", "%20", "%ff",
                               "%C2%85", ";x=1", "%25"]),
              st.binary(max_size=6).map(lambda b: quote(b, safe=""))),
)
HEADER_NAMES = ["X-Note", "Accept", "Cache-Control", "Idempotency-Key", "X-Request-ID",
                "Content-Type", "Connection", "TE", "Upgrade", "Expect", "Forwarded",
                "X-Forwarded-For", "Cookie", "Range"]
HEADER_VALUES = st.one_of(
    st.sampled_from(["no-cache", "no-store", "close", "keep-alive, Upgrade", "websocket",
                     "trailers", "100-continue", "application/json", "text/html", "*/*", "",
                     "bytes=0-1", "k" * 300]),
    st.binary(max_size=24).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=10)
BODIES_ANY = st.one_of(
    st.just(CHAT),
    st.dictionaries(st.sampled_from(["model", "messages", "stream", "prompt", "n"]),
                    JSON_VALUES, max_size=4).map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=64),
)


@st.composite
def random_requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(["GET", "POST", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS",
                                   "TRACE", "PROPFIND"]))
    path = "/api/v1/" + "/".join(draw(st.lists(SEGMENTS, min_size=1, max_size=4)))
    query = draw(st.one_of(st.just(""), st.binary(max_size=12).map(
        lambda b: "?" + quote(b, safe="=&"))))
    lines: list[bytes | str] = [f"Authorization: Bearer {KEY}"] if draw(st.integers(0, 9)) else []
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(HEADER_NAMES)).encode()
        lines.append(name + b": " + (lambda v: v if isinstance(v, bytes) else v.encode())(
            draw(HEADER_VALUES)))
    body = draw(BODIES_ANY) if method in ("POST", "PUT", "PATCH") else b""
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    return raw(method, path + query, *lines, body=body)


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(data=random_requests())
def test_random_requests_never_get_a_5xx(target: Target, data: bytes) -> None:
    """Whatever arrives under /api/v1/ is answered (4xx when it is wrong, or the upstream's own
    answer when it is a valid call), never with a 5xx, an answer outside the error shape, or
    an error in the log."""
    answer = target.send(data)
    assert 100 <= answer.status < 500, (data[:300], answer)
    if answer.status >= 400 and not data.startswith(b"HEAD"):
        answer.error()
    errors = [r.getMessage() for r in target.caplog.records
              if r.exc_info or r.levelno >= logging.ERROR]
    assert not errors, (data[:300], errors)


def test_a_websocket_upgrade_is_plain_http(gateway_process: Callable[..., GatewayProcess],
                                           mock: Mock) -> None:
    """The gateway serves no WebSocket: uvicorn (with a WebSocket library installed) took the
    upgrade and answered 403 with no body, outside the error shape. Now it is a plain request:
    the task lookup's 404 here, in the error shape; nothing reaches the upstream."""
    gateway = gateway_process(base_config(mock.api_url))
    with Raw(gateway.port) as conn:
        conn.send(raw("GET", "/api/v1/tasks/task_x", f"Authorization: Bearer {KEY}",
                      "Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13",
                      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="))
        answer = conn.answer()
    assert (answer.status, answer.error()["type"]) == (404, "not_found"), answer
    assert mock.upstream_calls() == 0
