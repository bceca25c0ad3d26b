"""The key-swap proxy end to end: gateway and mock upstream are real uvicorn servers."""

from __future__ import annotations

import json
import logging
import threading
import time
import tracemalloc
from typing import Any

import httpx
import pytest

from gateway import config as cfg
from gateway import forward
from gateway.app import create_app
from gateway.routes import ASYNC_ENDPOINTS
from gateway.store import open_store

from .conftest import (
    ADMIN_KEY,
    KEYS,
    UPSTREAM_KEY,
    GatewayFactory,
    Mock,
    RunningGateway,
    ServerThread,
    base_config,
    free_port,
    raw_http,
)


def error_of(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "type"}
    assert body["error"]["code"] == response.status_code
    return body["error"]  # type: ignore[no-any-return]


def test_key_swap_seen_by_upstream(gateway: RunningGateway, mock: Mock) -> None:
    response = gateway.chat("swap", headers={
        "Cookie": "session=abc", "Proxy-Authorization": "Basic eA==", "Connection": "X-Secret",
        "X-Secret": "hop", "Keep-Alive": "timeout=5", "X-Custom": "kept",
        "X-Forwarded-For": "10.0.0.1",
    })
    assert response.status_code == 200
    (seen,) = mock.requests()
    headers = seen["headers"]
    assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert KEYS["research"] not in str(seen)
    for dropped in ("cookie", "proxy-authorization", "x-secret", "keep-alive", "x-forwarded-for"):
        assert dropped not in headers
    assert headers["x-custom"] == "kept"
    assert headers["x-request-id"] == response.headers["x-request-id"]


def test_upstream_key_never_reaches_the_client(gateway: RunningGateway, mock: Mock) -> None:
    mock.fault(status=401)
    responses = [gateway.chat("a"), gateway.chat("b"), gateway.call("GET", "tasks/task_x"),
                 gateway.call("POST", "images/generations", json={"prompt": "no model"})]
    for response in responses:
        assert UPSTREAM_KEY not in response.text
        assert UPSTREAM_KEY not in str(response.headers)


@pytest.mark.parametrize("path", sorted(ASYNC_ENDPOINTS))
def test_async_endpoints_create_tasks(gateway: RunningGateway, mock: Mock, path: str) -> None:
    response = gateway.call("POST", path, json={"model": "flux-2", "prompt": "a garden"})
    assert response.status_code == 200, response.text
    task = response.json()
    assert task["status"] == "pending" and task["id"].startswith("task_")
    assert mock.count(f"POST {path}") == 1
    polled = gateway.call("GET", f"tasks/{task['id']}")
    assert polled.status_code == 200
    assert polled.json()["id"] == task["id"]


def test_task_completes_through_the_gateway(gateway: RunningGateway) -> None:
    task = gateway.call("POST", "images/generations",
                        json={"model": "flux-2", "prompt": "x"}).json()
    deadline = time.monotonic() + 10
    status = {}
    while time.monotonic() < deadline:
        status = gateway.call("GET", f"tasks/{task['id']}",
                              headers={"Cache-Control": "no-cache"}).json()
        if status["status"] == "completed":
            break
        time.sleep(0.1)
    assert status["status"] == "completed"
    assert status["result"]["url"].endswith(".png")
    assert status["credits_consumed"] == 4


def test_query_string_and_any_method_are_forwarded(gateway: RunningGateway, mock: Mock) -> None:
    response = gateway.call("GET", "models/list?kind=image&page=2")
    assert response.status_code == 404  # the mock knows no such endpoint, and says so
    assert error_of(response)["type"] == "not_found"
    response = gateway.call("DELETE", "files/abc")
    assert response.status_code == 404
    seen = mock.requests()
    assert (seen[0]["method"], seen[0]["path"], seen[0]["query"]) == ("GET", "models/list",
                                                                     "kind=image&page=2")
    assert seen[1]["method"] == "DELETE"


def test_streaming_is_unbuffered(gateway: RunningGateway, mock: Mock) -> None:
    """The mock holds its stream after the first event: the client must already have it."""
    body = {"model": "gemini", "stream": True, "mock_hold": True, "mock_chunk_delay_s": 0,
            "messages": [{"role": "user", "content": "one two three"}]}
    headers = {"Authorization": f"Bearer {KEYS['research']}"}
    with httpx.stream("POST", f"{gateway.url}/api/v1/chat/completions", json=body,
                      headers=headers, timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        first = next(line for line in lines if line)  # blocks forever if the gateway buffered
        assert first.startswith("data: ") and "Mock" in first
        mock.release()
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert '"credits_consumed"' in rest[-2]


def test_stream_is_charged_what_the_upstream_reports(gateway: RunningGateway) -> None:
    body = {"model": "gemini", "stream": True, "mock_chunk_delay_s": 0, "mock_credits": 3,
            "messages": [{"role": "user", "content": "x"}]}
    response = gateway.call("POST", "chat/completions", json=body)
    assert response.text.endswith("data: [DONE]\n\n")
    assert response.headers["x-cache"] == "BYPASS"
    ledger = wait_ledger(gateway, 1)
    assert ledger[0]["credits"] == 3 and ledger[0]["reserved"] == 2


def _long_stream(events: int, size: int) -> Any:
    """An upstream whose chat completion is a stream of `events` events of `size` bytes, then
    the final event with `credits_consumed`."""
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        event = b"data: " + json.dumps({"delta": "x" * size}).encode() + b"\n\n"
        for _ in range(1 if b"warm" in body else events):
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "more_body": False,
                    "body": b'data: {"credits_consumed": 3}\n\ndata: [DONE]\n\n'})

    return app


@pytest.mark.parametrize("idempotent", [False, True])
def test_a_stream_is_kept_only_to_replay_it(make_gateway: GatewayFactory,
                                             idempotent: bool) -> None:
    """A stream passes through without being kept, but for a request with an Idempotency-Key
    (its replay): 3 MB relayed raise the gateway's traced memory at most by what its buffers
    hold (the pool reads 256 KiB ahead, the transports buffer, the last 64 KB are kept for the
    credits: about 1 MB here, whatever the stream's length); kept, by the whole stream (the
    control: the measure sees it)."""
    upstream = ServerThread(_long_stream(3000, 1000)).start()
    try:
        gateway = make_gateway(upstream_url=upstream.url + "/api/v1",
                               cache={"max_entry_bytes": 8_000_000})
        def chat(content: str) -> dict[str, Any]:
            return {"model": "gemini", "stream": True,
                    "messages": [{"role": "user", "content": content}]}

        assert gateway.call("POST", "chat/completions", json=chat("warm")).status_code == 200
        body = chat("x")
        headers = {"Authorization": f"Bearer {KEYS['research']}"}
        if idempotent:
            headers["Idempotency-Key"] = "long-stream"
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            with gateway.client.stream("POST", "/api/v1/chat/completions", json=body,
                                       headers=headers) as answer:
                assert answer.status_code == 200
                size = sum(len(chunk) for chunk in answer.iter_raw())
            grew = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
        assert size > 3_000_000
        assert (grew > 3_000_000) if idempotent else (grew < 1_500_000), grew
        assert [entry["credits"] for entry in wait_ledger(gateway, 2)] == [3, 3]
    finally:
        upstream.stop()


@pytest.mark.parametrize("sizes", [(1,), (7, 100, 3), (4096, 1, 70000, 13)])
def test_a_stream_keeps_its_last_bytes(sizes: tuple[int, ...]) -> None:
    """A stream's tail is the end of what was relayed, at least its last TAIL_BYTES (all of a
    shorter stream), and no more than that and two groups of chunks, however long the stream."""
    stream = b"".join(b"data: {\"n\": %d}\n\n" % i for i in range(12_000))  # 0.2 MB
    tail, at, longest, step = forward._Tail(), 0, 0, 0
    while at < len(stream):
        for size in sizes:
            chunk = stream[at:at + size]
            if chunk:
                tail.add(chunk)
                longest = max(longest, len(chunk))
            at += size
            step += 1
            if step % 499 == 0 or at >= len(stream):
                kept = bytes(tail)
                assert stream[:at].endswith(kept)
                assert len(kept) >= min(at, forward.TAIL_BYTES, len(stream))
                assert len(kept) <= forward.TAIL_BYTES + 16 * longest
    assert len(bytes(forward._Tail())) == 0


def wait_ledger(gateway: RunningGateway, n: int, team: str = "research") -> list[dict]:
    """Bookkeeping runs after the response: wait until `n` ledger entries are there (the
    bookkeeping drained, or the reconciler's round done)."""
    gateway.drain()
    deadline = time.monotonic() + 10
    while True:
        entries = gateway.admin("GET", f"teams/{team}/ledger").json()["entries"]
        if len(entries) >= n or time.monotonic() > deadline:
            return entries  # type: ignore[no-any-return]
        time.sleep(0.02)


# -- validation before anything is spent -------------------------------------------------------


@pytest.mark.parametrize(("body", "content_type", "status", "needle"), [
    (b"{not json", "application/json", 400, "not valid JSON"),
    (b"[1, 2]", "application/json", 400, "JSON object"),
    (b'{"prompt": "x"}', "application/json", 400, "'model'"),
    (b'{"model": 42}', "application/json", 400, "'model'"),
    (b'{"model": ""}', "application/json", 400, "'model'"),
    (b'{"model": "gemini", "x": "\xff\xfe"}', "application/json", 400, "not valid JSON"),
    (b"[" * 5000 + b"]" * 5000, "application/json", 400, "not valid JSON"),
    (b'{"model": "gemini"}', "multipart/form-data; boundary=x", 415, "must be JSON"),
])
def test_bad_bodies_are_refused_before_the_upstream(
    gateway: RunningGateway, mock: Mock, body: bytes, content_type: str, status: int, needle: str
) -> None:
    response = gateway.call("POST", "chat/completions", content=body,
                            headers={"Content-Type": content_type})
    assert response.status_code == status
    error = error_of(response)
    assert error["type"] == "invalid_request" and needle in str(error["message"])
    assert response.headers["x-request-id"]
    assert mock.upstream_calls() == 0


@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", "Basic abc", f"Bearer {KEYS['research']}x",
    f"Bearer {UPSTREAM_KEY}", f"Bearer {ADMIN_KEY}", f"bearer  {KEYS['research']} extra",
])
def test_wrong_keys_get_401(gateway: RunningGateway, mock: Mock, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = gateway.client.post("/api/v1/chat/completions", json={"model": "gemini"},
                                   headers=headers)
    assert response.status_code == 401
    assert error_of(response)["type"] == "authentication_error"
    assert mock.upstream_calls() == 0


def test_bearer_scheme_is_case_insensitive(gateway: RunningGateway) -> None:
    response = gateway.client.post("/api/v1/chat/completions", json={"model": "gemini"},
                                   headers={"Authorization": f"bearer {KEYS['research']}"})
    assert response.status_code == 200


def test_huge_body_is_413(make_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = make_gateway(listen={"max_body_bytes": 1000})
    declared = gateway.chat("x" * 2000)
    assert declared.status_code == 413
    assert error_of(declared)["type"] == "request_too_large"

    def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(10):
            yield b"x" * 500

    streamed = gateway.call("POST", "chat/completions", content=chunks())
    assert streamed.status_code == 413
    assert mock.upstream_calls() == 0


def test_default_body_limit_is_25_mib(make_gateway: GatewayFactory) -> None:
    gateway = make_gateway()
    assert gateway.runtime.policy.config.listen.max_body_bytes == 25 * 1024 * 1024


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/v2/x", "/", "/admin/v1/nope"])
def test_unknown_routes_are_404_in_error_shape(gateway: RunningGateway, path: str) -> None:
    response = gateway.client.get(path, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 404
    assert error_of(response)["type"] == "not_found"
    assert response.headers["x-request-id"]


@pytest.mark.parametrize("path", ["tasks/../chat/completions", "tasks/%2e%2e%2fchat",
                                  "chat//completions", "tasks/a.b", "./chat/completions"])
def test_path_tricks_never_reach_the_upstream(gateway: RunningGateway, mock: Mock,
                                              path: str) -> None:
    status, body = raw_http(gateway.server.port, (
        f"GET /api/v1/{path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Authorization: Bearer {KEYS['research']}\r\n\r\n").encode())
    assert status == 404
    assert json.loads(body)["error"]["type"] == "not_found"
    assert mock.upstream_calls() == 0


def test_unsupported_method_is_405(gateway: RunningGateway, mock: Mock) -> None:
    response = gateway.call("PROPFIND", "chat/completions")
    assert response.status_code == 405
    assert error_of(response)["type"] == "invalid_request"
    assert mock.upstream_calls() == 0


@pytest.mark.parametrize(("request_bytes", "expected"), [
    (b"FROB /api/v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /api/v1/tasks/x HTTP/1.1\r\nHost: x\r\nX-Bad: a\rb\r\n\r\n", 400),
    (b"GET /api/v1/tasks/x HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 100_000 + b"\r\n\r\n",
     431),
    (b"GET /api/v1/tasks/x HTTP/1.1\r\nHost: x\r\n" + b"X-Many: aaaaaaaa\r\n" * 5000
     + b"\r\n", 431),
    (b"GET /api/v1/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431),
], ids=["unknown-method", "cr-in-header", "huge-header", "many-headers", "huge-url"])
def test_unparsable_http_gets_4xx_in_error_shape(gateway: RunningGateway, mock: Mock,
                                                  request_bytes: bytes, expected: int) -> None:
    status, body = raw_http(gateway.server.port, request_bytes)
    assert status == expected
    assert json.loads(body)["error"]["type"] == "invalid_request"
    assert mock.upstream_calls() == 0


def test_request_id_is_kept_or_made(gateway: RunningGateway, mock: Mock) -> None:
    kept = gateway.chat(headers={"X-Request-ID": "abc-123"})
    assert kept.headers["x-request-id"] == "abc-123"
    assert mock.requests()[0]["headers"]["x-request-id"] == "abc-123"
    made = gateway.chat("other")
    assert len(made.headers["x-request-id"]) == 32
    bad = gateway.chat("third", headers={"X-Request-ID": "has space"})
    assert bad.headers["x-request-id"] != "has space"
    for path in ("/healthz", "/readyz", "/metrics", "/nope"):
        assert gateway.client.get(path).headers.get("x-request-id")


# -- the upstream failing ------------------------------------------------------------------------


def test_upstream_5xx_is_passed_on(gateway: RunningGateway, mock: Mock) -> None:
    mock.fault(status=500)
    response = gateway.chat()
    assert response.status_code == 500
    assert error_of(response)["type"] == "server_error"
    assert mock.count("POST chat/completions") == 1  # POSTs are never retried


def test_get_is_retried_on_503(gateway: RunningGateway, mock: Mock) -> None:
    task = gateway.call("POST", "images/generations", json={"model": "flux-2"}).json()
    mock.fault(status=503, path="tasks/", retry_after="0")
    response = gateway.call("GET", f"tasks/{task['id']}")
    assert response.status_code == 200
    assert mock.count(f"GET tasks/{task['id']}") == 2


def test_upstream_429_is_passed_on_with_retry_after(gateway: RunningGateway, mock: Mock) -> None:
    mock.fault(status=429, retry_after="7")
    response = gateway.chat()
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.headers["cache-control"] == "no-store"
    assert error_of(response)["type"] == "rate_limit"


@pytest.mark.parametrize(("status", "ours"), [(401, 502), (402, 503)])
def test_upstream_account_problems_are_not_the_teams(gateway: RunningGateway, mock: Mock,
                                                     status: int, ours: int) -> None:
    mock.fault(status=status)
    response = gateway.chat()
    assert response.status_code == ours
    error = error_of(response)
    assert error["type"] == "upstream_unavailable"
    assert "upstream account needs attention" in str(error["message"])
    line = f'gateway_upstream_requests_total{{route="chat/completions",status="{status}"}} 1.0'
    assert line in gateway.metrics()


def test_upstream_timeout_is_504(make_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = make_gateway(upstream={"timeout_s": 0.3})
    mock.fault(delay_s=1.5)
    response = gateway.chat()
    assert response.status_code == 504
    assert error_of(response)["type"] == "upstream_unavailable"


def test_connection_refused_is_502(make_gateway: GatewayFactory) -> None:
    gateway = make_gateway(upstream_url=f"http://127.0.0.1:{free_port()}/api/v1")
    response = gateway.chat()
    assert response.status_code == 502
    error = error_of(response)
    assert error["type"] == "upstream_unavailable" and "could not be reached" in str(
        error["message"])


def test_dropped_connection_is_502(gateway: RunningGateway, mock: Mock) -> None:
    mock.fault(drop=True)
    response = gateway.chat()
    assert response.status_code == 502
    assert error_of(response)["type"] == "upstream_unavailable"


def test_slow_drip_body_arrives_whole(gateway: RunningGateway, mock: Mock) -> None:
    mock.fault(drip_s=0.01)
    response = gateway.chat("drip")
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"].startswith("Mock answer")


# -- secrets in logs -------------------------------------------------------------------------------


def test_no_secret_in_any_log_line(gateway: RunningGateway, mock: Mock,
                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    gateway.chat("hello")
    gateway.client.post("/api/v1/chat/completions", json={"model": "gemini"},
                        headers={"Authorization": f"Bearer {KEYS['research']}zz"})
    mock.fault(status=401)
    gateway.chat("account")
    mock.fault(drop=True)
    gateway.chat("dropped")
    time.sleep(0.2)
    lines = "\n".join(
        logging.Formatter("%(name)s %(message)s %(exc_text)s").format(r)
        + str(getattr(r, "fields", "")) for r in caplog.records
    )
    assert "gateway.access" in lines
    for secret in (UPSTREAM_KEY, *KEYS.values(), ADMIN_KEY):
        assert secret not in lines


def test_concurrent_requests_share_one_client(gateway: RunningGateway, mock: Mock) -> None:
    results: list[int] = []
    refusals: list[str] = []  # what a failed one said, for the assertion's message

    def call(i: int) -> None:
        answer = gateway.chat(f"concurrent {i}")
        results.append(answer.status_code)
        if answer.status_code != 200:
            refusals.append(answer.text)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 20, refusals
    assert mock.count("POST chat/completions") == 20


def test_a_defect_still_answers_in_the_error_shape(mock: Mock,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """An exception the code did not expect: a 500 in the upstream's shape, and a log line."""

    async def broken(admission: Any) -> Any:
        raise RuntimeError("a bug")

    store = open_store("memory://")
    store.admit = broken  # type: ignore[method-assign]
    config = cfg.from_dict(base_config(mock.api_url))
    server = ServerThread(create_app(config, store=store)).start()
    try:
        response = httpx.post(f"{server.url}/api/v1/chat/completions",
                              json={"model": "gemini"},
                              headers={"Authorization": f"Bearer {KEYS['research']}"})
    finally:
        server.stop()
    assert response.status_code == 500
    assert error_of(response)["type"] == "server_error"
    assert "a bug" not in response.text
    assert any("unexpected error" in r.getMessage() for r in caplog.records)
    assert mock.upstream_calls() == 0


# -- framing: HEAD and 204 -----------------------------------------------------------------------


async def framing_upstream(scope: Any, receive: Any, send: Any) -> None:
    """An upstream for framing tests: `head`, `gzip` (a HEAD answer with a length the gateway
    would not send, the body being decoded on the way) and `empty` (204)."""
    if scope["type"] != "http":
        return
    name = scope["path"].rsplit("/", 1)[-1]
    headers = [(b"content-type", b"application/json")]
    status, body = 200, b'{"id": "task_1", "status": "completed"}'
    if name == "empty":
        status, body, headers = 204, b"", []
    elif name == "gzip":
        headers.append((b"content-encoding", b"gzip"))
    length = b"" if status == 204 else str(len(body) + (7 if name == "gzip" else 0)).encode()
    if length:
        headers.append((b"content-length", length))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body",
                "body": b"" if scope["method"] == "HEAD" else body})


@pytest.fixture
def framing_gateway(make_gateway: GatewayFactory) -> Any:
    upstream = ServerThread(framing_upstream).start()
    yield make_gateway(upstream_url=f"{upstream.url}/api/v1")
    upstream.stop()


def test_head_carries_the_upstreams_length_or_none(framing_gateway: RunningGateway) -> None:
    """Regression (issue 12, defect 9): every HEAD answer said `content-length: 0`."""
    head = framing_gateway.call("HEAD", "things/head")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(b'{"id": "task_1", "status": "completed"}'))
    # gzip: the upstream's length is that of its encoded body, which the gateway does not send
    assert "content-length" not in framing_gateway.call("HEAD", "things/gzip").headers
    # an answer the gateway makes itself has the length its GET would have
    refused = framing_gateway.call("HEAD", "things/head", headers={"Authorization": "Bearer x"})
    get = framing_gateway.call("GET", "things/head", headers={"Authorization": "Bearer x"})
    assert refused.status_code == get.status_code == 401
    assert refused.headers["content-length"] == str(len(get.content))


def test_204_carries_no_content_length(framing_gateway: RunningGateway) -> None:
    """Regression (issue 12, defect 9): RFC 9110 (8.6): no Content-Length on a 204."""
    for method in ("POST", "DELETE", "GET"):
        body = {"json": {"model": "gemini"}} if method == "POST" else {}
        answer = framing_gateway.call(method, "things/empty", **body)
        assert answer.status_code == 204, answer.text
        assert "content-length" not in answer.headers, (method, answer.headers)
