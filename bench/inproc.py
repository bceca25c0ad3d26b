#!/usr/bin/env python3
"""The gateway's own cost per request, without HTTP: its ASGI app driven directly (8 requests
at a time) against a real store and the mock upstream, the process's CPU per request printed.

    python -m gateway mock-upstream --fast --port 9311 --key aio_bench_upstream_key &
    redis-server --port 6399 --save "" --daemonize yes
    python3 bench/inproc.py redis://127.0.0.1:6399 hit|miss N [--stub-port 9311]

Instructions per request, the one figure a shared machine does not move: run it under
`valgrind --tool=callgrind` at N and at 2N requests and divide the difference of the two
totals by N (start-up cancels out). Call the Python binary itself (`python -c "import sys;
print(sys.executable)"`), not a wrapper script such as pyenv's shim.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import gateway_config
from gateway import config as cfg
from gateway.app import Gateway, create_app, settle_heap

KEY = "bench_inproc_key"
CONCURRENCY = 8


class _Cycle:
    """The request's `receive`, shaped as uvicorn's (`more_body` False: the body came with the
    head, so the gateway sets no body timer, as under uvicorn)."""

    more_body = False

    def __init__(self, body: bytes) -> None:
        self.body: bytes | None = body

    async def receive(self) -> dict[str, Any]:
        if self.body is not None:
            body, self.body = self.body, None
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # no disconnect: the answer is complete before this
        raise AssertionError("unreachable")


async def request(app: Gateway, n: int) -> int:
    body = (b'{"model": "gemini", "messages": [{"role": "user", "content": '
            b'"Say hello (inproc %d)"}]}' % n)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/api/v1/chat/completions",
             "raw_path": b"/api/v1/chat/completions", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"gateway"), (b"authorization", b"Bearer " + KEY.encode()),
                         (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8080), "state": {}}
    status = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, _Cycle(body).receive, send)
    return status[0]


async def main(app: Gateway, mode: str, count: int) -> None:
    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outgoing: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    lifespan = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"},
                                        "state": {}}, incoming.get, outgoing.put))
    await incoming.put({"type": "lifespan.startup"})
    assert (await outgoing.get())["type"] == "lifespan.startup.complete"
    settle_heap()  # as the served process does
    for i in range(300):  # warm: connections made, the hit's entry cached
        assert await request(app, 0 if mode == "hit" else -i - 1) == 200

    async def worker(first: int) -> None:
        for i in range(first, count, CONCURRENCY):
            assert await request(app, 0 if mode == "hit" else i + 1) == 200

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(CONCURRENCY)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(f"{mode}: {cpu / count * 1e6:.1f} us of CPU per request, {count / wall:,.0f} "
          "requests/s")
    await incoming.put({"type": "lifespan.shutdown"})
    await outgoing.get()
    await lifespan


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", help="memory:// or a redis:// URL")
    parser.add_argument("mode", choices=("hit", "miss"))
    parser.add_argument("count", type=int)
    parser.add_argument("--stub-port", type=int, default=9311)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gateway.yaml"
        path.write_text(gateway_config(
            options.stub_port, options.store, prefix=f"inproc{time.time_ns()}",
            key_sha256=hashlib.sha256(KEY.encode()).hexdigest(), access_log=False, cache=True))
        gateway = create_app(cfg.load(str(path)), config_path=str(path))
        uvloop.run(main(gateway, options.mode, options.count))
