"""Traces (issue 16): spans exported over OTLP/HTTP to a real local receiver.

The receiver (tests/otlp.py) decodes what a collector would get. Spans leave in batches from a
background thread, so the tests poll the receiver until what they expect has arrived; absence is
shown by order (a later sampled request's spans arrive, an earlier unsampled one's never do).
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import values as prometheus_values

from gateway import config as cfg
from gateway.tracing import traces_url

from .conftest import (
    ADMIN_KEY,
    KEYS,
    UPSTREAM_KEY,
    GatewayFactory,
    Mock,
    RedisServer,
    RunningGateway,
    base_config,
    eventually,
    free_port,
)
from .otlp import Receiver, Span, trees, values, walk

SERVER, CLIENT = 2, 3  # OTLP span kinds
CLIENT_SPAN = "0af7651916cd43dd8448eb211c80319c"
CLIENT_PARENT = "b7ad6b7169203331"
TRACEPARENT_RE = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def traced(make_gateway: GatewayFactory, store_url: str, receiver: Receiver,
           **tracing: Any) -> RunningGateway:
    return make_gateway(store_url, tracing={"endpoint": receiver.endpoint,
                                            "export_interval_s": 0.05, **tracing})


def traceparent(trace_id: str = CLIENT_SPAN, parent: str = CLIENT_PARENT,
                sampled: bool = True) -> dict[str, str]:
    return {"traceparent": f"00-{trace_id}-{parent}-{'01' if sampled else '00'}"}


def request_tree(receiver: Receiver, trace_id: str, *children: str) -> Span:
    """The request span of `trace_id`, once it and the named children have arrived."""
    def complete(spans: list[Span]) -> bool:
        mine = [s for s in spans if s.trace_id == trace_id]
        got = [s.name for s in mine]
        return any(s.kind == SERVER for s in mine) and all(c in got for c in children)

    spans = [s for s in receiver.wait(complete) if s.trace_id == trace_id]
    (root,) = [s for s in trees(spans) if s.kind == SERVER]
    return root


def upstream_traceparent(mock: Mock) -> tuple[str, str, str] | None:
    value = mock.requests()[-1]["headers"].get("traceparent")
    if value is None:
        return None
    match = TRACEPARENT_RE.fullmatch(value)
    assert match is not None, value
    return match.group(1), match.group(2), str(int(match.group(3), 16) & 1)  # the sampled bit


def test_one_request_is_one_tree_and_the_upstream_gets_its_span(
        make_gateway: GatewayFactory, store_url: str, receiver: Receiver, mock: Mock) -> None:
    gateway = traced(make_gateway, store_url, receiver)
    answer = gateway.chat("what is a span", headers=traceparent())
    assert answer.status_code == 200
    root = request_tree(receiver, CLIENT_SPAN, "gateway.admit", "gateway.cache",
                        "POST /api/v1/chat/completions", "gateway.bookkeeping")
    # the client's span is the parent; the request span's children are the steps
    assert root.parent_id == CLIENT_PARENT
    assert root.name == "POST /api/v1/chat/completions"
    kids = {c.name: c for c in root.children}
    assert sorted(kids) == ["POST /api/v1/chat/completions", "gateway.admit", "gateway.bookkeeping",
                            "gateway.cache"]
    assert all(not c.children for c in root.children)
    a = root.attributes
    assert a["http.request.method"] == "POST" and a["http.response.status_code"] == 200
    assert a["url.path"] == "/api/v1/chat/completions"
    assert a["http.route"] == "/api/v1/chat/completions"
    assert a["gen_ai.system"] == "apiin.one" and a["gen_ai.request.model"] == "gemini"
    assert a["gen_ai.operation.name"] == "chat"
    body = answer.json()
    assert a["gen_ai.usage.input_tokens"] == body["usage"]["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == body["usage"]["completion_tokens"]
    assert a["gateway.team"] == "research" and a["gateway.key_id"] == "research-key"
    assert a["gateway.cache"] == "miss" and a["gateway.credits_charged"] == 2
    assert a["gateway.request_id"] == answer.headers["x-request-id"]
    assert root.resource["service.name"] == "aio-gateway"
    assert kids["gateway.admit"].attributes["gateway.verdict"] == "admit"
    assert kids["gateway.cache"].attributes["gateway.cache.result"] == "miss"
    upstream = kids["POST /api/v1/chat/completions"]
    assert upstream.kind == CLIENT
    assert upstream.attributes["http.response.status_code"] == 200
    assert upstream.attributes["server.address"] == "127.0.0.1"
    assert upstream.attributes["gateway.upstream.pace_wait_s"] == 0
    # the upstream received the upstream span's traceparent, not the client's
    assert upstream_traceparent(mock) == (CLIENT_SPAN, upstream.span_id, "1")
    # the bookkeeping batch that carried this request's completion links to it
    bookkeeping = kids["gateway.bookkeeping"]
    spans = receiver.wait(lambda spans: any(
        (CLIENT_SPAN, bookkeeping.span_id) in s.links for s in spans))
    (batch,) = [s for s in spans if (CLIENT_SPAN, bookkeeping.span_id) in s.links]
    assert batch.name == "gateway.bookkeeping.batch" and batch.parent_id == ""
    assert batch.trace_id != CLIENT_SPAN


def test_cache_hit_replay_and_task_routes(make_gateway: GatewayFactory, store_url: str,
                                          receiver: Receiver, mock: Mock) -> None:
    gateway = traced(make_gateway, store_url, receiver)
    assert gateway.chat("cached", headers=traceparent("1" * 32)).headers["x-cache"] == "MISS"
    gateway.drain()  # the entry is in the cache
    hit = gateway.chat("cached", headers=traceparent("2" * 32))
    assert hit.headers["x-cache"] == "HIT"
    root = request_tree(receiver, "2" * 32, "gateway.cache")
    assert {c.name for c in root.children} == {"gateway.admit", "gateway.cache"}  # no upstream
    (cache,) = [c for c in root.children if c.name == "gateway.cache"]
    assert cache.attributes["gateway.cache.result"] == "hit"
    assert root.attributes["gateway.cache"] == "hit"

    body = {"model": "flux-2", "prompt": "a lighthouse"}
    for trace_id in ("3" * 32, "4" * 32):
        answer = gateway.call("POST", "images/generations", json=body,
                              headers={"Idempotency-Key": "img-1", **traceparent(trace_id)})
        assert answer.status_code == 200
    assert answer.headers["idempotent-replayed"] == "true"
    root = request_tree(receiver, "4" * 32, "gateway.cache")
    (cache,) = [c for c in root.children if c.name == "gateway.cache"]
    assert cache.attributes["gateway.cache.result"] == "replay"
    created = request_tree(receiver, "3" * 32, "POST /api/v1/images/generations")
    assert created.attributes["gen_ai.operation.name"] == "generate_content"

    task_id = answer.json()["id"]
    assert gateway.call("GET", f"tasks/{task_id}", headers=traceparent("5" * 32)).is_success
    root = request_tree(receiver, "5" * 32, "GET /api/v1/tasks/{task_id}")
    assert root.attributes["http.route"] == "/api/v1/tasks/{task_id}"
    assert root.attributes["url.path"] == f"/api/v1/tasks/{task_id}"
    (upstream,) = [c for c in root.children if c.kind == CLIENT]
    assert upstream.attributes["url.template"] == "/api/v1/tasks/{task_id}"


def test_a_follower_waits_in_a_coalesced_span(make_gateway: GatewayFactory, store_url: str,
                                              receiver: Receiver, mock: Mock) -> None:
    gateway = traced(make_gateway, store_url, receiver)
    mock.fault(delay_s=3)  # the leader stays in flight (its timeout: 5 s) as the follower comes
    leader: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: leader.append(
        gateway.chat("together", headers=traceparent("6" * 32))))
    thread.start()
    mock.wait_for("POST chat/completions")
    follower = gateway.chat("together", headers=traceparent("7" * 32))
    thread.join()
    assert follower.headers["x-cache"] == "COALESCED"
    assert leader[0].headers["x-cache"] == "MISS"
    root = request_tree(receiver, "7" * 32, "gateway.cache")
    (cache,) = [c for c in root.children if c.name == "gateway.cache"]
    assert cache.attributes["gateway.cache.result"] == "coalesced"
    assert not [c for c in root.children if c.kind == CLIENT]


def test_a_stream_has_its_usage_and_the_upstream_span_covers_it(
        make_gateway: GatewayFactory, store_url: str, receiver: Receiver, mock: Mock) -> None:
    gateway = traced(make_gateway, store_url, receiver)
    with gateway.client.stream(
            "POST", "/api/v1/chat/completions",
            json={"model": "gemini", "stream": True, "mock_chunk_delay_s": 0,
                  "messages": [{"role": "user", "content": "stream me"}]},
            headers={"Authorization": f"Bearer {KEYS['research']}", **traceparent("8" * 32)},
    ) as answer:
        text = answer.read().decode()
    assert answer.status_code == 200 and "[DONE]" in text
    root = request_tree(receiver, "8" * 32, "POST /api/v1/chat/completions",
                        "gateway.bookkeeping")
    (upstream,) = [c for c in root.children if c.kind == CLIENT]
    assert upstream.attributes["http.response.status_code"] == 200
    assert root.attributes["gen_ai.usage.input_tokens"] == 2
    assert root.attributes["gen_ai.usage.output_tokens"] > 0


def test_sampling_follows_the_client_and_the_ratio(make_gateway: GatewayFactory, store_url: str,
                                                   receiver: Receiver, mock: Mock) -> None:
    gateway = traced(make_gateway, store_url, receiver, sample_ratio=0.0)
    # the ratio (0) decides for a request without traceparent: nothing is exported, and the
    # upstream still learns the trace, marked not sampled
    assert gateway.chat("unsampled root").status_code == 200
    unsampled = upstream_traceparent(mock)
    assert unsampled is not None and unsampled[2] == "0"
    # a client's sampled flag is respected both ways
    assert gateway.chat("client says no", headers=traceparent("a" * 32, sampled=False)).is_success
    sent = upstream_traceparent(mock)
    assert sent is not None and sent[0] == "a" * 32 and sent[2] == "0"
    assert gateway.chat("client says yes", headers=traceparent("b" * 32)).is_success
    request_tree(receiver, "b" * 32, "gateway.bookkeeping")
    gateway.drain()
    receiver.wait(lambda spans: any(s.name == "gateway.bookkeeping.batch" for s in spans))
    traces = {s.trace_id for s in receiver.all()}
    assert "a" * 32 not in traces and unsampled[0] not in traces
    assert all(s.trace_id == "b" * 32 or s.name == "gateway.bookkeeping.batch"
               for s in receiver.all())


@pytest.mark.parametrize("header", [
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",  # no flags
    "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # all-zero trace id
    "zz-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",  # upper case
    "garbage",
])
def test_a_malformed_traceparent_is_ignored(make_gateway: GatewayFactory, receiver: Receiver,
                                            mock: Mock, header: str) -> None:
    gateway = traced(make_gateway, "memory://", receiver)
    answer = gateway.chat("malformed", headers={"traceparent": header})
    assert answer.status_code == 200
    spans = receiver.wait(lambda spans: any(s.kind == SERVER for s in spans))
    (root,) = [s for s in spans if s.kind == SERVER]
    assert root.parent_id == "" and root.trace_id != CLIENT_SPAN  # a new trace
    sent = upstream_traceparent(mock)
    assert sent is not None and sent[0] == root.trace_id  # ours, not the malformed one


def test_nothing_secret_in_any_span(make_gateway: GatewayFactory, store_url: str,
                                    receiver: Receiver, mock: Mock) -> None:
    gateway = traced(make_gateway, store_url, receiver)
    prompts = ["PROMPT_chat_7f3a91 my password is hunter2", "PROMPT_image_c0ffee lighthouse"]
    bad_key = "aiogw_not_a_real_key_SECRET_66666666"
    gateway.chat(prompts[0], extra={"temperature": 0.123456789})
    gateway.chat(prompts[0])  # a hit
    created = gateway.call("POST", "images/generations",
                           json={"model": "flux-2", "prompt": prompts[1]},
                           headers={"Cookie": "session=COOKIE_SECRET_1234"})
    gateway.call("GET", f"tasks/{created.json()['id']}")
    gateway.client.post("/api/v1/chat/completions", json={"model": "gemini", "messages": []},
                        headers={"Authorization": f"Bearer {bad_key}"})
    gateway.client.post("/api/v1/chat/completions", content=b"{not json",
                        headers={"Authorization": f"Bearer {KEYS['research']}"})
    gateway.call("POST", "chat/completions?api_key=QUERY_SECRET_99",
                 json={"model": "gemini", "messages": [{"role": "user", "content": "q"}]})
    gateway.drain()
    spans = receiver.wait(lambda spans: sum(s.kind == SERVER for s in spans) == 7
                          and sum(s.name == "gateway.bookkeeping.batch" for s in spans) >= 1)
    secrets = [*KEYS.values(), UPSTREAM_KEY, ADMIN_KEY, bad_key, "hunter2", "PROMPT_",
               "COOKIE_SECRET", "QUERY_SECRET", "0.123456789", "lighthouse", "Bearer",
               "Mock answer"]
    for span in spans:
        for text in values(span):
            for secret in secrets:
                assert secret not in text, (span.name, text)
    statuses = sorted(s.attributes["http.response.status_code"] for s in spans
                      if s.kind == SERVER)
    assert statuses == [200, 200, 200, 200, 200, 400, 401]


@pytest.mark.parametrize("processes", ["one", "multiprocess"])
def test_exemplars_carry_the_trace_ids(processes: str, tmp_path: Any,
                                       monkeypatch: pytest.MonkeyPatch,
                                       make_gateway: GatewayFactory, receiver: Receiver,
                                       mock: Mock) -> None:
    if processes == "multiprocess":  # values in files, as with --workers N
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
        # prometheus-client picks its value class from the environment when first imported
        monkeypatch.setattr(prometheus_values, "ValueClass", prometheus_values.MultiProcessValue())
    gateway = traced(make_gateway, "memory://", receiver)
    gateway.chat("exemplar", headers=traceparent("c" * 32))
    root = request_tree(receiver, "c" * 32, "POST /api/v1/chat/completions")
    (upstream,) = [c for c in root.children if c.kind == CLIENT]
    text = gateway.client.get("/metrics", headers={
        "Accept": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"})
    assert text.headers["content-type"].startswith("application/openmetrics-text")
    assert text.text.endswith("# EOF\n")
    exemplars = re.findall(r'^(\w+)_bucket\{[^}]*\} \S+ # \{span_id="(\w+)",trace_id="(\w+)"\}',
                           text.text, re.M)
    assert ("gateway_request_duration_seconds", root.span_id, "c" * 32) in exemplars
    assert ("gateway_upstream_duration_seconds", upstream.span_id, "c" * 32) in exemplars
    plain = gateway.metrics()  # the Prometheus text format has no exemplars
    assert "trace_id" not in plain


def test_tracing_off_builds_nothing_and_sends_no_traceparent(
        make_gateway: GatewayFactory, store_url: str, mock: Mock) -> None:
    gateway = make_gateway(store_url)
    assert gateway.runtime.tracing is None and gateway.runtime.bookkeeper._trace is None
    assert gateway.chat("untraced").status_code == 200
    assert "traceparent" not in mock.requests()[-1]["headers"]
    # a client's own traceparent passes through untouched, as any other header would
    header = traceparent()["traceparent"]
    assert gateway.chat("untraced 2", headers=traceparent()).status_code == 200
    assert mock.requests()[-1]["headers"]["traceparent"] == header
    answer = gateway.client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert answer.headers["content-type"].startswith("text/plain")
    assert "trace_id" not in answer.text


def dropped(gateway: RunningGateway) -> dict[str, float]:
    found = re.findall(r'^gateway_trace_spans_dropped_total\{reason="(\w+)"\} (\S+)$',
                       gateway.metrics(), re.M)
    return {reason: float(n) for reason, n in found}


def test_a_hung_collector_costs_dropped_spans_not_requests(
        make_gateway: GatewayFactory, receiver: Receiver, mock: Mock) -> None:
    receiver.hold.clear()  # every export hangs until released
    gateway = traced(make_gateway, "memory://", receiver, queue_size=4, timeout_s=60)
    for i in range(20):  # each request ends 4-5 spans: the queue of 4 overflows
        assert gateway.chat(f"hung {i}").status_code == 200
    assert dropped(gateway).get("queue_full", 0) > 0
    receiver.hold.set()


def test_a_refusing_or_absent_collector_is_counted(make_gateway: GatewayFactory,
                                                   receiver: Receiver, mock: Mock) -> None:
    receiver.status = 400  # refuses every batch (not retried)
    gateway = traced(make_gateway, "memory://", receiver)
    assert gateway.chat("refused").status_code == 200
    eventually(lambda: dropped(gateway).get("export_failed", 0) > 0, "spans dropped")

    absent = make_gateway("memory://", tracing={"endpoint": f"http://127.0.0.1:{free_port()}",
                                                "export_interval_s": 0.05, "timeout_s": 0.5})
    assert absent.chat("nobody listens").status_code == 200
    eventually(lambda: dropped(absent).get("export_failed", 0) > 0, "spans dropped")


def test_shutdown_exports_what_is_queued(make_gateway: GatewayFactory, receiver: Receiver,
                                         mock: Mock) -> None:
    # batches would leave only once an hour: the spans reach the collector at shutdown
    gateway = traced(make_gateway, "memory://", receiver, export_interval_s=3600)
    gateway.chat("at shutdown", headers=traceparent("d" * 32))
    assert receiver.all() == []
    gateway.close()
    assert request_tree(receiver, "d" * 32, "gateway.bookkeeping", "gateway.admit")


def test_two_workers_on_redis(redis_server: RedisServer, mock: Mock, receiver: Receiver,
                              gateway_process: Any, tmp_path: Any) -> None:
    redis_server.cli("FLUSHALL")
    config = base_config(mock.api_url, redis_server.url,
                         tracing={"endpoint": receiver.endpoint, "export_interval_s": 0.05})
    gateway = gateway_process(config, workers=2,
                              env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")})

    async def send(n: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(client.post(
                f"{gateway.url}/api/v1/chat/completions",
                headers={"Authorization": f"Bearer {KEYS['research']}",
                         **traceparent(f"{i + 1:032x}")},
                json={"model": "gemini", "messages": [{"role": "user", "content": f"w{i}"}]})
                for i in range(n)))

    answers = asyncio.run(send(20))
    assert {a.status_code for a in answers} == {200}
    # the worker that answers a scrape shows the exemplars of the requests it served
    ours = {f"{i + 1:032x}" for i in range(20)}
    seen: set[str] = set()
    for _ in range(20):
        with httpx.Client(timeout=10) as client:  # a new connection: either worker may answer
            text = client.get(f"{gateway.url}/metrics",
                              headers={"Accept": "application/openmetrics-text"}).text
        seen |= set(re.findall(r'trace_id="(\w+)"', text))
        if seen:
            break
    assert seen and seen <= ours
    sent = {r["headers"]["traceparent"] for r in mock.requests()}
    for i in range(20):
        trace_id = f"{i + 1:032x}"
        root = request_tree(receiver, trace_id, "POST /api/v1/chat/completions",
                            "gateway.admit", "gateway.bookkeeping")
        (upstream,) = [c for c in root.children if c.kind == CLIENT]
        assert any(value.startswith(f"00-{trace_id}-{upstream.span_id}-") for value in sent)
        assert all(s.trace_id == trace_id for s in walk(root))
    assert gateway.stop() == 0  # the last batches leave before the workers exit


def test_config() -> None:
    good = cfg.from_dict({**base_config("http://up"), "tracing": {"endpoint": "http://c:4318"}})
    assert good.tracing == cfg.Tracing(endpoint="http://c:4318")
    assert traces_url("http://c:4318/") == "http://c:4318/v1/traces"
    assert cfg.from_dict(base_config("http://up")).tracing is None
    bad = {
        "ftp://c:4318": "tracing.endpoint: must start with http:// or https://",
        "http://user:SECRET@c:4318": "tracing.endpoint: must not carry credentials",
        "http://c:4318/?x=1": "tracing.endpoint: must have no query or fragment",
    }
    for endpoint, message in bad.items():
        with pytest.raises(cfg.ConfigError) as error:
            cfg.from_dict({**base_config("http://up"), "tracing": {"endpoint": endpoint}})
        assert str(error.value).startswith(message)
        assert "SECRET" not in str(error.value)
    for field, value, message in [
        ("sample_ratio", 1.5, "tracing.sample_ratio: must be at most 1"),
        ("sample_ratio", -0.1, "tracing.sample_ratio: must be at least 0"),
        ("queue_size", 0, "tracing.queue_size: must be at least 1"),
        ("export_interval_s", 0, "tracing.export_interval_s: must be greater than 0"),
        ("timeout_s", float("nan"), "tracing.timeout_s: must be a finite number"),
    ]:
        with pytest.raises(cfg.ConfigError) as error:
            cfg.from_dict({**base_config("http://up"),
                           "tracing": {"endpoint": "http://c:4318", field: value}})
        assert str(error.value).startswith(message)
    with pytest.raises(cfg.ConfigError, match=r"tracing\.endpoint: required field is missing"):
        cfg.from_dict({**base_config("http://up"), "tracing": {"sample_ratio": 0.1}})
