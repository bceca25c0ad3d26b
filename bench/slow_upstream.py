#!/usr/bin/env python3
"""A slow upstream for bench/scale.py: it holds every chat completion for `--hold` seconds, so
that the gateway holds it too (a streamed one gets an event every `--every` seconds meanwhile,
then the final event with `credits_consumed`).

    python3 bench/slow_upstream.py PORT [--hold 20] [--every 1]

`GET /_held` says how many requests it holds now and at most so far. A body containing `warm`
is answered at once: the warm-up before the gateway's idle RSS is read. aiohttp's server, not
the project's mock: it must hold thousands of connections without being the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import uvloop
from aiohttp import web
from run import STUB_ANSWER  # bench/run.py: what the nginx stub answers

HELD = web.AppKey("held", dict)


def event(data: dict[str, object]) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def make_app(hold_s: float, every_s: float) -> web.Application:
    app = web.Application()
    app[HELD] = {"now": 0, "peak": 0}

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        held = request.app[HELD]
        wait = 0.0 if b"warm" in body else hold_s
        held["now"] += wait > 0
        held["peak"] = max(held["peak"], held["now"])
        try:
            if json.loads(body).get("stream") is not True:
                await asyncio.sleep(wait)
                return web.Response(text=STUB_ANSWER, content_type="application/json")
            answer = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await answer.prepare(request)
            loop = asyncio.get_running_loop()
            end = loop.time() + wait
            while True:
                await answer.write(event({"object": "chat.completion.chunk", "choices": [
                    {"index": 0, "delta": {"content": "word "}}]}))
                left = end - loop.time()
                if left <= 0:
                    break
                await asyncio.sleep(min(every_s, left))
            await answer.write(event({"object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": {
                    "prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9},
                "credits_consumed": 2}))
            await answer.write(b"data: [DONE]\n\n")
            await answer.write_eof()
            return answer
        finally:
            held["now"] -= wait > 0

    async def held(request: web.Request) -> web.Response:
        return web.json_response(request.app[HELD])

    app.router.add_post("/api/v1/chat/completions", chat)
    app.router.add_get("/_held", held)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("port", type=int)
    p.add_argument("--hold", type=float, default=20.0, help="seconds before the answer ends")
    p.add_argument("--every", type=float, default=1.0, help="seconds between stream events")
    args = p.parse_args()
    uvloop.install()
    web.run_app(make_app(args.hold, args.every), host="127.0.0.1", port=args.port,
                backlog=4096, access_log=None, print=None)


if __name__ == "__main__":
    main()
