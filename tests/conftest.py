"""Real things for the tests: private redis-server instances, uvicorn servers on free ports, the
project's mock upstream. Nothing is faked: the gateway talks to them over loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn
import yaml

from gateway import config as cfg
from gateway.app import Gateway, create_app
from gateway.auth import hash_key
from gateway.mock_upstream import Settings, create_mock_app
from gateway.server import HttpProtocol

from .postgres import PostgresServer

UPSTREAM_KEY = "aio_test_upstream_SECRET_0123456789"
KEYS = {  # team -> internal key
    "research": "aiogw_research_key_abcdefghijklmnop",
    "marketing": "aiogw_marketing_key_qrstuvwxyz012345",
}
ADMIN_KEY = "aiogw_admin_key_ZYXWVUTSRQPONMLKJIH"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


T = TypeVar("T")


def eventually(condition: Callable[[], T], what: str, timeout: float = 60.0) -> T:
    """The first truthy value of `condition`, polled until `timeout`: for background work that
    a test cannot wait on directly (another process, a server's loop, a metric)."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return result


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on port {port}")


def raw_http(port: int, request: bytes, timeout: float = 5.0) -> tuple[int, bytes]:
    """Send bytes exactly as given (no client-side URL or header clean-up); (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep and b"content-length:" in head.lower():
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                if len(body) >= length:
                    break
    status = int(data.split(b" ", 2)[1]) if data else 0
    return status, data.partition(b"\r\n\r\n")[2]


# -- Redis -----------------------------------------------------------------------------------


class RedisServer:
    """A private redis-server on a free port; `stop()` and `start()` simulate an outage."""

    def __init__(self, *extra: str, cluster: bool = False) -> None:
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.bus_port = free_port() if cluster else None  # a cluster node's bus, not port+10000
        self.dir = tempfile.mkdtemp(prefix="aio-redis-")
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None
        self.started = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server. A port found free can be taken by another test process before the
        server binds it (the server then exits, and whatever took the port answers instead):
        the first start moves to fresh ports until the server answering is this one; a
        restart keeps its port, as the outage tests expect."""
        for _ in range(5):
            bus = [] if self.bus_port is None else [
                "--cluster-enabled", "yes", "--cluster-node-timeout", "5000",
                "--cluster-config-file", "nodes.conf", "--cluster-port", str(self.bus_port)]
            self.process = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", self.dir, "--enable-debug-command", "local",
                 *bus, *self.extra],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            if self._is_ours():
                self.started = True
                return
            self.stop()
            if self.started:
                break
            self.port = free_port()
            self.bus_port = None if self.bus_port is None else free_port()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def _is_ours(self) -> bool:
        """Whether the server on `port` is the one just started (it reports this one's dir)."""
        process = self.process
        assert process is not None

        def up_or_gone() -> bool:
            if process.poll() is not None:
                return True
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                return False
            return True

        eventually(up_or_gone, f"redis-server on port {self.port}", timeout=10)
        if process.poll() is not None:
            return False  # it could not bind: the port was taken
        try:
            said = self.cli("CONFIG", "GET", "dir")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            return False
        return os.path.realpath(self.dir) in said

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def pause(self) -> None:
        """SIGSTOP: the server keeps its data but answers nothing (a hung Redis)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def cli(self, *args: str) -> str:
        out = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True,
                             text=True, timeout=10, check=True)
        return out.stdout.strip()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisClusterServers:
    """Three masters started with `--cluster-enabled yes` and joined by `redis-cli --cluster`,
    each with `replicas` replicas (a failover needs one) noticing a dead master after
    `node_timeout_ms`."""

    def __init__(self, *, replicas: int = 0, node_timeout_ms: int = 5000) -> None:
        self.nodes = [RedisServer("--cluster-node-timeout", str(node_timeout_ms), cluster=True)
                      for _ in range(3 * (1 + replicas))]
        for node in self.nodes:
            node.start()
        subprocess.run(
            ["redis-cli", "--cluster", "create",
             *(f"127.0.0.1:{node.port}" for node in self.nodes),
             "--cluster-replicas", str(replicas), "--cluster-yes"],
            capture_output=True, check=True, timeout=60)
        eventually(self.serving, "the test cluster to come up", timeout=30)

    def serving(self) -> bool:
        """Every slot served and every replica in sync with its master, by every live node."""
        live = [n for n in self.nodes if n.process is not None]
        return all("cluster_state:ok" in n.cli("CLUSTER", "INFO") for n in live) and all(
            "master_link_status:up" in info or "role:master" in info
            for info in (n.cli("INFO", "replication") for n in live))

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def flush(self) -> None:
        for node in self.nodes:
            if "role:master" in node.cli("INFO", "replication"):
                node.cli("FLUSHALL")

    def close(self) -> None:
        for node in self.nodes:
            node.close()


class SentinelServers:
    """A master and one Sentinel watching it as `aio`."""

    def __init__(self) -> None:
        self.master = RedisServer()
        self.master.start()
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="aio-sentinel-")
        conf = Path(self.dir) / "sentinel.conf"
        conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
                        f"sentinel monitor aio 127.0.0.1 {self.master.port} 1\n"
                        "sentinel down-after-milliseconds aio 1000\n")
        self.process = subprocess.Popen(["redis-server", str(conf), "--sentinel"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/aio/0"

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        self.master.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    cluster = RedisClusterServers()
    yield cluster
    cluster.close()


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[SentinelServers]:
    sentinel = SentinelServers()
    yield sentinel
    sentinel.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def aof_redis() -> Iterator[RedisServer]:
    """A Redis of the test's own that keeps everything on disk: it can be killed and restarted
    and come back with its data (an outage, not a loss)."""
    server = RedisServer("--appendonly", "yes", "--appendfsync", "always")
    server.start()
    yield server
    server.close()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A Redis of the test's own, for tests that stop it."""
    server = RedisServer()
    server.start()
    yield server
    server.close()


# -- PostgreSQL (the ledger of record) ----------------------------------------------------------


def _postgres() -> PostgresServer:
    try:
        return PostgresServer()
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = _postgres()
    server.start()
    yield server
    server.close()


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of the test's own, for tests that kill it."""
    server = _postgres()
    server.start()
    yield server
    server.close()


@pytest.fixture
def ledger_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty database (not migrated) on the shared server."""
    return postgres_server.new_database()


# -- servers in threads ------------------------------------------------------------------------


class ServerThread:
    """An ASGI app served by a real uvicorn server on a free port, in a background thread."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.app = app
        self.port = port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_config=None, access_log=False,
            lifespan="on", timeout_graceful_shutdown=5, loop="asyncio", http=HttpProtocol,
            ws="none",  # as gateway.server.serve
        ))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


# -- the mock upstream -------------------------------------------------------------------------


class Mock:
    """The shared mock upstream, with its control API."""

    def __init__(self, server: ServerThread) -> None:
        self.server = server
        self.client = httpx.Client(base_url=server.url, timeout=10)

    @property
    def api_url(self) -> str:
        return f"{self.server.url}/api/v1"

    def reset(self, **settings: Any) -> None:
        self.client.post("/_mock/reset").raise_for_status()
        defaults = {"api_key": UPSTREAM_KEY, "other_keys": [], "task_delay_s": 0.3,
                    "rate_limit": None, "rate_window_s": 60.0, "record": True}
        self.client.post("/_mock/config", json={**defaults, **settings}).raise_for_status()

    def configure(self, **settings: Any) -> None:
        self.client.post("/_mock/config", json=settings).raise_for_status()

    def fault(self, **fault: Any) -> None:
        self.client.post("/_mock/faults", json=fault).raise_for_status()

    def stats(self) -> dict[str, Any]:
        return self.client.get("/_mock/stats").json()  # type: ignore[no-any-return]

    def count(self, key: str) -> int:
        """Requests the mock saw, e.g. `count("POST chat/completions")`."""
        return int(self.stats()["counts"].get(key, 0))

    def upstream_calls(self) -> int:
        return sum(v for k, v in self.stats()["counts"].items() if " " in k)

    def requests(self) -> list[dict[str, Any]]:
        return self.stats()["requests"]  # type: ignore[no-any-return]

    def release(self) -> None:
        self.client.post("/_mock/release").raise_for_status()

    def wait_for(self, key: str, n: int = 1, timeout: float = 10) -> None:
        """Until the mock has received `n` requests of `key` (they may still be in its hands)."""
        deadline = time.monotonic() + timeout
        while self.count(key) < n:
            assert time.monotonic() < deadline, f"the upstream never saw {key}"
            time.sleep(0.01)


@pytest.fixture(scope="session")
def mock_server() -> Iterator[ServerThread]:
    server = ServerThread(create_mock_app(Settings(api_key=UPSTREAM_KEY, rate_limit=None)))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mock(mock_server: ServerThread) -> Iterator[Mock]:
    m = Mock(mock_server)
    m.reset()
    yield m
    m.client.close()


# -- gateways ----------------------------------------------------------------------------------


def team_config(name: str, **limits: Any) -> dict[str, Any]:
    return {"keys": [{"id": f"{name}-key", "sha256": hash_key(KEYS[name])}], **limits}


def base_config(upstream_url: str, store_url: str = "memory://", **sections: Any) -> dict[str, Any]:
    """A complete config mapping for tests; `sections` replace or extend the defaults."""
    raw: dict[str, Any] = {
        "upstream": {"base_url": upstream_url, "api_key": UPSTREAM_KEY, "timeout_s": 5,
                     "connect_timeout_s": 1, "requests_per_minute": None, "retries": 1},
        # the gateway runs in a thread of the test process, which the test's own client threads
        # and a loaded machine hold up: at 0.5 s, 14 of 20 concurrent requests once got 503 in
        # CI from the session's Redis, which no test stops (a test about the store's timeout
        # sets its own)
        "store": {"url": store_url, "on_error": "closed", "timeout_s": 2},
        "pricing": {"default": 10, "models": {"flux-2": 4, "kling-3": 100, "gemini": 2}},
        "teams": {"research": team_config("research"), "marketing": team_config("marketing")},
        "admin": {"keys": [{"id": "ops", "sha256": hash_key(ADMIN_KEY)}]},
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(name), dict) and name != "teams":
            raw[name] = {**raw[name], **value}
        else:
            raw[name] = value
    return raw


@dataclass
class RunningGateway:
    server: ServerThread
    app: Gateway
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.server.url, timeout=30)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def runtime(self) -> Any:
        return self.app.runtime

    def call(self, method: str, path: str, *, team: str = "research", **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {KEYS[team]}", **kw.pop("headers", {})}
        return self.client.request(method, f"/api/v1/{path}", headers=headers, **kw)

    def chat(self, content: str = "hello", *, team: str = "research", model: str = "gemini",
             **kw: Any) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": content}],
                **kw.pop("extra", {})}
        return self.call("POST", "chat/completions", team=team, json=body, **kw)

    def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}", **kw.pop("headers", {})}
        return self.client.request(method, f"/admin/v1/{path}", headers=headers, **kw)

    def metrics(self) -> str:
        token = self.runtime.policy.config.metrics.bearer_token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.client.get("/metrics", headers=headers).text

    def run(self, work: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """`work` run in the gateway's own event loop (its store belongs to that loop)."""
        return asyncio.run_coroutine_threadsafe(work, self.app.runtime.loop).result(timeout)

    def drain(self, timeout: float = 20) -> None:
        """Wait until the bookkeeping of every answered request has reached the store."""
        landed = self.run(self.app.runtime.bookkeeper.drain(timeout), timeout + 5)
        assert landed, "the bookkeeping did not reach the store in time"

    def team(self, name: str = "research") -> dict[str, Any]:
        """The team's row of GET /admin/v1/teams: quota, budget, spent, reserved."""
        teams = self.admin("GET", "teams").json()["teams"]
        return next(t for t in teams if t["team"] == name)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.client.close()
        self.server.stop()


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest) -> str:
    """Every store-backed behaviour runs on both backends."""
    if request.param == "memory":
        return "memory://"
    server: RedisServer = request.getfixturevalue("redis_server")
    server.cli("FLUSHALL")
    return server.url


GatewayFactory = Callable[..., RunningGateway]


@pytest.fixture
def make_gateway(mock: Mock) -> Iterator[GatewayFactory]:
    started: list[RunningGateway] = []

    def make(store_url: str = "memory://", *, clock: Callable[[], float] = time.time,
             upstream_url: str | None = None, reconcile_interval_s: float = 3600,
             task_check_s: float = 600, alive_s: float = 30, **sections: Any
             ) -> RunningGateway:
        raw = base_config(upstream_url or mock.api_url, store_url, **sections)
        app = create_app(cfg.from_dict(raw), clock=clock, reconcile_interval_s=reconcile_interval_s,
                         task_check_s=task_check_s, alive_s=alive_s)
        gateway = RunningGateway(ServerThread(app).start(), app)
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        gateway.close()


@pytest.fixture
def gateway(make_gateway: GatewayFactory, store_url: str) -> RunningGateway:
    return make_gateway(store_url)


# -- gateway processes -------------------------------------------------------------------------


class GatewayProcess:
    """`aio-gateway serve` as a real process, for signals, workers and shared-Redis tests."""

    def __init__(self, config: dict[str, Any], tmp: Path, *, workers: int = 1,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.config_path = tmp / f"gateway-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp / f"gateway-{self.port}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(self.config_path),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers)],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its worker processes die with it (see kill)
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not start:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, then wait for the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout)
        finally:
            self._kill_group()
            self._log.close()

    def kill(self) -> None:
        """SIGKILL to the gateway and every worker process it started: a killed supervisor
        would otherwise leave its workers running, serving and heartbeating."""
        self._kill_group()
        self.process.wait()
        self._log.close()

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def start(config: dict[str, Any], **kw: Any) -> GatewayProcess:
        process = GatewayProcess(config, tmp_path, **kw)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
