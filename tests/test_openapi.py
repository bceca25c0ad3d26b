"""The OpenAPI document: valid, complete, and true of a running gateway.

The document (`gateway/openapi.py`) is checked three ways: it is valid OpenAPI 3.0 and served at
/openapi.json; it lists exactly the routes the app serves; and schemathesis fuzzes a real gateway
(uvicorn, the project's mock upstream, memory and Redis stores) against it with its status-code,
content-type, response-schema and response-header conformance checks plus two of ours: no 5xx
(the upstream is up, so a 5xx would be the gateway's own), and every JSON error in the error
shape with a `type` from the contract. Hand-made requests then reach the answers random input
cannot (a replay, a cache hit, a stream, a spent quota, a dead store or upstream, a reload...)
and go through the same conformance checks.

The `test_regression_*` tests keep the defects this fuzzing found fixed.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from schemathesis.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.routing import Route

from gateway import config as cfg
from gateway import openapi, routes
from gateway.app import create_app
from gateway.auth import hash_key

from .conftest import (
    ADMIN_KEY,
    KEYS,
    UPSTREAM_KEY,
    GatewayFactory,
    Mock,
    RedisServer,
    RunningGateway,
    ServerThread,
    base_config,
    free_port,
    team_config,
)

SPARE_KEY = "aiogw_spare_key_for_revocation_0123456"
WRONG_KEY = "aiogw_not_a_key_of_this_gateway_00000"


def fuzz_teams() -> dict[str, Any]:
    """research: quotas and a budget it cannot spend here; marketing: an allow-list and a budget
    of two requests, so that 402 and 403 come up; spare: a key that may be revoked."""
    return {
        "research": team_config("research", requests_per_minute=100_000,
                                requests_per_day=1_000_000,
                                budget={"credits": 10_000_000, "period": "month"}),
        "marketing": team_config("marketing", models=["gemini", "flux-2"],
                                 budget={"credits": 20, "period": "total"}),
        "spare": {"keys": [{"id": "spare-key", "sha256": hash_key(SPARE_KEY)}]},
    }


def documented_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, item in document["paths"].items()
            for method in item if method in ("get", "put", "post", "delete", "patch")}


# -- the checks ----------------------------------------------------------------------------------


def gateway_error_shape(ctx: Any, response: Any, case: Any) -> None:
    """Every 4xx/5xx with a JSON body is {"error": {"code", "message", "type"}}, `type` known."""
    if response.status_code < 400:
        return
    media = response.headers.get("content-type", [""])[0].split(";")[0].strip()
    if media != "application/json":
        return
    body = orjson.loads(response.content)
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    error = body["error"]
    assert isinstance(error.get("code"), int) and isinstance(error.get("message"), str), body
    assert error.get("type") in openapi.ERROR_TYPES, body
    assert error["code"] == response.status_code, body


def no_server_error(ctx: Any, response: Any, case: Any) -> None:
    """The upstream is up and healthy here: a 5xx would be the gateway's own failure."""
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} -> {response.status_code}: "
        f"{response.content[:300]!r}")


CONFORMANCE = [status_code_conformance, content_type_conformance, response_schema_conformance,
               response_headers_conformance, gateway_error_shape]
CHECKS = [*CONFORMANCE, no_server_error]


# -- (a) a valid document, served as it is -------------------------------------------------------


def test_the_document_is_valid_openapi() -> None:
    document = openapi.document()
    assert document["openapi"].startswith("3.0.")
    validate(document)
    assert json.loads(json.dumps(document)) == document  # plain JSON all the way down
    document["paths"]["/healthz"]["get"]["security"].append({"teamKey": []})
    assert openapi.document()["paths"]["/healthz"]["get"]["security"] == []  # nothing shared
    schemathesis.openapi.from_dict(openapi.document()).validate()


def test_the_gateway_serves_the_document(make_gateway: GatewayFactory) -> None:
    gateway = make_gateway()
    answer = gateway.client.get("/openapi.json")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["x-request-id"]
    assert answer.json() == openapi.document()
    # schemathesis does not fuzz the operation that serves the document itself: check it here
    conforms(answer)


# -- (b) every route is documented, and only those -----------------------------------------------


def test_every_route_is_documented_and_only_those(make_gateway: GatewayFactory) -> None:
    gateway = make_gateway()
    served: set[tuple[str, str]] = set()
    for route in gateway.app.site.app.routes:  # the Starlette site behind RequestIdMiddleware
        assert isinstance(route, Route), route
        served |= {(route.path, m) for m in route.methods or {"GET"} if m != "HEAD"}
    served |= {(f"/api/v1/{endpoint}", "POST") for endpoint in routes.ENDPOINTS}
    served.add((f"/api/v1/{routes.TASKS}/{{task_id}}", "GET"))
    assert documented_operations(openapi.document()) == served


def test_the_documented_routes_are_served(make_gateway: GatewayFactory) -> None:
    """No documented operation meets the gateway's router 404 or 405."""
    gateway = make_gateway(teams=fuzz_teams())
    for path, method in sorted(documented_operations(openapi.document())):
        url = path.format(task_id="task_x", team="research", key_id="spare-key",
                          hook_id="msg_" + "0" * 32)
        key = ADMIN_KEY if path.startswith("/admin/") else KEYS["research"]
        body = {"model": "gemini", "messages": []} if method == "POST" else None
        answer = gateway.client.request(method, url, json=body,
                                        headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code != 405, (method, path)
        if answer.status_code == 404:  # a task nobody created, a webhook that never failed
            assert "{task_id}" in path or "{hook_id}" in path, (method, path, answer.text)


# -- (c) fuzzing a running gateway -------------------------------------------------------------


def credentials(case: Any, known: dict[str, str]) -> str | None:
    """Mostly the right key; one case in seven without one, with an unknown key or with the
    other kind of key (admin on the API, team on the admin API); on the API, one in ten with the
    marketing key (allow-list, small budget). Chosen from the case itself, so that a rerun and
    Hypothesis' shrinking send the same."""
    body = case.body if isinstance(case.body, dict | list | str | int | float | None) else None
    path = {k: "known" if v == known.get(k) else v for k, v in (case.path_parameters or {}).items()}
    seen = repr((case.method, case.path, sorted(path.items()), sorted((case.query or {}).items()),
                 body, sorted((k.lower(), v) for k, v in (case.headers or {}).items()
                              if k.lower() != "authorization")))
    pick = hashlib.sha256(seen.encode()).digest()[0] % 20
    admin = case.path.startswith("/admin/")
    if pick == 0:
        return None
    if pick == 1:
        return f"Bearer {WRONG_KEY}"
    if pick == 2:
        return f"Bearer {KEYS['research'] if admin else ADMIN_KEY}"
    if pick in (3, 4) and not admin:
        return f"Bearer {KEYS['marketing']}"
    return f"Bearer {ADMIN_KEY if admin else KEYS['research']}"


@pytest.fixture
def fuzz_gateway(make_gateway: GatewayFactory, store_url: str) -> RunningGateway:
    return make_gateway(store_url, teams=fuzz_teams())


@pytest.fixture
def known(fuzz_gateway: RunningGateway) -> dict[str, str]:
    """Real values to mix into generated ones: random team names, key ids, task ids and ledger
    positions would only ever meet a 404 or an empty page."""
    gateway = fuzz_gateway
    task = gateway.call("POST", "images/generations", json={"model": "flux-2", "prompt": "x"})
    assert task.status_code == 200, task.text
    assert gateway.chat("for the ledger").status_code == 200
    gateway.drain()  # the ledger is written just after the answer
    entries = gateway.admin("GET", "teams/research/ledger").json()["entries"]
    assert entries
    return {"team": "research", "key_id": "spare-key", "task_id": task.json()["id"],
            "after": entries[0]["id"]}


def _mixed(generated: dict[str, Any] | None, known: dict[str, str]) -> Any:
    real = {k: known.get(k, v) for k, v in (generated or {}).items()}
    return st.just(generated) if real == (generated or {}) else st.sampled_from([real, generated])


@pytest.fixture
def api_schema(fuzz_gateway: RunningGateway, known: dict[str, str]) -> Any:
    no_feedback = {"extra-data-sources": {"responses": False}}
    config = schemathesis.Config.from_dict({
        "seed": 20240508,
        "base-url": fuzz_gateway.url,
        "generation": {"mode": "all", "max-examples": 25, "deterministic": True,
                       "database": "none"},
        # nothing learnt from answers (task ids, timestamps): the same inputs on every run
        "phases": {
            "examples": no_feedback,
            "coverage": no_feedback,
            "fuzzing": {**no_feedback, "error-feedback": {"enabled": False}},
            "stateful": {"enabled": False},
        },
        "request-timeout": 10,
    })
    loaded = schemathesis.openapi.from_url(f"{fuzz_gateway.url}/openapi.json", config=config)

    @loaded.hook
    def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any] | None) -> Any:
        return _mixed(path_parameters, known)

    @loaded.hook
    def flatmap_query(context: Any, query: dict[str, Any] | None) -> Any:
        return _mixed(query, known)

    return loaded


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture
def reached(fuzz_gateway: RunningGateway) -> Iterator[dict[tuple[str, str], set[int]]]:
    """Statuses each operation answered to the right key (a team's on the API, the admin's on
    the admin API). At the end, every operation of the document (but the document itself) must
    have been fuzzed, and each must have got past authentication at least once: a run that
    only ever met 401 would prove nothing about what lies behind it."""
    seen: dict[tuple[str, str], set[int]] = {}
    yield seen
    fuzzed = documented_operations(openapi.document()) - {("/openapi.json", "GET")}
    assert set(seen) == fuzzed, sorted(fuzzed - set(seen))
    locked = {op: statuses for op, statuses in seen.items() if not statuses - {401, 403}}
    assert not locked, locked


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_fuzz_the_running_gateway(case: Any, fuzz_gateway: RunningGateway,
                                  known: dict[str, str],
                                  reached: dict[tuple[str, str], set[int]]) -> None:
    """Every operation, the admin API with an admin key included: no 5xx, and every answer
    what the document says (`CHECKS`)."""
    authorization = credentials(case, known)
    case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
    if authorization is not None:
        case.headers["Authorization"] = authorization
    if case.path == "/api/v1/chat/completions" and isinstance(case.body, dict):
        case.body = {**case.body, "mock_chunk_delay_s": 0}  # a mock hook: no pauses in streams
    answer = case.call(timeout=10)
    operation = (case.operation.path, case.operation.method.upper())
    statuses = reached.setdefault(operation, set())
    right = ADMIN_KEY if case.path.startswith("/admin/") else KEYS["research"]
    open_path = case.path in ("/healthz", "/readyz", "/metrics")
    if case.method.upper() == operation[1] and (open_path or authorization == f"Bearer {right}"):
        statuses.add(answer.status_code)
    case.validate_response(answer, checks=CHECKS)


# -- hand-made requests through the same checks --------------------------------------------------


_SCHEMA = schemathesis.openapi.from_dict(openapi.document())
_TEMPLATES = [(re.compile("^" + re.sub(r"\{([a-z_]+)\}", r"(?P<\1>[^/]+)", path) + "$"), path)
              for path in openapi.document()["paths"]]


def conforms(answer: httpx.Response, *, checks: list[Any] | None = None) -> httpx.Response:
    """`answer` (to a documented operation) is what the document says it can be."""
    request = answer.request
    template, match = next((t, m) for pattern, t in _TEMPLATES
                           if (m := pattern.match(request.url.path)))
    case = _SCHEMA[template][request.method].Case(path_parameters=match.groupdict())
    case.validate_response(answer, checks=checks or CONFORMANCE)
    return answer


def error_of(answer: httpx.Response) -> dict[str, Any]:
    return answer.json()["error"]  # type: ignore[no-any-return]


def test_answers_beyond_random_input(make_gateway: GatewayFactory, mock: Mock) -> None:
    gateway = make_gateway(teams=fuzz_teams())
    marketing = {"team": "marketing"}

    first = conforms(gateway.chat("hi"))
    again = conforms(gateway.chat("hi"))
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("MISS", "HIT")
    assert "age" in again.headers

    stream = conforms(gateway.chat("hi", extra={"stream": True, "mock_chunk_delay_s": 0}))
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.text.rstrip().endswith("data: [DONE]")

    once = {"Idempotency-Key": "order-42"}
    created = conforms(gateway.call("POST", "videos/generations", headers=once,
                                    json={"model": "kling-3", "prompt": "waves"}))
    replay = conforms(gateway.call("POST", "videos/generations", headers=once,
                                   json={"model": "kling-3", "prompt": "waves"}))
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json() == created.json()
    other = conforms(gateway.call("POST", "videos/generations", headers=once,
                                  json={"model": "kling-3", "prompt": "sand"}))
    assert other.status_code == 422
    bad_key = conforms(gateway.call("POST", "videos/generations", json={"model": "kling-3"},
                                    headers={"Idempotency-Key": "x" * 256}))
    assert bad_key.status_code == 400

    task_id = created.json()["id"]
    status = conforms(gateway.call("GET", f"tasks/{task_id}"))
    assert status.json()["status"] in ("pending", "processing")
    assert conforms(gateway.call("GET", f"tasks/{task_id}", **marketing)).status_code == 404
    deadline = time.monotonic() + 5
    while status.json()["status"] != "completed" and time.monotonic() < deadline:
        time.sleep(0.1)
        status = conforms(gateway.call("GET", f"tasks/{task_id}"))
    assert status.json()["credits_consumed"] == 100

    assert conforms(gateway.chat("x", model="kling-3", **marketing)).status_code == 403
    for _ in range(6):  # 20 credits, 4 held per flux-2 task until it is finished
        spent = conforms(gateway.call("POST", "images/generations", json={"model": "flux-2"},
                                      **marketing))
        if spent.status_code != 200:
            break
    assert (spent.status_code, error_of(spent)["type"]) == (402, "insufficient_credits")

    html = conforms(gateway.call("POST", "audio/music", content=b"<p>hi</p>",
                                 headers={"Content-Type": "text/html"}))
    assert html.status_code == 415
    assert conforms(gateway.call("POST", "audio/music", content=b"{")).status_code == 400

    mock.fault(status=500, path="images/tools/remove-bg")  # the upstream's own 500 passes through
    broken = conforms(gateway.call("POST", "images/tools/remove-bg", json={"model": "x"}),
                      checks=CONFORMANCE)
    assert (broken.status_code, error_of(broken)["type"]) == (500, "server_error")
    mock.fault(status=401, path="audio/music")
    assert conforms(gateway.call("POST", "audio/music", json={"model": "x"})).status_code == 502
    mock.fault(status=402, path="audio/music")
    assert conforms(gateway.call("POST", "audio/music", json={"model": "x"})).status_code == 503


def test_limits_and_conflicts_conform(make_gateway: GatewayFactory, mock: Mock) -> None:
    teams = fuzz_teams()
    teams["research"] = team_config("research", requests_per_minute=2)
    gateway = make_gateway(teams=teams, listen={"max_body_bytes": 1000})

    big = conforms(gateway.call("POST", "chat/completions", json={"model": "x", "p": "x" * 2000}))
    assert big.status_code == 413

    mock.fault(delay_s=1.0, path="images/generations")
    key = {"Idempotency-Key": "slow-one"}
    first: list[httpx.Response] = []
    slow = threading.Thread(target=lambda: first.append(gateway.call(
        "POST", "images/generations", headers=key, json={"model": "flux-2"})))
    slow.start()
    mock.wait_for("POST images/generations")
    busy = conforms(gateway.call("POST", "images/generations", headers=key,
                                 json={"model": "flux-2"}))
    slow.join()
    assert busy.status_code == 409 and conforms(first[0]).status_code == 200

    for _ in range(3):  # two a minute; the first POST counted, the 413 and the 409 did not
        limited = conforms(gateway.call("GET", "tasks/task_unknown"))
        if limited.status_code != 404:
            break
    assert (limited.status_code, error_of(limited)["type"]) == (429, "rate_limit")
    assert limited.headers["cache-control"] == "no-store"
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.headers["ratelimit-policy"] == '"minute";q=2;w=60'


def test_a_broken_upstream_conforms(make_gateway: GatewayFactory, mock: Mock) -> None:
    gone = make_gateway(upstream_url=f"http://127.0.0.1:{free_port()}/api/v1")
    unreachable = conforms(gone.chat("hi"))
    assert (unreachable.status_code, error_of(unreachable)["type"]) == (502,
                                                                         "upstream_unavailable")

    slow = make_gateway(upstream={"timeout_s": 0.3})
    mock.fault(delay_s=1.5, path="chat/completions")
    late = conforms(slow.chat("hi"))
    assert (late.status_code, error_of(late)["type"]) == (504, "upstream_unavailable")


def test_a_dead_store_conforms(private_redis: RedisServer, make_gateway: GatewayFactory) -> None:
    # `private_redis` first, so that it outlives the gateway (fixtures end in reverse order)
    gateway = make_gateway(private_redis.url, teams=fuzz_teams())
    assert conforms(gateway.client.get("/readyz")).json()["status"] == "ready"
    private_redis.stop()
    try:
        for answer in (gateway.chat("hi"), gateway.call("GET", "tasks/task_x"),
                       gateway.admin("GET", "teams"), gateway.admin("GET", "keys"),
                       gateway.admin("DELETE", "cache"), gateway.client.get("/readyz")):
            conforms(answer)
            assert (answer.status_code, error_of(answer)["type"]) == (503, "store_unavailable")
            assert answer.headers["retry-after"] == "1"
        assert conforms(gateway.client.get("/healthz")).status_code == 200
        assert conforms(gateway.client.get("/metrics")).status_code == 200
    finally:
        private_redis.start()  # the failed admissions' cancels land, and shutdown is quick


def test_the_admin_api_conforms(make_gateway: GatewayFactory, mock: Mock,
                                tmp_path: Path) -> None:
    gateway = make_gateway(teams=fuzz_teams())
    for i in range(3):
        assert gateway.chat(f"entry {i}").status_code == 200
    deadline = time.monotonic() + 5
    while len(gateway.admin("GET", "teams/research/ledger").json()["entries"]) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)

    teams = {t["team"]: t for t in conforms(gateway.admin("GET", "teams")).json()["teams"]}
    assert teams["research"]["budget"]["period"] == "month"
    assert teams["marketing"]["budget"]["period_ends"] is None
    assert teams["spare"]["budget"] is None and teams["spare"]["models"] is None
    page = conforms(gateway.admin("GET", "teams/research/ledger", params={"limit": 2})).json()
    assert len(page["entries"]) == 2 and page["next"] == page["entries"][1]["id"]
    rest = conforms(gateway.admin("GET", "teams/research/ledger",
                                  params={"after": page["next"]})).json()
    assert len(rest["entries"]) == 1 and rest["next"] is None
    for params in ({"limit": "many"}, {"after": "yesterday"}):
        assert conforms(gateway.admin("GET", "teams/research/ledger",
                                      params=params)).status_code == 400
    assert conforms(gateway.admin("GET", "teams/nobody/ledger")).status_code == 404

    assert conforms(gateway.admin("POST", "keys/spare-key/revoke")).json()["revoked"] is True
    keys = {k["id"]: k for k in conforms(gateway.admin("GET", "keys")).json()["keys"]}
    assert keys["spare-key"]["revoked"] and not keys["research-key"]["revoked"]
    assert conforms(gateway.admin("DELETE", "keys/spare-key/revoke")).json()["revoked"] is False
    assert conforms(gateway.admin("POST", "keys/nobody/revoke")).status_code == 404

    flushed = conforms(gateway.admin("DELETE", "cache",
                                     params={"route": "chat/completions", "team": "research"}))
    assert flushed.json()["removed"] == 3
    assert conforms(gateway.admin("DELETE", "cache", params={"route": "x"})).status_code == 400
    assert conforms(gateway.admin("DELETE", "cache", params={"team": "x"})).status_code == 404
    assert conforms(gateway.admin("POST", "reload")).status_code == 400  # no config file
    (account,) = conforms(gateway.admin("GET", "accounts")).json()["accounts"]
    assert account["id"] == "default" and account["in_rotation"] is True
    mock.fault(status=402)  # the one account's credits are gone: out of rotation
    assert gateway.chat("no credits").status_code == 503
    (account,) = conforms(gateway.admin("GET", "accounts")).json()["accounts"]
    assert account["out_of_rotation"]["status"] == 402

    for authorization, status in ((None, 401), (f"Bearer {KEYS['research']}", 403)):
        headers = {"Authorization": authorization} if authorization else {}
        answer = gateway.client.get("/admin/v1/keys", headers=headers)
        assert conforms(answer).status_code == status

    # a gateway started from a file reloads it, and refuses a broken one
    path = tmp_path / "gateway.yaml"
    raw = base_config(gateway.runtime.policy.config.upstream.base_url)
    path.write_text(yaml.safe_dump(raw))
    server = ServerThread(create_app(cfg.load(str(path)), config_path=str(path))).start()
    try:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        reloaded = conforms(httpx.post(f"{server.url}/admin/v1/reload", headers=admin,
                                       timeout=30))
        assert reloaded.json()["reloaded"] is True
        path.write_text(yaml.safe_dump({**raw, "surprise": 1}))
        refused = conforms(httpx.post(f"{server.url}/admin/v1/reload", headers=admin))
        assert refused.status_code == 400 and "surprise" in error_of(refused)["message"]
    finally:
        server.stop()


# -- defects the fuzzing found, kept fixed -----------------------------------


@pytest.mark.parametrize("after", ["1-2-3", "-5", "\u00b2"])
def test_regression_malformed_ledger_position_is_a_client_error(gateway: RunningGateway,
                                                         after: str) -> None:
    answer = gateway.admin("GET", "teams/research/ledger", params={"after": after})
    assert answer.status_code == 400, (answer.status_code, answer.text)
    assert error_of(answer)["type"] == "invalid_request"


def test_regression_upstream_429_is_passed_on_with_retry_after(make_gateway: GatewayFactory,
                                                        mock: Mock) -> None:
    gateway = make_gateway()
    mock.fault(status=429, path="images/generations")  # no retry_after: no header
    answer = gateway.call("POST", "images/generations", json={"model": "flux-2"})
    assert answer.status_code == 429
    assert "retry-after" in answer.headers


def test_regression_one_request_id_when_the_upstream_echoes_it(
        make_gateway: GatewayFactory) -> None:
    async def echo(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request_id = dict(scope["headers"]).get(b"x-request-id", b"")
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"x-request-id", request_id)]})
        await send({"type": "http.response.body", "body": b'{"id": "task_1"}'})

    upstream = ServerThread(echo).start()
    try:
        gateway = make_gateway(upstream_url=f"{upstream.url}/api/v1")
        answer = gateway.call("POST", "images/generations", json={"model": "m"},
                              headers={"X-Request-ID": "abc"})
        assert answer.headers.get_list("x-request-id") == ["abc"]
    finally:
        upstream.stop()


def test_regression_mock_upstream_crashes_on_numeric_messages(mock: Mock) -> None:
    answer = mock.client.post("/api/v1/chat/completions", json={"model": "gemini", "messages": 5},
                              headers={"Authorization": f"Bearer {UPSTREAM_KEY}"})
    assert answer.status_code == 400, (answer.status_code, answer.text)


def test_regression_reload_of_a_file_that_is_not_utf8_is_refused(mock: Mock,
                                                                 tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    raw = base_config(mock.api_url)
    path.write_text(yaml.safe_dump(raw))
    server = ServerThread(create_app(cfg.load(str(path)), config_path=str(path))).start()
    try:
        path.write_bytes(yaml.safe_dump(raw).encode() + b"# \xff\n")
        answer = httpx.post(f"{server.url}/admin/v1/reload",
                            headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert answer.status_code == 400, (answer.status_code, answer.text)
    finally:
        server.stop()
