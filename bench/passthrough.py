"""Bench case (c): the bare minimum of a Python proxy, to measure the gateway against.

Starlette + one pooled httpx.AsyncClient: forward the body, swap the Authorization header, return
status and body. No auth check, quota, budget, cache, metrics or logging. Run by bench/run.py:
`python3 bench/passthrough.py PORT` with UPSTREAM_URL and UPSTREAM_KEY in the environment.
"""

import contextlib
import os
import sys

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.upstream import ShardedTransport

UPSTREAM = os.environ.get("UPSTREAM_URL", "http://127.0.0.1:8099/api/v1").rstrip("/") + "/"
AUTH = (b"authorization", b"Bearer " + os.environ.get("UPSTREAM_KEY", "aio_mock_key").encode())
DROP = {b"host", b"authorization", b"content-length", b"connection", b"keep-alive"}
# case (c'): the gateway's transport, several httpcore pools (see gateway/upstream.py)
SHARDED = ShardedTransport(max_connections=200) if os.environ.get("PASSTHROUGH_SHARDED") else None
client = httpx.AsyncClient(base_url=UPSTREAM, timeout=120, trust_env=False, transport=SHARDED,
                           limits=httpx.Limits(max_connections=200, max_keepalive_connections=200))


async def forward(request: Request) -> Response:
    headers = [(k, v) for k, v in request.headers.raw if k not in DROP] + [AUTH]
    answer = await client.request(request.method, request.path_params["path"],
                                  content=await request.body(), headers=headers)
    return Response(answer.content, answer.status_code,
                    media_type=answer.headers.get("content-type"))


@contextlib.asynccontextmanager
async def lifespan(app: Starlette):  # type: ignore[no-untyped-def]
    yield
    await client.aclose()


app = Starlette(routes=[Route("/api/v1/{path:path}", forward, methods=["GET", "POST"])],
                lifespan=lifespan)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop", http="httptools",
                workers=1, log_level="warning", access_log=False, server_header=False)
