"""`create_app`: builds the gateway from a config, with nothing at import time."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import admin, callbacks, logs, openapi
from . import config as cfg
from .asgi import Receive, RequestIdMiddleware, Scope, Send, with_body_timeout
from .auth import EXPIRY_WINDOWS, bearer_token
from .budget import period_id
from .errors import AuthenticationError, GatewayError, MethodNotAllowed, NotFound, error_body
from .ledger import LedgerDB, Shipper
from .ledger.postgres import url_secrets
from .metrics import CONTENT_TYPE, OPENMETRICS_TYPE, Metrics
from .policy import Policy
from .proxy import PREFIX, Proxy
from .runtime import Runtime
from .store import Store, StoreError, open_store
from .tasks import Reconciler
from .tracing import Tracing
from .upstream import Upstream
from .webhooks import Webhooks

log = logging.getLogger("gateway")
CONFIG_ENV = "AIO_GATEWAY_CONFIG"


class Gateway:
    """The ASGI app: /api/v1/ goes straight to the proxy, the rest to a small Starlette site."""

    def __init__(self, runtime: Runtime, site: Starlette, *, body_timeout_s: float) -> None:
        self.runtime = runtime
        self.site = RequestIdMiddleware(site)
        self.proxy = Proxy(runtime)
        self.body_timeout_s = body_timeout_s  # `listen`: fixed until a restart

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PREFIX):
            receive = with_body_timeout(receive, self.body_timeout_s)
            tracing = self.runtime.tracing
            if tracing is None:
                await self.proxy(scope, receive, send)
                return
            with tracing.request(scope):
                await self.proxy(scope, receive, send)
        else:
            await self.site(scope, receive, send)


def create_app(
    config: cfg.Config,
    *,
    config_path: str | None = None,
    store: Store | None = None,
    upstream: Upstream | None = None,
    clock: Callable[[], float] = time.time,
    reconcile_interval_s: float = 30.0,
    task_check_s: float = 600.0,
    alive_s: float = 30.0,
    lookup: callbacks.Lookup | None = None,
    owns_process: bool = False,
) -> Gateway:
    """The gateway app. `owns_process`: it is the process's one app (the `serve` command and
    its workers, not an app in a test): it then also sets the garbage collector for serving
    once it has started (`settle_heap`)."""
    store = store or open_store(config.store.url, prefix=config.store.key_prefix,
                                timeout_s=config.store.timeout_s, clock=clock,
                                memory_max_bytes=config.store.memory_max_bytes)
    instruments = Metrics()
    runtime = Runtime(
        Policy(config),
        store=store,
        upstream=upstream or Upstream(config.upstream),
        metrics=instruments,
        clock=clock,
        task_check_s=task_check_s,
        alive_s=alive_s,
        config_path=config_path,
        tracing=_tracing(config, instruments),
    )

    ledger_db, shipper = _ledger(config, runtime)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        runtime.loop = asyncio.get_running_loop()
        try:
            await runtime.store.connect()
        except StoreError:
            log.warning("store unreachable at start-up; requests will retry it")
        background = [
            asyncio.create_task(Reconciler(runtime, interval_s=reconcile_interval_s).run()),
            asyncio.create_task(runtime.keep_alive()),
            asyncio.create_task(webhooks.run()),
        ]
        if shipper is not None:
            shipper.start()
        if config_path is not None and threading.current_thread() is threading.main_thread():
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGHUP, lambda: _reload_on_signal(runtime))
        if owns_process:
            settle_heap()
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await webhooks.close()
            grace_ends = time.monotonic() + runtime.policy.config.listen.shutdown_grace_s
            await runtime.drain(runtime.policy.config.listen.shutdown_grace_s)
            if shipper is not None and ledger_db is not None:
                await shipper.stop(max(grace_ends - time.monotonic(), 1.0))
                await ledger_db.close()
            if runtime.tracing is not None:  # the last spans, within what is left of the grace
                await runtime.tracing.close(max(grace_ends - time.monotonic(), 1.0))
            await runtime.upstream.aclose()
            await runtime.store.close()
            runtime.metrics.close()

    site = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            Route("/openapi.json", openapi_json),
            *admin.routes(),
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, GatewayError: gateway_error},
    )
    site.state.runtime = runtime
    site.state.ledger = ledger_db
    gateway = Gateway(runtime, site, body_timeout_s=config.listen.body_timeout_s)
    webhooks = runtime.webhooks = Webhooks(runtime, gateway.proxy.poll, lookup=lookup)
    return gateway


def _ledger(config: cfg.Config, runtime: Runtime) -> tuple[LedgerDB | None, Shipper | None]:
    """With `ledger.url`: the ledger of record, and the shipper that copies the store's ledger."""
    if config.ledger.url is None:
        return None, None
    db = LedgerDB(config.ledger.url, timeout_s=config.ledger.timeout_s)
    shipper = Shipper(runtime.store, db, lambda: runtime.policy.teams, runtime.metrics,
                      batch_rows=config.ledger.batch_rows, interval_s=config.ledger.interval_s,
                      clock=runtime.clock)
    return db, shipper


def _tracing(config: cfg.Config, metrics: Metrics) -> Tracing | None:
    """With `tracing`: this process's tracer (nothing of OpenTelemetry's is built without)."""
    if config.tracing is None:
        return None
    return Tracing(config.tracing, instance=os.urandom(6).hex(), metrics=metrics,
                   upstream_url=config.upstream.base_url)


def create_app_from_env() -> Gateway:
    """Factory for `uvicorn --factory` and worker processes: the config path is in the env."""
    path = os.environ[CONFIG_ENV]
    config = cfg.load(path)
    logs.configure(config.logging.level,
                   secrets=[*(a.api_key for a in cfg.accounts_of(config.upstream)),
                            config.metrics.bearer_token or "", *url_secrets(config.ledger.url),
                            *_webhook_secrets(config)])
    return create_app(config, config_path=path, owns_process=True)


YOUNG_COLLECTION_EVERY = 10_000  # allocations (Python's default: 700)


def settle_heap() -> None:
    """The garbage collector, set for serving once start-up is done. What start-up made (modules,
    config, connections: about 80,000 objects) lives as long as the process: frozen, a full
    collection no longer walks it (it took 63 ms). And a young collection after every 700
    allocations, which under load found nothing to free (a request frees its own objects) yet
    cost a tenth of a miss's CPU reading cold memory, runs after every 10,000: a request's
    objects are gone by then, and cycles wait a little longer."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_EVERY, *gc.get_threshold()[1:])


def _webhook_secrets(config: cfg.Config) -> list[str]:
    return [secret for team in config.teams.values() if team.callbacks is not None
            for secret in (team.callbacks.secret, *team.callbacks.secrets.values())]


def _reload_on_signal(runtime: Runtime) -> None:
    async def reload() -> None:
        try:
            await runtime.reload_everywhere("SIGHUP", wait_s=0)
        except cfg.ConfigError as exc:
            log.error("config reload refused: %s", exc)

    asyncio.get_running_loop().create_task(reload())


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    try:
        await asyncio.wait_for(runtime.store.ping(), runtime.policy.config.store.timeout_s)
    except (TimeoutError, StoreError):
        if runtime.policy.config.store.on_error == "open":
            return JSONResponse({"status": "degraded", "store": "unreachable"})
        return Response(error_body(503, "The gateway's store is unreachable.", "store_unavailable"),
                        status_code=503, media_type="application/json",
                        headers={"Retry-After": "1"})
    return JSONResponse({"status": "ready", "store": "ok"})


async def metrics(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    _authorize_scrape(request, runtime.policy.config.metrics.bearer_token)
    await refresh_budget_gauges(runtime)
    try:
        await runtime.health.refresh()
    except StoreError:
        runtime.metrics.store_errors.labels("accounts").inc()
    for team in runtime.policy.teams:  # 0 rather than no series for a team that never waited
        runtime.metrics.upstream_waiting.labels(team)
    for within, seconds in EXPIRY_WINDOWS.items():
        keys = runtime.policy.auth.expiring(runtime.clock(), seconds)
        runtime.metrics.keys_expiring.labels(within).set(len(keys))
    if runtime.tracing is not None and "application/openmetrics-text" in request.headers.get(
            "accept", ""):  # exemplars (trace ids) exist only in OpenMetrics
        return Response(runtime.metrics.render_openmetrics(), media_type=OPENMETRICS_TYPE)
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE)


def _authorize_scrape(request: Request, token: str | None) -> None:
    """With `metrics.bearer_token` set, /metrics (every team's traffic and budget) answers only
    to that token; compared in constant time."""
    if token is None:
        return
    sent = bearer_token(request.headers.get("authorization", "").encode("latin-1"))
    if sent is None or not hmac.compare_digest(sent, token.encode()):
        raise AuthenticationError("Missing or invalid metrics token.",
                                  headers={"WWW-Authenticate": 'Bearer realm="metrics"'})


async def refresh_budget_gauges(runtime: Runtime) -> None:
    """Budgets are shared state: read them from the store so every replica reports the same."""
    now = runtime.clock()
    periods = [(name, period_id(t.budget.period, now))
               for name, t in runtime.policy.teams.items() if t.budget is not None]
    if not periods:
        return
    try:
        usage = await runtime.store.budgets(periods)
    except StoreError:
        runtime.metrics.store_errors.labels("budgets").inc()
        return
    for (name, period), used in zip(periods, usage, strict=True):
        runtime.budget_seen(name, period, used.spent + used.reserved)
        budget = runtime.policy.config.teams[name].budget
        runtime.metrics.budget_limit.labels(name).set(budget.credits if budget else 0)


async def openapi_json(request: Request) -> Response:
    return JSONResponse(openapi.document())


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error: GatewayError
    if exc.status_code == 405:
        error = MethodNotAllowed(f"Method {request.method} is not allowed here.")
    elif exc.status_code == 404:
        error = NotFound("Unknown path. The API is served under /api/v1/.")
    else:
        error = GatewayError(exc.detail, status=exc.status_code)
    return await gateway_error(request, error)


async def gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return Response(exc.body(), status_code=exc.status, media_type="application/json",
                    headers=exc.headers)
