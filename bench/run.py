#!/usr/bin/env python3
"""The gateway's overhead, measured against an nginx stub, nginx as a proxy, bare proxies and
LiteLLM.

    python3 bench/run.py [--duration 10] [--connections 32] [--runs 3] [--out bench/RESULTS.md]
                         [--cases a,a2,b,c,c_aio,k,d,e,f,g] [--threads 1] [--warmup 2]
                         [--single-duration 5] [--baseline c_aio] [--cache-dir DIR] [--profile]

Starts everything itself on free ports (nginx, Redis, the mock upstream, the pass-throughs, the
gateway, LiteLLM), loads each case with wrk (bench/post.lua), each case `--runs` times,
interleaved, and writes the medians as a Markdown table: requests/s, the server's CPU time per
request (from /proc), latency under load and at one connection. Needs wrk and nginx (apt-get
install -y wrk nginx), redis-server for the Redis cases and py-spy (pip install py-spy) for
--profile. The LiteLLM case (`--cases ...,litellm`, not run by default) installs LiteLLM's proxy
in a venv under --cache-dir on first use; when that fails the row is left out with a note.

Engine comparison (the upstream HTTP clients, see the README's Benchmarks section):
`--cases c,c_hx,c_up,c_aio,k --out bench/ENGINES.md`.
The cost of tracing: `--cases e,e_trace,e_trace10 --baseline e --out bench/TRACING.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
UPSTREAM_KEY = "aio_bench_upstream_key"
PATH = "/api/v1/chat/completions"
# the body bench/post.lua sends (keep the two in step)
TEMPLATE = ('{"model": "gemini", "messages": [{"role": "user", "content": '
            '"Say hello (bench %s %s)"}]}')
# what the nginx stub answers: a chat completion with `credits_consumed`, so settlement runs
STUB_ANSWER = (
    '{"id": "chatcmpl_bench", "object": "chat.completion", "model": "gemini", "choices": '
    '[{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": '
    '"Hello from the benchmark stub."}}], "usage": {"prompt_tokens": 4, "completion_tokens": 5, '
    '"total_tokens": 9}, "credits_consumed": 2}'
)


@dataclass(frozen=True)
class Case:
    id: str
    label: str
    what: str
    server: str
    mode: str = "distinct"  # wrk bodies: distinct (cache miss) or same (cache hit)
    gateway: bool = False
    expect: str | None = None  # X-Cache the gateway must answer with


LITELLM = "1.108.7"  # pinned: the version the issue measured
CASES = {c.id: c for c in [
    Case("a", "(a) nginx stub", "nginx `return 200` with a static chat completion JSON, loaded "
         "directly: the ceiling of this machine and load generator", "stub"),
    Case("a2", "(a') mock upstream --fast", "`aio-gateway mock-upstream --fast` loaded directly "
         "(Starlette, one process): why the stub is nginx", "mock"),
    Case("b", "(b) nginx proxy", "nginx (1 worker, keep-alive upstream pool) as a reverse proxy "
         "to the stub, swapping the Authorization header: the near-physical limit for a proxy",
         "nginx_proxy"),
    Case("c", "(c) Starlette + httpx pass-through", "bench/passthrough.py: Starlette + one "
         "pooled httpx.AsyncClient (uvicorn, uvloop, httptools, 1 worker) to the stub",
         "passthrough_httpx"),
    Case("c_hx", "(c-hx) pass-through, httpx over httpx-aiohttp", "as (c) with httpx over the "
         "`httpx-aiohttp` package's transport", "passthrough_httpx-aiohttp"),
    Case("c_up", "(c-up) pass-through, the gateway's Upstream", "as (c) with the gateway's "
         "`Upstream.send` (its HTTP/1.1 pool over httptools, with its header hygiene)",
         "passthrough_upstream"),
    Case("c_aio", "(c-aio) Starlette + aiohttp client pass-through", "as (c) with one "
         "aiohttp.ClientSession used directly: the floor for a Python proxy",
         "passthrough_aiohttp"),
    Case("k", "(k) Starlette answering a constant (no upstream)", "bench/passthrough.py "
         "answering the stub's JSON itself: the floor of Starlette on uvicorn, what a cache hit "
         "cannot beat", "passthrough_constant"),
    Case("d", "(d) gateway miss, memory", "the gateway, every body distinct (X-Cache: MISS): "
         "auth, quota, budget reservation and settlement, cache lookup and write, metrics; "
         "`memory://` store, 1 worker", "gw_memory",
         gateway=True, expect="MISS"),
    Case("e", "(e) gateway miss, Redis", "as (d) on a private Redis", "gw_redis",
         gateway=True, expect="MISS"),
    Case("f", "(f) gateway hit, Redis", "the same body every time, answered from the cache "
         "(X-Cache: HIT), Redis, 1 worker", "gw_redis", mode="same", gateway=True,
         expect="HIT"),
    Case("g", "(g) gateway miss, Redis, 2 workers", "as (e) with `--workers 2`", "gw_redis_2w",
         gateway=True, expect="MISS"),
    # not run unless named in --cases
    Case("e_log", "(e+log) gateway miss, Redis, access log", "as (e) with `logging.access_log: "
         "true` (one JSON line per request, to a file)", "gw_redis_log", gateway=True,
         expect="MISS"),
    Case("e_nocache", "(e-cache) gateway, Redis, cache off", "as (e) with `cache.endpoints: []`"
         " (X-Cache: BYPASS: no cache lookup, flight lock or cache write)", "gw_redis_nocache",
         gateway=True, expect="BYPASS"),
    Case("e_trace", "(e+trace) gateway miss, Redis, traced", "as (e) with `tracing` on, "
         "`sample_ratio: 1.0` (every request: 5 spans, the bookkeeping batches' spans, OTLP/HTTP "
         "export from a background thread) to a local receiver (nginx) that accepts and drops",
         "gw_redis_trace", gateway=True, expect="MISS"),
    Case("e_trace10", "(e+trace 0.1) gateway miss, Redis, traced 10%", "as (e+trace) with "
         "`sample_ratio: 0.1`", "gw_redis_trace10", gateway=True, expect="MISS"),
    Case("f_mem", "(f mem) gateway hit, memory", "as (f) on the `memory://` store", "gw_memory",
         mode="same", gateway=True, expect="HIT"),
    Case("litellm", f"(l) LiteLLM proxy {LITELLM}", f"LiteLLM's proxy (`litellm[proxy]=="
         f"{LITELLM}`, no database, 1 worker) routing model `gemini` to the stub as an "
         "OpenAI-compatible upstream; bench/run.py installs it in its own venv under the cache "
         "directory (`--cache-dir`)", "litellm"),
]}
DEFAULT_CASES = "a,a2,b,c,c_aio,k,d,e,f,g"
# cases that read the stub's answer back re-encoded (the check looks for this in the body)
ANSWER_MARK = {"litellm": "Hello from the benchmark stub."}


class BenchError(Exception):
    pass


# -- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for d in ("/usr/sbin", "/usr/local/sbin", "/sbin")
         if os.access(p := os.path.join(d, name), os.X_OK)), None)


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    key: str = UPSTREAM_KEY  # the Bearer key clients send
    path: str = PATH  # where wrk sends its chat completions
    also: tuple[subprocess.Popen[bytes], ...] = ()  # processes whose CPU counts too (Redis)

    def cpu_s(self) -> float:
        """CPU time (user + system) used so far by the server's processes and by `also`."""
        return sum(session_cpu_s(p.pid) for p in (self.proc, *self.also))

    def also_cpu_s(self) -> float:
        """CPU time used so far by `also` alone (Redis: its share of `cpu_s`)."""
        return sum(session_cpu_s(p.pid) for p in self.also)


@dataclass
class Bench:
    args: argparse.Namespace
    tmp: Path
    tools: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    servers: dict[str, Server] = field(default_factory=dict)
    team_key: str = field(default_factory=lambda: "aiogw_" + secrets.token_urlsafe(32))

    def spawn(self, name: str, argv: list[str], *, env: dict[str, str] | None = None,
              cwd: Path = ROOT) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.tmp / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=_die_with_parent)
        self.procs.append(proc)
        return proc, log

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)
        self.procs.clear()

    def wait_ready(self, name: str, proc: subprocess.Popen[bytes], log: Path, port: int,
                   health: str | None = None, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BenchError(f"{name} exited with {proc.returncode}:\n{tail(log)}")
            try:
                if health is None:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        return
                elif httpx.get(f"http://127.0.0.1:{port}{health}", timeout=2).status_code == 200:
                    return
            except (OSError, httpx.HTTPError):
                pass
            time.sleep(0.05)
        raise BenchError(f"{name} did not become ready on port {port}:\n{tail(log)}")

    # what each case needs, started on first use

    def server(self, name: str) -> Server:
        if name not in self.servers:
            self.servers[name] = getattr(self, f"_start_{name.split('_', 1)[0]}")(name)
        return self.servers[name]

    def _start_stub(self, name: str) -> Server:
        port = free_port()
        site = f"""
        server {{
            listen 127.0.0.1:{port};
            location / {{
                default_type application/json;
                return 200 '{STUB_ANSWER}';
            }}
        }}"""
        return self._nginx(name, port, site)

    def _start_nginx(self, name: str) -> Server:
        stub = self.server("stub")
        port = free_port()
        site = f"""
        upstream stub {{
            server 127.0.0.1:{stub.port};
            keepalive 64;
            keepalive_requests 1000000;
        }}
        server {{
            listen 127.0.0.1:{port};
            location / {{
                proxy_pass http://stub;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
                proxy_set_header Authorization "Bearer {UPSTREAM_KEY}";
            }}
        }}"""
        return self._nginx(name, port, site)

    def _nginx(self, name: str, port: int, site: str) -> Server:
        prefix = self.tmp / name
        (prefix / "temp").mkdir(parents=True)
        prefix.chmod(0o755)
        temp = "\n".join(f"    {kind}_temp_path {prefix}/temp/{kind};"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (prefix / "nginx.conf").write_text(f"""
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
{temp}
{site}
}}
""")
        argv = [self.tools["nginx"], "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                "-e", str(prefix / "error.log")]
        proc, log = self.spawn(name, argv)
        self.wait_ready(name, proc, prefix / "error.log", port)
        return Server(name, port, proc, log)

    def _start_mock(self, name: str) -> Server:
        port = free_port()
        proc, log = self.spawn(name, [sys.executable, "-m", "gateway", "mock-upstream", "--fast",
                                      "--port", str(port), "--key", UPSTREAM_KEY])
        self.wait_ready(name, proc, log, port)
        return Server(name, port, proc, log)

    def _start_otlp(self, name: str) -> Server:
        """A trace collector that accepts every OTLP/HTTP export and drops it."""
        port = free_port()
        site = f"""
        server {{
            listen 127.0.0.1:{port};
            client_max_body_size 64m;
            location / {{
                default_type application/x-protobuf;
                return 200 '';
            }}
        }}"""
        return self._nginx(name, port, site)

    def _start_passthrough(self, name: str) -> Server:
        stub = self.server("stub")
        port = free_port()
        env = {**os.environ, "UPSTREAM_URL": f"http://127.0.0.1:{stub.port}/api/v1",
               "UPSTREAM_KEY": UPSTREAM_KEY, "PASSTHROUGH_ENGINE": name.split("_", 1)[1],
               "STUB_ANSWER": STUB_ANSWER,  # this checkout's gateway, not an installed one
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        proc, log = self.spawn(name, [sys.executable, str(BENCH / "passthrough.py"), str(port)],
                               env=env)
        self.wait_ready(name, proc, log, port)
        return Server(name, port, proc, log)

    def _start_redis(self, name: str) -> Server:
        port = free_port()
        data = self.tmp / name
        data.mkdir()
        argv = [self.tools["redis-server"], "--port", str(port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(data)]
        proc, log = self.spawn(name, argv)
        self.wait_ready(name, proc, log, port)
        return Server(name, port, proc, log)

    def _start_gw(self, name: str) -> Server:
        stub = self.server("stub")
        options = name.split("_")[1:]  # memory | redis, then 2w, log, nocache, trace, trace10
        store = "memory://"
        also: tuple[subprocess.Popen[bytes], ...] = ()
        if "redis" in options:
            redis = self.server("redis")
            store, also = f"redis://127.0.0.1:{redis.port}/0", (redis.proc,)
        tracing = None
        if "trace" in options or "trace10" in options:
            otlp = self.server("otlp")
            tracing = (f"http://127.0.0.1:{otlp.port}", 0.1 if "trace10" in options else 1.0)
        port = free_port()
        config = self.tmp / f"{name}.yaml"
        config.write_text(gateway_config(
            stub.port, store, prefix=name, key_sha256=hashlib.sha256(
                self.team_key.encode()).hexdigest(),
            access_log="log" in options, cache="nocache" not in options, tracing=tracing))
        argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config),
                "--port", str(port)]
        env = dict(os.environ)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if "2w" in options:
            argv += ["--workers", "2"]
            env["PROMETHEUS_MULTIPROC_DIR"] = str(self.tmp / f"{name}-metrics")
        proc, log = self.spawn(name, argv, env=env)
        self.wait_ready(name, proc, log, port, health="/readyz")
        return Server(name, port, proc, log, key=self.team_key, also=also)

    def _start_litellm(self, name: str) -> Server:
        bin_dir = litellm_venv(Path(self.args.cache_dir)) / "bin"
        stub = self.server("stub")
        port = free_port()
        config = self.tmp / "litellm.yaml"
        config.write_text(f"""# written by bench/run.py
model_list:
  - model_name: gemini
    litellm_params:
      model: openai/gemini
      api_base: http://127.0.0.1:{stub.port}/api/v1
      api_key: {UPSTREAM_KEY}
""")
        master = "sk-" + secrets.token_hex(32)  # LiteLLM refuses to start without one
        env = {**os.environ, "LITELLM_MASTER_KEY": master, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
               "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"}
        argv = [str(bin_dir / "litellm"), "--config", str(config), "--host", "127.0.0.1",
                "--port", str(port), "--num_workers", "1"]
        proc, log = self.spawn(name, argv, env=env)
        self.wait_ready(name, proc, log, port, health="/health/liveliness", timeout=300)
        return Server(name, port, proc, log, key=master, path="/v1/chat/completions")


def litellm_venv(cache: Path) -> Path:
    """LiteLLM's proxy in its own venv under `cache` (outside the repository), made once."""
    venv = cache / f"litellm-{LITELLM}"
    done = venv / ".installed"
    if done.exists():
        return venv
    shutil.rmtree(venv, ignore_errors=True)  # a half-made one
    venv.parent.mkdir(parents=True, exist_ok=True)
    print(f"installing litellm[proxy]=={LITELLM} into {venv} ...", flush=True)
    for argv in ([sys.executable, "-m", "venv", str(venv)],
                 [str(venv / "bin" / "pip"), "install", "--quiet",
                  f"litellm[proxy]=={LITELLM}"]):
        try:
            done_ = subprocess.run(argv, capture_output=True, text=True, timeout=1800,
                                   check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BenchError(f"cannot install LiteLLM: {exc}") from None
        if done_.returncode != 0:
            lines = (done_.stdout + done_.stderr).strip().splitlines()[-5:]
            raise BenchError(f"cannot install LiteLLM ({shlex.join(argv[-2:])} exited "
                             f"{done_.returncode}): {' / '.join(lines)}")
    done.touch()
    return venv


def gateway_config(stub_port: int, store: str, *, prefix: str, key_sha256: str,
                   access_log: bool, cache: bool,
                   tracing: tuple[str, float] | None = None) -> str:
    traced = ("" if tracing is None else
              f"tracing: {{endpoint: \"{tracing[0]}\", sample_ratio: {tracing[1]}}}\n")
    return f"""# written by bench/run.py
listen: {{host: 127.0.0.1, port: 8080, shutdown_grace_s: 2}}
upstream:
  base_url: http://127.0.0.1:{stub_port}/api/v1
  api_key: {UPSTREAM_KEY}
  requests_per_minute: null          # no pacing: the stub has no limit
store: {{url: "{store}", key_prefix: "{prefix}"}}
cache: {{ttl_s: 86400, endpoints: {"[chat/completions]" if cache else "[]"}}}
pricing: {{default: 10, models: {{gemini: 2}}}}
teams:
  bench:
    keys: [{{id: bench, sha256: "{key_sha256}"}}]
    requests_per_minute: 10000000    # checked on every request, never reached
    requests_per_day: 1000000000
    budget: {{credits: 1000000000, period: total}}
logging: {{level: warning, access_log: {"true" if access_log else "false"}}}
""" + traced


def session_cpu_s(sid: int) -> float:
    """User + system CPU time of the live processes of session `sid`, from /proc/PID/stat.

    Every server is started in a session of its own, so this counts its workers too."""
    ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # after the command: state ppid pgrp session ... utime (14th field) stime (15th)
        if int(fields[3]) == sid:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _die_with_parent() -> None:
    """In the child: SIGTERM when bench/run.py dies, even by SIGKILL (Linux), so that nothing
    is left running."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- load --------------------------------------------------------------------------------------


def wrk(bench: Bench, server: Server, mode: str, nonce: str, duration: int, *,
        connections: int | None = None) -> dict[str, Any]:
    a = bench.args
    connections = connections or a.connections
    threads = min(a.threads, connections)
    argv = [bench.tools["wrk"], f"-t{threads}", f"-c{connections}", f"-d{duration}s",
            "--timeout", "10s", "-s", str(BENCH / "post.lua"),
            f"http://127.0.0.1:{server.port}{server.path}", "--", server.key, mode, nonce]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60,
                          check=False, preexec_fn=_die_with_parent)
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH ")), None)
    if done.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stdout}{done.stderr}")
    result: dict[str, Any] = json.loads(line[len("BENCH "):])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["errors"] = sum(result[k] for k in ("connect_errors", "read_errors", "write_errors",
                                               "status_errors", "timeouts"))
    return result


def measure(bench: Bench, case: Case, nonce: str, session: str) -> dict[str, Any]:
    """One run of a case: wrk at --connections, with the server's CPU time over it, then wrk
    at one connection for the p50 of a lone request."""
    a = bench.args
    server = bench.server(case.server)
    same = case.mode == "same"
    cpu, also = server.cpu_s(), server.also_cpu_s()
    result = wrk(bench, server, case.mode, session if same else nonce, a.duration)
    answered = max(result["requests"], 1)
    result["cpu_us"] = (server.cpu_s() - cpu) * 1e6 / answered
    result["also_cpu_us"] = (server.also_cpu_s() - also) * 1e6 / answered
    single = wrk(bench, server, case.mode, session if same else f"{nonce}-1", a.single_duration,
                 connections=1)
    result["p50_1_us"] = single["p50_us"]
    result["errors"] += single["errors"]
    return result


def check(bench: Bench, case: Case, server: Server, nonce: str) -> None:
    """One request by hand: the answer is a 200 and, for the gateway, the expected X-Cache."""
    headers = {"Authorization": f"Bearer {server.key}", "Content-Type": "application/json"}
    url = f"http://127.0.0.1:{server.port}{server.path}"
    body = TEMPLATE % (nonce, "same" if case.mode == "same" else f"check-{time.time_ns()}")
    deadline = time.monotonic() + 10
    while True:
        r = httpx.post(url, content=body, headers=headers, timeout=10)
        seen = r.headers.get("x-cache")
        ok = r.status_code == 200 and ANSWER_MARK.get(case.id, "credits_consumed") in r.text
        if ok and (case.expect is None or seen == case.expect):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"case {case.id}: expected 200 with X-Cache {case.expect}, got "
                             f"{r.status_code} X-Cache {seen}: {r.text[:300]}")
        time.sleep(0.1)  # a cache entry is written after the first answer, in the background


def cache_outcomes(server: Server) -> Counter[str]:
    """The gateway's own count of answers by status and X-Cache, from /metrics."""
    text = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10).text
    out: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith("gateway_requests_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            out[f"{labels['status']} {labels['cache'].upper()}"] += int(float(line.split()[-1]))
    return out


# -- profile -----------------------------------------------------------------------------------


def profile(bench: Bench, case: Case, nonce: str) -> dict[str, Any]:
    """py-spy on the gateway process while wrk loads it; the raw speedscope file is kept."""
    server = bench.server(case.server)
    a = bench.args
    out_dir = Path(a.profile_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{case.id}.speedscope.json"
    rate = 200
    spy = subprocess.Popen(
        [bench.tools["py-spy"], "record", "--pid", str(server.proc.pid), "--duration",
         str(a.duration), "--rate", str(rate), "--format", "speedscope", "--output", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        preexec_fn=_die_with_parent)
    bench.procs.append(spy)
    time.sleep(0.5)
    load = wrk(bench, server, case.mode, nonce, a.duration + 1)
    _, err = spy.communicate(timeout=60)
    if spy.returncode != 0 or not path.exists():
        raise BenchError(f"py-spy failed ({spy.returncode}): {err.decode(errors='replace')}")
    return {"case": case, "load": load, "path": path,
            **summarise_profile(path, rate=rate, duration=a.duration)}


def summarise_profile(path: Path, *, rate: int, duration: float) -> dict[str, Any]:
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    names = [_frame_name(f) for f in frames]
    areas = [_area(f.get("file") or "") for f in frames]
    # frames from `python -m gateway` down to the event loop are on every stack
    loop = [(f.get("file") or "").endswith(_LOOP_FILES) for f in frames]
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    by_area: Counter[str] = Counter()
    samples = 0
    for prof in data["profiles"]:
        # py-spy writes one sample per entry, weighted in seconds (1 / rate)
        scale = rate if prof.get("unit") == "seconds" else 1
        for stack, seconds in zip(prof["samples"], prof["weights"], strict=True):
            weight = round(seconds * scale)
            if not stack or not weight:
                continue
            samples += weight
            own[names[stack[-1]]] += weight
            # the innermost frame of a library or of the gateway: stdlib frames (asyncio
            # streams, contextlib, enum...) count for whoever called them
            inner = max((k for k, i in enumerate(stack) if loop[i]), default=-1) + 1
            area = next((areas[i] for i in reversed(stack[inner:]) if areas[i] is not None),
                        "event loop (uvloop, asyncio scheduling)")
            by_area[area] += weight
            for name in {names[i] for i in stack}:
                total[name] += weight
    return {"samples": samples, "busy": samples / (rate * duration),
            "own": own, "total": total, "areas": by_area}


def _frame_name(frame: dict[str, Any]) -> str:
    file = frame.get("file") or ""
    short = re.sub(r"^.*/(site-packages|python3\.\d+)/", "", file)
    short = re.sub(rf"^{re.escape(str(ROOT))}/", "", short)
    return f"{frame['name']} ({short})"


_LOOP_FILES = ("asyncio/runners.py", "asyncio/base_events.py", "uvloop/__init__.py")
_CLIENT = "upstream HTTP client (gateway/upstream.py, gateway/http1.py; httpx, aiohttp...)"
_AREAS = [
    ("gateway/store/", "gateway: store (gateway/store/)"),
    ("gateway/upstream.py", _CLIENT),
    ("gateway/http1.py", _CLIENT),
    ("gateway/", "gateway: the rest (proxy, auth, cache, metrics calls...)"),
    ("redis/", "Redis client (redis-py)"),
    *((f"{package}/", _CLIENT) for package in (
        "httpx", "aiohttp", "yarl", "multidict", "aiohappyeyeballs", "httpcore", "h11", "anyio",
        "sniffio")),
    ("uvicorn/", "HTTP server (uvicorn, httptools)"),
    ("prometheus_client/", "metrics (prometheus_client)"),
    ("starlette/", "starlette"),
    ("logging/", "logging"),
]


def _area(file: str) -> str | None:
    for marker, area in _AREAS:
        if f"/{marker}" in file:
            return area
    return None


# -- report ------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarise(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    out = {}
    for case_id, runs in results.items():
        out[case_id] = {
            "rps": median([r["rps"] for r in runs]),
            "rps_min": min(r["rps"] for r in runs),
            "rps_max": max(r["rps"] for r in runs),
            "cpu": median([r["cpu_us"] for r in runs]),
            "also_cpu": median([r["also_cpu_us"] for r in runs]),
            "p50": median([r["p50_us"] / 1000 for r in runs]),
            "p99": median([r["p99_us"] / 1000 for r in runs]),
            "p50_1": median([r["p50_1_us"] / 1000 for r in runs]),
            "errors": sum(r["errors"] for r in runs),
            "requests": sum(r["requests"] for r in runs),
        }
    return out


def table(summary: dict[str, dict[str, float]], baseline: str) -> str:
    b, base = summary.get("b"), summary.get(baseline)
    name = CASES[baseline].label.split(" ", 1)[0]
    rows = ["| case | requests/s | (min-max) | CPU µs/request | of it Redis | p50 ms | p99 ms | "
            f"p50 ms at 1 connection | req/s vs (b) | req/s vs {name} | CPU vs {name} | "
            f"p50 at 1 connection over {name} | errors |",
            "| --- |" + " ---: |" * 12]

    def ratio(s: dict[str, float], base: dict[str, float] | None, key: str = "rps") -> str:
        return f"{s[key] / base[key]:.2f}x" if base and base[key] else "-"

    for case_id, s in summary.items():
        added = f"{s['p50_1'] - base['p50_1']:+.2f} ms" if base else "-"
        redis = f"{s['also_cpu']:.0f}" if "redis" in CASES[case_id].server else "-"
        rows.append(f"| {CASES[case_id].label} | {s['rps']:.0f} | {s['rps_min']:.0f}-"
                    f"{s['rps_max']:.0f} | {s['cpu']:.0f} | {redis} | {s['p50']:.2f} | "
                    f"{s['p99']:.2f} | {s['p50_1']:.2f} | {ratio(s, b)} | {ratio(s, base)} | "
                    f"{ratio(s, base, 'cpu')} | {added} | {s['errors']:.0f} |")
    return "\n".join(rows)


def targets(summary: dict[str, dict[str, float]]) -> list[str]:
    """The issue's targets, where the cases they compare were run."""
    out = []
    e, aio, const = (summary.get(c) for c in ("e", "c_aio", "k"))
    if e and aio:
        rps, cpu = e["rps"] / aio["rps"], e["cpu"] / aio["cpu"] if aio["cpu"] else float("inf")
        added = e["p50_1"] - aio["p50_1"]
        met = "met" if rps >= 0.7 and cpu <= 1.5 and added <= 0.3 else "NOT met"
        out.append(f"- miss path on Redis (e) against the aiohttp pass-through (c-aio): {rps:.2f}x "
                   f"its requests/s (target >= 0.7x), {cpu:.2f}x its CPU per request (target "
                   f"<= 1.5x), p50 at 1 connection {added:+.2f} ms over it (target <= +0.3 ms): "
                   f"{met}")
    for case_id, store, goal in (("f", "Redis", 0.4), ("f_mem", "memory://", 0.5)):
        hit = summary.get(case_id)
        if hit and const:
            ratio = hit["rps"] / const["rps"]
            out.append(f"- hit path on {store} ({case_id}) against Starlette answering a "
                       f"constant (k): {ratio:.2f}x its requests/s (target >= {goal}x): "
                       f"{'met' if ratio >= goal else 'NOT met'}")
    litellm = summary.get("litellm")
    if e and litellm:
        ratio = e["rps"] / litellm["rps"]
        out.append(f"- miss path on Redis (e) against LiteLLM (l): {ratio:.1f}x its requests/s "
                   f"(target >= 20x): {'met' if ratio >= 20 else 'NOT met'}")
    return out or ["(the targets compare (e), (f) and (f mem) with (c-aio), (k) and (l): not run)"]


def profile_section(profiles: list[dict[str, Any]], top: int = 15) -> str:
    files = ", ".join(f"`{_shown(p['path'])}`" for p in profiles)
    parts = ["## Profile", "",
             "py-spy (`record --rate 200`, Python frames only, idle time excluded) on the gateway "
             "process during one extra wrk run per case, after the measured runs. Where the CPU "
             "goes: each sample counts for the innermost frame that belongs to a library or to "
             "the gateway (standard library frames, such as asyncio streams, count for their "
             "caller). Own = samples "
             "whose innermost Python frame is the function (time in C code, such as orjson, "
             "hashlib, socket writes or uvloop, counts for the Python function that called it); "
             "total = samples with the function anywhere on the stack; `Runner.run` own is time "
             f"in uvloop's C event loop. Speedscope files: {files} (open them at "
             "https://www.speedscope.app; bench/.gitignore keeps them out of git).", ""]
    for p in profiles:
        case, n = p["case"], p["samples"] or 1
        parts += [f"### {case.label}: {p['load']['rps']:.0f} requests/s while profiled, "
                  f"{p['samples']} busy samples ({p['busy']:.0%} of the run's wall time)", "",
                  "| where the CPU goes | share |", "| --- | ---: |"]
        parts += [f"| {area} | {w / n:.1%} |" for area, w in p["areas"].most_common()]
        parts += ["", f"Top {top} functions by own time:", "", "| function | own | total |",
                  "| --- | ---: | ---: |"]
        parts += [f"| `{name}` | {w / n:.1%} | {p['total'][name] / n:.1%} |"
                  for name, w in p["own"].most_common(top)]
        # the entry points (cli, server, __main__) are on every stack: leave them out
        ours = [(name, w) for name, w in p["total"].most_common()
                if "(gateway/" in name and w < 0.99 * n]
        parts += ["", f"Gateway functions by total time (top {top}):", "",
                  "| function | total | own |", "| --- | ---: | ---: |"]
        parts += [f"| `{name}` | {w / n:.1%} | {p['own'][name] / n:.1%} |"
                  for name, w in ours[:top]]
        parts.append("")
    return "\n".join(parts)


def _shown(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def kept_findings(path: Path) -> str:
    """The hand-written `## Profile findings` section of an earlier RESULTS.md, kept as is."""
    try:
        text = path.read_text()
    except OSError:
        return ""
    match = re.search(r"^## Profile findings\n.*?(?=^## |\Z)", text, re.S | re.M)
    return match.group(0).rstrip() + "\n" if match else ""


def report(bench: Bench, cases: list[Case], results: dict[str, list[dict[str, Any]]],
           checks: dict[str, Counter[str]], profiles: list[dict[str, Any]],
           command: str, started: datetime, skipped: dict[str, str]) -> str:
    a = bench.args
    summary = summarise(results)
    versions = tool_versions(bench)
    lines = [
        "# Benchmark results", "",
        f"Made by `{command}` (from the repository root) on "
        f"{started:%Y-%m-%d %H:%M} UTC.", "",
        f"Machine: {os.cpu_count()} cores (`os.cpu_count()`), {platform.system()} "
        f"{platform.release()}, {platform.machine()}; Python {platform.python_version()}, "
        f"{versions}.", "",
        f"Load: wrk, {a.threads} thread{'s' if a.threads > 1 else ''}, {a.connections} "
        f"connections, {a.duration} s per run, "
        f"`POST {PATH}` with a JSON chat body of about 100 bytes (bench/post.lua). Each "
        f"case ran {a.runs} times, interleaved (run 1 of every case, then run 2, ...), "
        f"{f'after a {a.warmup} s warm-up' if a.warmup else 'without a warm-up'}; "
        f"**the numbers are the medians of {a.runs} runs, all measured in "
        "this one invocation**. wrk, the servers, Redis and the stub share this machine's cores, "
        "so every case pays for the load generator and the stub too. Latency is wrk's (closed "
        "loop, from send to last byte).", "",
        table(summary, a.baseline), "",
        "CPU µs/request: the CPU time (user + system, from `/proc/PID/stat`) of the server's "
        "own processes (every process of its session: workers included; Redis's added for the "
        "gateway on Redis) during the loaded run, divided by the requests it answered: the "
        "least noisy figure on a shared machine; of it Redis: Redis's own part of it (what one "
        "Redis spends per request for every worker it serves). p50 at 1 connection: a separate "
        f"wrk run with one connection ({a.single_duration} s) right after each loaded run. "
        "Ratios: "
        "requests/s (or CPU per request) divided by those of the case named; p50 over: this "
        "case's median p50 at 1 connection minus that case's. Errors: socket errors, timeouts "
        "and non-2xx answers, summed over the runs, both loads (any error makes a row "
        "worthless; the run exits 1).", "",
        *[f"Not run: {CASES[c].label}: {why}" for c, why in skipped.items()],
        *([""] if skipped else []),
        "Targets (reported, not enforced):", "", *targets(summary), "",
        "## Cases", "",
    ]
    lines += [f"- **{c.label}**: {c.what}." for c in cases]
    lines += [
        "", "The gateway cases run `python3 -m gateway serve --config <tmp>.yaml --port P` "
        "against the nginx stub with: one team and key, quota 10,000,000/minute and "
        "1,000,000,000/day (checked, never reached), a budget of 1e9 credits (reserved and "
        "settled to the stub's `credits_consumed` on every miss), `upstream.requests_per_minute: "
        "null` (no pacing), cache on for chat completions (24 h), metrics on (as always), "
        "`logging: {level: warning, access_log: false}` (no access log) unless the case says "
        "otherwise. Redis: a private `redis-server --save \"\" --appendonly no` on a free "
        "port.", "",
        "Checks: every case answered one request by hand first (200 with `credits_consumed`, "
        "or the stub's message where the server re-encodes the answer, and the expected "
        "`X-Cache` for the gateway). The gateways' own count of answers over "
        "the whole invocation (from `/metrics`, `status X-CACHE: count`):", "",
    ]
    for name, counts in checks.items():
        shown = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        lines.append(f"- {name}: {shown}")
    lines.append("")
    if profiles:
        lines.append(profile_section(profiles))
    findings = kept_findings(Path(a.out))
    if findings:
        lines.append(findings)
    return "\n".join(lines).rstrip() + "\n"


def tool_versions(bench: Bench) -> str:
    def first(argv: list[str], pattern: str) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "?"
        found = re.search(pattern, done.stdout + done.stderr)
        return found.group(1) if found else "?"

    nginx = first([bench.tools["nginx"], "-v"], r"nginx/(\S+)")
    parts = [f"nginx {nginx}", "wrk " + first([bench.tools["wrk"], "-v"], r"wrk (\S+)")]
    if "redis-server" in bench.tools:
        redis = first([bench.tools["redis-server"], "--version"], r"v=(\S+)")
        parts.append(f"redis {redis}")
    return ", ".join(parts)


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="cases: " + "; ".join(f"{c.id} = {c.label}"
                                                             for c in CASES.values()))
    p.add_argument("--duration", type=int, default=10, help="seconds per run (default 10)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--runs", type=int, default=3, help="runs per case; medians (default 3)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument("--warmup", type=int, default=2,
                   help="seconds of unrecorded load per case before its first run (default 2)")
    p.add_argument("--cases", default=DEFAULT_CASES,
                   help=f"comma-separated case ids (default {DEFAULT_CASES})")
    p.add_argument("--single-duration", type=int, default=5,
                   help="seconds of the 1-connection run after each loaded run (default 5)")
    p.add_argument("--baseline", default="c_aio",
                   help="the case the ratio columns compare with (default c_aio)")
    p.add_argument("--cache-dir", default=str(Path(os.environ.get(
        "XDG_CACHE_HOME", Path.home() / ".cache")) / "aio-gateway-bench"),
                   help="where the LiteLLM venv is made (outside the repository)")
    p.add_argument("--out", default=str(BENCH / "RESULTS.md"), help="the Markdown report")
    p.add_argument("--profile", action="store_true",
                   help="also profile the gateway with py-spy on cases e and f")
    p.add_argument("--profile-dir", default=str(BENCH / "profiles"),
                   help="where the speedscope files go (default bench/profiles)")
    args = p.parse_args(argv)
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        p.error(f"unknown case {unknown[0]!r}; cases: {', '.join(CASES)}")
    if args.baseline not in CASES:
        p.error(f"unknown --baseline {args.baseline!r}")
    if min(args.duration, args.connections, args.runs, args.threads,
           args.single_duration) < 1 or args.warmup < 0:
        p.error("--duration, --single-duration, --connections, --runs and --threads must be at "
                "least 1")
    if args.connections < args.threads:
        p.error("--connections must be at least --threads")
    return args


def required_tools(cases: list[Case], profile_on: bool) -> list[str]:
    names = ["wrk", "nginx"]
    if any("redis" in c.server for c in cases):
        names.append("redis-server")
    if profile_on:
        names.append("py-spy")
    return names


@contextlib.contextmanager
def terminated_as_exit() -> Iterator[None]:
    """SIGTERM ends the run like Ctrl-C does: through the `finally` that stops every process."""
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = [CASES[c] for c in dict.fromkeys(args.cases.split(","))]
    profiled = [c for c in cases if c.id in ("e", "f")] if args.profile else []
    tools = {name: find_tool(name) for name in required_tools(cases, bool(profiled))}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        apt = [m for m in missing if m != "py-spy"]
        how = ([f"apt-get install -y {' '.join(apt)}"] if apt else []) + (
            ["pip install py-spy"] if "py-spy" in missing else [])
        print(f"bench/run.py needs {', '.join(missing)}: {'; '.join(how)}", file=sys.stderr)
        return 2
    if args.profile and not profiled:
        print("--profile profiles cases e and f: add one of them to --cases", file=sys.stderr)
        return 2
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python3", "bench/run.py", *given])
    started = datetime.now(UTC)
    session = secrets.token_hex(4)
    checks: dict[str, Counter[str]] = {}
    profiles: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="aio-bench-") as tmp, terminated_as_exit():
        bench = Bench(args, Path(tmp), {k: v for k, v in tools.items() if v})
        try:
            for case in list(cases):
                try:
                    server = bench.server(case.server)
                except BenchError as exc:
                    if case.id != "litellm":
                        raise
                    print(f"skipping {case.label}: {exc}", file=sys.stderr, flush=True)
                    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
                    skipped[case.id] = " ... ".join(dict.fromkeys([lines[0], lines[-1]]))
                    cases.remove(case)
                    continue
                check(bench, case, server, nonce=session)
                if args.warmup:
                    wrk(bench, server, case.mode, f"{session}" if case.mode == "same"
                        else f"{session}-warm-{case.id}", args.warmup)
                print(f"ready: {case.label} on port {server.port}", flush=True)
            results: dict[str, list[dict[str, Any]]] = {c.id: [] for c in cases}
            for run in range(1, args.runs + 1):
                for case in cases:
                    time.sleep(0.5)  # let the previous case's background bookkeeping finish
                    result = measure(bench, case, f"{session}-{case.id}-{run}", session)
                    results[case.id].append(result)
                    print(f"run {run}/{args.runs} {case.label}: {result['rps']:.0f} req/s, "
                          f"{result['cpu_us']:.0f} µs CPU/request, p50 "
                          f"{result['p50_us'] / 1000:.2f} ms, p99 {result['p99_us'] / 1000:.2f} "
                          f"ms, p50 at 1 connection {result['p50_1_us'] / 1000:.2f} ms, errors "
                          f"{result['errors']}", flush=True)
            for case in profiled:
                time.sleep(0.5)
                print(f"profiling {case.label} ...", flush=True)
                profiles.append(profile(bench, case, f"{session}-profile-{case.id}"
                                        if case.mode == "distinct" else session))
            time.sleep(0.5)
            for case in cases:
                if case.gateway and case.server not in checks:
                    checks[case.server] = cache_outcomes(bench.servers[case.server])
        except BenchError as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            return 1
        finally:
            bench.stop_all()
        text = report(bench, cases, results, checks, profiles, command, started, skipped)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"\n{table(summarise(results), args.baseline)}\n\nwritten to {out}")
    errors = sum(r["errors"] for runs in results.values() for r in runs)
    if errors:
        print(f"bench: {errors} errors (socket errors, timeouts or non-2xx answers): the numbers "
              "are not trustworthy", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
