"""An offline stand-in for apiin.one that behaves like its documentation.

- Bearer key check (401 authentication_error), `model` required (400 invalid_request). Each key
  (`api_key`, and `other_keys`) is an account of its own: its own rate limit, and its tasks are
  not found through another key.
- The five async endpoints answer a pending task at once; `GET /api/v1/tasks/{id}` moves it
  pending -> processing -> completed (or failed) over `task_delay_s`, with `credits_consumed`
  and a result URL in the final status.
- Chat completions with `usage` and `credits_consumed`; `"stream": true` as server-sent events.
- The account's own limit (60 requests per minute by default): 429 rate_limit with Retry-After.

Test hooks in the request body: `mock_credits` (credits to report), `mock_raw_credits` (a
string written as is where the credits go, e.g. `1e999`), `mock_delay_s` (task duration),
`mock_fail` (the task fails), `mock_final` (`completed` or `failed`: an async POST answers with
that final status at once), `mock_chunk_delay_s` (pause between stream events), `mock_hold` (a
stream stops after its first event until `POST /_mock/release`).
Control endpoints under `/_mock/`: `faults` (queue failures: a status, a slow answer, a slow
drip, a dropped connection; for one key only with `key`), `stats`, `bill`, `reset`, `config`,
`release`.

The bill (`GET /_mock/bill`) is what the account would be charged, as a real upstream would
bill: the credits it reports in every answer it delivers whole; a task's credits once it
completes, whether anyone asked or not; a stream cut after it began at the model's list price;
nothing for an error, a refusal, or an answer the client was gone before receiving (a task
whose creation was never heard of is dropped).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

ASYNC_PATHS = ("images/generations", "videos/generations", "audio/music", "audio/speech",
               "images/tools/remove-bg")
PRICES = {"flux-2": 4, "kling-3": 100, "gemini": 2}
DEFAULT_PRICE = 5


@dataclass
class Settings:
    api_key: str = "aio_mock_key"
    other_keys: list[str] = field(default_factory=list)  # more accounts
    task_delay_s: float = 2.0
    rate_limit: int | None = 60  # requests per `rate_window_s`; None = unlimited
    rate_window_s: float = 60.0
    record: bool = True  # keep the last requests for tests to inspect


@dataclass
class Fault:
    status: int | None = None
    count: int = 1
    path: str | None = None  # only requests whose path (below /api/v1/) starts with this
    delay_s: float = 0.0
    drip_s: float = 0.0  # pause between body chunks
    drop: bool = False  # cut the connection in the middle of the answer
    retry_after: str | None = None
    key: str | None = None  # only requests sent with this key


@dataclass
class State:
    settings: Settings
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    log: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=500))
    windows: dict[str, deque[float]] = field(default_factory=dict)  # per key
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    held: list[asyncio.Event] = field(default_factory=list)
    billed: list[tuple[str, float]] = field(default_factory=list)  # (X-Request-ID, credits)

    def bill(self) -> dict[str, Any]:
        now = time.time()
        tasks = sum(_number(t["fail_credits"] if t["fail"] else t["credits"])
                    for t in self.tasks.values() if now - t["created"] >= t["delay"])
        answers = sum(credits for _, credits in self.billed)
        return {"answers": answers, "tasks": tasks, "total": answers + tasks,
                "items": [list(item) for item in self.billed],
                "pending_tasks": sum(now - t["created"] < t["delay"]
                                     for t in self.tasks.values())}


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def list_price(model: str) -> float:
    return float(PRICES.get(model, DEFAULT_PRICE))


class Billed:
    """Delivers an answer; its credits go on the bill only if the client was still there when
    the whole answer had been sent (else `lost` is called)."""

    def __init__(self, state: State, answer: Any, credits: float,
                 lost: Callable[[], object] | None = None) -> None:
        self.state, self.answer, self.credits, self.lost = state, answer, credits, lost

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = asyncio.Event()
        delivered = False

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        async def send_last(message: Message) -> None:
            nonlocal delivered
            if message["type"] == "http.response.body" and not message.get("more_body"):
                await asyncio.sleep(0)  # a disconnect that came during the answer is seen now
                delivered = not gone.is_set()
            await send(message)

        watcher = asyncio.ensure_future(watch())
        try:
            await self.answer(scope, receive, send_last)
        finally:
            watcher.cancel()
        if delivered:
            self.state.billed.append((_request_id(scope), self.credits))
        elif self.lost is not None:
            self.lost()


def error(status: int, message: str, type_: str, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps({"error": {"code": status, "message": message, "type": type_}})
    return Response(body, status, headers=headers, media_type="application/json")


def json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status, media_type="application/json")


class Dropped:
    """Starts an answer and cuts the connection half way: the client sees a broken body."""

    def __init__(self, status: int = 200) -> None:
        self.status = status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", b"1000")]})
        await send({"type": "http.response.body", "body": b'{"partial": ', "more_body": True})
        raise ConnectionAbortedError("mock upstream: dropped connection")


class Dripping(Response):
    """The answer, a few bytes at a time."""

    def __init__(self, body: bytes, pause_s: float, status: int = 200) -> None:
        super().__init__(body, status, media_type="application/json")
        self.pause_s = pause_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        for i in range(0, len(self.body), 8):
            await send({"type": "http.response.body", "body": self.body[i:i + 8],
                        "more_body": True})
            await asyncio.sleep(self.pause_s)
        await send({"type": "http.response.body", "body": b""})


class EventStream:
    """Server-sent events that stop as soon as the client goes away (even while the next event
    is being waited for), and always close their generator: its `finally` does the billing."""

    def __init__(self, events: Any) -> None:
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        gone = asyncio.ensure_future(disconnected())
        try:
            while True:
                step = asyncio.ensure_future(self.events.__anext__())
                await asyncio.wait({step, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    step.cancel()
                    await asyncio.gather(step, return_exceptions=True)
                    return
                try:
                    chunk = step.result()
                except StopAsyncIteration:
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            gone.cancel()
            await self.events.aclose()


def create_mock_app(settings: Settings | None = None) -> Starlette:
    state = State(settings or Settings())

    async def gate(request: Request, path: str) -> Response | Fault | None:
        """Auth, the account's rate limit and queued faults, like the real service's front."""
        s = state.settings
        body = await request.body()
        state.counts[f"{request.method} {path}"] += 1
        if s.record:
            state.log.append({"method": request.method, "path": path,
                              "query": request.url.query,
                              "headers": dict(request.headers),
                              "body": body.decode(errors="replace")})
        sent = request.headers.get("authorization")
        key = next((k for k in (s.api_key, *s.other_keys) if sent == f"Bearer {k}"), None)
        if key is None:
            return error(401, "Invalid API key", "authentication_error")
        request.state.key = key
        if s.rate_limit is not None:
            now = time.monotonic()
            window = state.windows.setdefault(key, deque())
            while window and window[0] <= now - s.rate_window_s:
                window.popleft()
            if len(window) >= s.rate_limit:
                wait = max(1, int(window[0] + s.rate_window_s - now) + 1)
                state.counts["429"] += 1
                return error(429, "Rate limit exceeded", "rate_limit", {"Retry-After": str(wait)})
            window.append(now)
        for fault in state.faults:
            if (fault.path is None or path.startswith(fault.path)) and fault.key in (None, key):
                fault.count -= 1
                if fault.count <= 0:
                    state.faults.remove(fault)
                if fault.delay_s:
                    await asyncio.sleep(fault.delay_s)
                return fault
        return None

    def faulted(fault: Fault, ok: Response) -> Response | Dropped:
        if fault.drop:
            return Dropped()
        if fault.status is not None:
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
            kind = {429: "rate_limit", 402: "insufficient_credits", 401: "authentication_error",
                    400: "invalid_request", 404: "not_found"}.get(fault.status, "server_error")
            return error(fault.status, "Injected failure", kind, headers)
        if fault.drip_s:
            return Dripping(bytes(ok.body), fault.drip_s, ok.status_code)
        return ok

    async def payload(request: Request) -> dict[str, Any] | Response:
        try:
            data = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return error(400, "Invalid JSON body", "invalid_request")
        if not isinstance(data, dict) or not isinstance(data.get("model"), str):
            return error(400, "The 'model' parameter is required", "invalid_request")
        return data

    async def create_task(request: Request) -> Any:
        path = request.url.path.removeprefix("/api/v1/")
        gated = await gate(request, path)
        if isinstance(gated, Response):
            return gated
        data = await payload(request)
        if isinstance(data, Response):
            return data
        if gated and (gated.status or gated.drop):  # refused or cut: no task was made
            return faulted(gated, json({}))
        task_id = f"task_{next(state.ids):06d}{int(time.time() * 1000) % 100000:05d}"
        created = time.time()
        final = data.get("mock_final")
        task = {
            "model": data["model"],
            "created": created,
            "delay": 0.0 if final else float(data.get("mock_delay_s",
                                                      state.settings.task_delay_s)),
            "credits": data.get("mock_credits", list_price(data["model"])),
            "fail": final == "failed" or bool(data.get("mock_fail", False)),
            # what a failed task reports it cost: nothing, unless told at once (mock_final)
            "fail_credits": data.get("mock_credits", 0) if final == "failed" else 0,
            "kind": path,
            "key": request.state.key,  # the account: another key does not see the task
        }
        state.tasks[task_id] = task
        body: dict[str, Any] = {"id": task_id, "status": "pending", "model": data["model"],
                                "created_at": _iso(created)}
        if final == "completed":
            body.update(status="completed", credits_consumed=task["credits"])
        elif final == "failed":
            body.update(status="failed", error={"message": "Generation failed"})
            if "mock_credits" in data:
                body["credits_consumed"] = task["fail_credits"]
        answer: Any = json(body)
        if gated:
            answer = faulted(gated, answer)
        return Billed(state, answer, 0.0, lost=lambda: state.tasks.pop(task_id, None))

    async def task_status(request: Request) -> Any:
        task_id = request.path_params["task_id"]
        gated = await gate(request, f"tasks/{task_id}")
        if isinstance(gated, Response):
            return gated
        task = state.tasks.get(task_id)
        if task is None or task["key"] != request.state.key:
            return error(404, "Task not found", "not_found")
        elapsed = time.time() - task["created"]
        body: dict[str, Any] = {"id": task_id, "model": task["model"],
                                "created_at": _iso(task["created"])}
        if elapsed < task["delay"] / 2:
            body["status"] = "pending"
        elif elapsed < task["delay"]:
            body["status"] = "processing"
        elif task["fail"]:
            body.update(status="failed", error={"message": "Generation failed"},
                        credits_consumed=task["fail_credits"])
        else:
            ext = "mp4" if "video" in task["kind"] else "mp3" if "audio" in task["kind"] else "png"
            body.update(status="completed", completed_at=_iso(task["created"] + task["delay"]),
                        result={"url": f"https://cdn.apiin.one/mock/{task_id}.{ext}"},
                        credits_consumed=task["credits"])
        answer = json(body)
        return faulted(gated, answer) if gated else answer

    async def chat(request: Request) -> Any:
        gated = await gate(request, "chat/completions")
        if isinstance(gated, Response):
            return gated
        data = await payload(request)
        if isinstance(data, Response):
            return data
        messages = data.get("messages") or []
        if not isinstance(messages, list):
            return error(400, "'messages' must be a list", "invalid_request")
        n = next(state.ids)
        prompt = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        words = (f"Mock answer {n} to: {prompt}"[:400]).split()
        credits = data.get("mock_credits", list_price(data["model"]))
        raw = data.get("mock_raw_credits")
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(words),
                 "total_tokens": len(prompt.split()) + len(words)}
        if data.get("stream") is True and not (gated and gated.status):
            pause = float(data.get("mock_chunk_delay_s", 0.05))
            hold = None
            if data.get("mock_hold"):
                hold = asyncio.Event()
                state.held.append(hold)
            if await request.is_disconnected():  # gone during a slow start: nothing began
                return Response(status_code=499)
            events = _events(state, request.headers.get("x-request-id", ""), n, data["model"],
                             words, usage, credits, raw, pause, hold,
                             drop=bool(gated and gated.drop))
            return EventStream(events)
        body = orjson.dumps({
            "id": f"chatcmpl_{n}", "object": "chat.completion", "model": data["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": " ".join(words)}}],
            "usage": usage, "credits_consumed": credits,
        })
        if isinstance(raw, str):
            body = body.replace(b'"credits_consumed":' + orjson.dumps(credits),
                                b'"credits_consumed":' + raw.encode())
        answer = Response(body, 200, media_type="application/json")
        if gated:
            faulty = faulted(gated, answer)
            if not isinstance(faulty, Dripping):
                return faulty
            answer = faulty
        return Billed(state, answer, _number(credits) if raw is None else 0.0)

    async def other(request: Request) -> Any:
        gated = await gate(request, request.path_params["rest"])
        if isinstance(gated, Response):
            return gated
        return error(404, "Not found", "not_found")

    async def control_faults(request: Request) -> Response:
        data = orjson.loads(await request.body() or b"{}")
        state.faults.append(Fault(**data))
        return json({"queued": len(state.faults)})

    async def control_bill(request: Request) -> Response:
        return json(state.bill())

    async def control_stats(request: Request) -> Response:
        return json({"counts": dict(state.counts), "requests": list(state.log),
                     "faults": len(state.faults), "tasks": len(state.tasks)})

    async def control_reset(request: Request) -> Response:
        state.faults.clear()
        state.billed.clear()
        state.tasks.clear()
        state.counts.clear()
        state.log.clear()
        state.windows.clear()
        for event in state.held:
            event.set()
        state.held.clear()
        return json({"reset": True})

    async def control_release(request: Request) -> Response:
        for event in state.held:
            event.set()
        state.held.clear()
        return json({"released": True})

    async def control_config(request: Request) -> Response:
        for name, value in orjson.loads(await request.body() or b"{}").items():
            setattr(state.settings, name, value)
        return json({"ok": True})

    routes = [Route(f"/api/v1/{p}", create_task, methods=["POST"]) for p in ASYNC_PATHS]
    routes += [
        Route("/api/v1/chat/completions", chat, methods=["POST"]),
        Route("/api/v1/tasks/{task_id}", task_status, methods=["GET"]),
        Route("/api/v1/{rest:path}", other,
              methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]),
        Route("/_mock/faults", control_faults, methods=["POST"]),
        Route("/_mock/stats", control_stats, methods=["GET"]),
        Route("/_mock/bill", control_bill, methods=["GET"]),
        Route("/_mock/reset", control_reset, methods=["POST"]),
        Route("/_mock/config", control_config, methods=["POST"]),
        Route("/_mock/release", control_release, methods=["POST"]),
    ]
    app = Starlette(routes=routes)
    app.state.mock = state
    return app


async def _events(state: State, request_id: str, n: int, model: str, words: list[str],
                  usage: dict[str, int], credits: Any, raw: Any, pause: float,
                  hold: asyncio.Event | None, drop: bool = False) -> Any:
    """The events of a streamed chat; billed at the reported credits once the last one has
    been sent, at the model's list price if the stream is cut before (by the client, or by
    the upstream itself: `drop` cuts the connection after the first event)."""
    billed = False
    try:
        for i, word in enumerate(words):
            chunk = {"id": f"chatcmpl_{n}", "object": "chat.completion.chunk", "model": model,
                     "choices": [{"index": 0, "delta": {"content": word + " "}}]}
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
            if drop:
                raise ConnectionAbortedError("mock upstream: dropped the stream")
            if i == 0 and hold is not None:
                await hold.wait()
            await asyncio.sleep(pause)
        final = orjson.dumps({"id": f"chatcmpl_{n}", "object": "chat.completion.chunk",
                              "model": model,
                              "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                              "usage": usage, "credits_consumed": credits})
        if isinstance(raw, str):
            final = final.replace(b'"credits_consumed":' + orjson.dumps(credits),
                                  b'"credits_consumed":' + raw.encode())
        yield b"data: " + final + b"\n\n"
        billed = True
        state.billed.append((request_id, _number(credits) if raw is None else 0.0))
        yield b"data: [DONE]\n\n"
    finally:
        if not billed:
            state.billed.append((request_id, list_price(model)))


def _request_id(scope: Scope) -> str:
    return next((v.decode() for k, v in scope["headers"] if k == b"x-request-id"), "")


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
