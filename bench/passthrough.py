"""Bench pass-throughs: the bare minimum of a Python proxy, to measure the gateway against.

Starlette forwards the body to the upstream with the Authorization header swapped, and returns
status and body: no auth check, quota, budget, cache, metrics or logging. The upstream client is
chosen by PASSTHROUGH_ENGINE:

- `httpx`: one pooled `httpx.AsyncClient` (httpcore, h11);
- `httpx-aiohttp`: httpx over the `httpx-aiohttp` package's transport;
- `upstream`: the gateway's `Upstream.send` itself (its HTTP/1.1 pool over httptools, with the
  gateway's header hygiene);
- `aiohttp`: one `aiohttp.ClientSession`, used directly;
- `constant`: no upstream at all, the stub's answer as a constant: the floor of Starlette itself.

Run by bench/run.py: `python3 bench/passthrough.py PORT` with UPSTREAM_URL, UPSTREAM_KEY,
PASSTHROUGH_ENGINE and STUB_ANSWER (for `constant`) in the environment.
"""

import contextlib
import os
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import certifi
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import config as cfg
from gateway.upstream import Upstream

UPSTREAM = os.environ.get("UPSTREAM_URL", "http://127.0.0.1:8099/api/v1").rstrip("/") + "/"
KEY = os.environ.get("UPSTREAM_KEY", "aio_mock_key")
AUTH = (b"authorization", b"Bearer " + KEY.encode())
DROP = {b"host", b"authorization", b"content-length", b"connection", b"keep-alive"}
ENGINE = os.environ.get("PASSTHROUGH_ENGINE", "httpx")
POOL = 200
TLS = ssl.create_default_context(cafile=certifi.where())

Forward = Callable[[Request], Awaitable[Response]]
Engine = tuple[Forward, Callable[[], Awaitable[None]]]  # the handler, and what closes it


def httpx_forward(transport: httpx.AsyncBaseTransport | None) -> Engine:
    client = httpx.AsyncClient(base_url=UPSTREAM, timeout=120, trust_env=False,
                               transport=transport, limits=httpx.Limits(
                                   max_connections=POOL, max_keepalive_connections=POOL))

    async def forward(request: Request) -> Response:
        headers = [(k, v) for k, v in request.headers.raw if k not in DROP] + [AUTH]
        answer = await client.request(request.method, request.path_params["path"],
                                      content=await request.body(), headers=headers)
        return Response(answer.content, answer.status_code,
                        media_type=answer.headers.get("content-type"))

    return forward, client.aclose


def upstream_forward() -> Engine:
    upstream = Upstream(cfg.Upstream(base_url=UPSTREAM, api_key=KEY, max_connections=POOL,
                                     retries=0))

    async def forward(request: Request) -> Response:
        headers = [(k, v) for k, v in request.headers.raw if k not in DROP]
        answer = await upstream.send(request.method, request.path_params["path"], b"",
                                     headers, await request.body())
        media_type = answer.header(b"content-type")
        return Response(answer.content, answer.status_code,
                        media_type=media_type.decode() if media_type else None)

    return forward, upstream.aclose


def aiohttp_forward() -> Engine:
    sessions: list[aiohttp.ClientSession] = []

    async def forward(request: Request) -> Response:
        if not sessions:  # made in the server's event loop
            sessions.append(aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=POOL, ssl=TLS),
                timeout=aiohttp.ClientTimeout(sock_read=120)))
        headers = [(k.decode("latin-1"), v.decode("latin-1"))
                   for k, v in request.headers.raw if k not in DROP]
        headers.append(("authorization", AUTH[1].decode()))
        async with sessions[0].request(request.method, UPSTREAM + request.path_params["path"],
                                       data=await request.body(), headers=headers) as answer:
            return Response(await answer.read(), answer.status,
                            media_type=answer.headers.get("content-type"))

    async def close() -> None:
        for session in sessions:
            await session.close()

    return forward, close


def constant_forward() -> Engine:
    body = os.environ.get("STUB_ANSWER", "{}").encode()

    async def forward(request: Request) -> Response:
        await request.body()
        return Response(body, 200, media_type="application/json")

    async def close() -> None:
        pass

    return forward, close


ENGINES: dict[str, Callable[[], Engine]] = {
    "httpx": lambda: httpx_forward(None),
    "httpx-aiohttp": lambda: httpx_forward(_httpx_aiohttp()),
    "upstream": upstream_forward,
    "aiohttp": aiohttp_forward,
    "constant": constant_forward,
}


def _httpx_aiohttp() -> httpx.AsyncBaseTransport:
    from httpx_aiohttp import AiohttpTransport as Transport  # only this case needs the package

    return Transport(verify=TLS, trust_env=False, limits=httpx.Limits(max_connections=POOL))  # type: ignore[no-any-return]


forward, close = ENGINES[ENGINE]()


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    yield
    await close()


app = Starlette(routes=[Route("/api/v1/{path:path}", forward, methods=["GET", "POST"])],
                lifespan=lifespan)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop", http="httptools",
                workers=1, log_level="warning", access_log=False, server_header=False)
