#!/usr/bin/env python3
"""The gateway at scale: flat costs over many requests, capacity for held requests and streams,
and many clients polling a few tasks.

    python3 bench/scale.py [--cases flat,capacity,polling] [--out bench/SCALE.md]
        [--flat-requests 1000000] [--flat-stores memory,redis] [--slice 10] [--connections 32]
        [--held 5000] [--streams 2500] [--hold 20] [--store memory]
        [--pollers 2000] [--tasks 100] [--poll-duration 30]

flat      one gateway (1 worker) per store against the nginx stub of bench/run.py, every body
          distinct (cache miss: the ledger, the cache and the reservations grow), loaded by wrk
          in consecutive `--slice`-second runs until `--flat-requests` are answered; the
          requests/s and CPU per request of the last 10% of the requests against the first
          10% (target >= 0.95x), and the gateway's RSS at the start and at the end.
capacity  one gateway worker in front of bench/slow_upstream.py (answers after `--hold`
          seconds): `--held` concurrent requests, then, on a fresh gateway, `--streams`
          concurrent streams; every status counted, and the gateway's RSS per held request,
          (RSS while holding - RSS idle) / held (target <= 20 KB).
polling   the mock upstream (`aio-gateway mock-upstream --fast`) keeps `--tasks` tasks running;
          `--pollers` clients poll them (each its own task, in turn) for `--poll-duration`
          seconds: requests/s, and the upstream's polls per task per
          `cache.pending_task_ttl_s`.

Needs wrk, nginx and redis-server (apt-get install -y wrk nginx redis-server). Everything runs
on free ports and is stopped at the end; the report names the command, date and machine.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import platform
import resource
import secrets
import shlex
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import run  # bench/run.py: its processes, stub, gateway config and wrk
import yaml

BENCH = Path(__file__).resolve().parent
CASES = ("flat", "capacity", "polling")
STORES = ("memory", "redis")
PENDING_TASK_TTL_S = 2.0  # the gateway's default `cache.pending_task_ttl_s`
RAMP = 250  # connections opened at once, then a pause: the listen backlogs are 2048 and 4096


# -- processes ---------------------------------------------------------------------------------


def rss_kb(pid: int) -> int:
    """Resident set size of one process, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise run.BenchError(f"no VmRSS for process {pid}")


def raise_fd_limit() -> int:
    """The soft limit on open files raised to the hard one (the servers started inherit it):
    thousands of held connections need a descriptor each, twice in the gateway."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def start_gateway(bench: run.Bench, name: str, upstream_port: int, store: str,
                  **upstream: Any) -> run.Server:
    """A gateway (1 worker) on `store` in front of `upstream_port`, with `upstream` settings."""
    url = "memory://"
    also: tuple[Any, ...] = ()
    if store == "redis":
        redis = bench.server("redis")
        url, also = f"redis://127.0.0.1:{redis.port}/0", (redis.proc,)
    config = yaml.safe_load(run.gateway_config(
        upstream_port, url, prefix=name, key_sha256=hashlib.sha256(
            bench.team_key.encode()).hexdigest(), access_log=False, cache=True))
    config["upstream"].update(upstream)
    path = bench.tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    port = run.free_port()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    proc, log = bench.spawn(name, [sys.executable, "-m", "gateway", "serve", "--config",
                                   str(path), "--port", str(port)], env=env)
    bench.wait_ready(name, proc, log, port, health="/readyz")
    return run.Server(name, port, proc, log, key=bench.team_key, also=also)


# -- flat costs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slice:
    requests: int
    seconds: float
    cpu_s: float  # the gateway's and, on Redis, Redis's
    store_cpu_s: float = 0.0  # Redis's alone
    stub_cpu_s: float = 0.0  # the nginx stub's: a cost the data cannot change (the control)


@dataclass
class Flat:
    store: str
    slices: list[Slice]
    rss_start_kb: int
    rss_end_kb: int
    errors: int
    outcomes: Counter[str]
    redis_rss_kb: tuple[int, int] | None = None

    @property
    def requests(self) -> int:
        return sum(s.requests for s in self.slices)

    def window(self, first: bool, share: float = 0.1) -> tuple[float, float, float, float]:
        """Requests/s, then CPU µs per request: the gateway's (Redis's included), Redis's and
        the stub's, over the first (or last) `share` of the requests, each slice's requests
        taken as spread evenly over it."""
        total = self.requests
        lo, hi = (0.0, share * total) if first else ((1 - share) * total, float(total))
        seconds = cpu = store_cpu = stub_cpu = 0.0
        start = 0
        for s in self.slices:
            overlap = max(0.0, min(hi, start + s.requests) - max(lo, start))
            if overlap and s.requests:
                part = overlap / s.requests
                seconds += part * s.seconds
                cpu += part * s.cpu_s
                store_cpu += part * s.store_cpu_s
                stub_cpu += part * s.stub_cpu_s
            start += s.requests
        n = (hi - lo) / 1e6
        return (hi - lo) / seconds, cpu / n, store_cpu / n, stub_cpu / n


def flat(bench: run.Bench, store: str, total: int, slice_s: int, nonce: str) -> Flat:
    """Load one gateway in consecutive wrk runs, every body distinct, until `total` answers."""
    server = bench.server(f"gw_{store}")
    run.check(bench, run.CASES["d" if store == "memory" else "e"], server, nonce=nonce)
    redis = bench.servers["redis"].proc.pid if store == "redis" else None
    stub = bench.server("stub")

    def store_cpu_s() -> float:
        return run.session_cpu_s(redis) if redis else 0.0

    rss_start = rss_kb(server.proc.pid)
    redis_start = rss_kb(redis) if redis else 0
    slices: list[Slice] = []
    errors = 0
    done = 0
    while done < total:
        duration = slice_s
        if slices:  # the last slice only as long as the rest needs, at the last rate
            rate = slices[-1].requests / slices[-1].seconds
            duration = max(1, min(slice_s, int((total - done) / rate + 0.999)))
        cpu, store_cpu, stub_cpu = server.cpu_s(), store_cpu_s(), stub.cpu_s()
        result = run.wrk(bench, server, "distinct", f"{nonce}-{store}-{len(slices)}", duration)
        slices.append(Slice(result["requests"], result["duration_us"] / 1e6,
                            server.cpu_s() - cpu, store_cpu_s() - store_cpu,
                            stub.cpu_s() - stub_cpu))
        errors += result["errors"]
        done += result["requests"]
        print(f"flat {store}: {done:,} of {total:,} requests, this slice "
              f"{result['rps']:.0f}/s, RSS {rss_kb(server.proc.pid) / 1024:.0f} MB", flush=True)
    time.sleep(1)  # the last answers' bookkeeping
    return Flat(store, slices, rss_start, rss_kb(server.proc.pid), errors,
                run.cache_outcomes(server),
                (redis_start, rss_kb(redis)) if redis else None)


# -- capacity ----------------------------------------------------------------------------------


@dataclass
class Held:
    kind: str  # requests | streams
    asked: int
    statuses: Counter[str] = field(default_factory=Counter)
    whole: int = 0  # answers read to their end (a stream: up to `data: [DONE]`)
    peak: int = 0  # most requests the upstream held at once
    rss_idle_kb: int = 0
    rss_held_kb: int = 0
    seconds: float = 0.0

    @property
    def per_held_kb(self) -> float:
        return (self.rss_held_kb - self.rss_idle_kb) / max(self.peak, 1)


async def ramp(count: int, one: Callable[[int], Awaitable[None]]) -> None:
    """`count` calls of `one`, started `RAMP` at a time, 50 ms apart, all awaited."""
    tasks = []
    for i in range(count):
        tasks.append(asyncio.ensure_future(one(i)))
        if i % RAMP == RAMP - 1:
            await asyncio.sleep(0.05)
    await asyncio.gather(*tasks)


async def hold(gateway: run.Server, upstream: str, held: Held, *, stream: bool,
               timeout_s: float) -> None:
    """`held.asked` concurrent requests through the gateway, each on its own connection, while
    the upstream's count of held requests and the gateway's RSS are sampled."""
    url = f"http://127.0.0.1:{gateway.port}{run.PATH}"
    headers = {"Authorization": f"Bearer {gateway.key}", "Content-Type": "application/json"}
    tag = secrets.token_hex(4)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def one(i: int) -> None:
        body = run.TEMPLATE % (f"hold-{tag}", i)
        if stream:
            body = body[:-1] + ', "stream": true}'
        try:
            async with session.post(url, data=body, headers=headers) as answer:
                text = await answer.read()
                held.statuses[str(answer.status)] += 1
                end = b"data: [DONE]" if stream else b"credits_consumed"
                held.whole += answer.status == 200 and end in text
        except (aiohttp.ClientError, TimeoutError) as exc:
            held.statuses[type(exc).__name__] += 1

    async def sample(done: asyncio.Future[None]) -> None:
        while not done.done():
            async with session.get(f"{upstream}/_held") as r:
                now = (await r.json())["now"]
            if now >= held.peak:
                held.peak = now
                held.rss_held_kb = max(held.rss_held_kb, rss_kb(gateway.proc.pid))
            await asyncio.sleep(0.2)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.monotonic()
        load = asyncio.ensure_future(ramp(held.asked, one))
        await asyncio.gather(load, sample(load))
        held.seconds = time.monotonic() - started


async def warm(gateway: run.Server, count: int = 50) -> None:
    """Answered at once by the slow upstream: the gateway's first-use allocations (pools,
    caches, imports) happen before its idle RSS is read."""
    url = f"http://127.0.0.1:{gateway.port}{run.PATH}"
    headers = {"Authorization": f"Bearer {gateway.key}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        async def one(i: int) -> None:
            body = run.TEMPLATE % ("warm", f"{i}")
            if i % 2:
                body = body[:-1] + ', "stream": true}'
            async with session.post(url, data=body, headers=headers) as answer:
                await answer.read()
                if answer.status != 200:
                    raise run.BenchError(f"warm-up: {answer.status} {await answer.text()}")

        await asyncio.gather(*(one(i) for i in range(count)))


def capacity(bench: run.Bench, args: argparse.Namespace) -> list[Held]:
    port = run.free_port()
    proc, log = bench.spawn("slow", [sys.executable, str(BENCH / "slow_upstream.py"), str(port),
                                     "--hold", str(args.hold)])
    bench.wait_ready("slow", proc, log, port)
    upstream = f"http://127.0.0.1:{port}"
    pool = max(args.held, args.streams)
    out = []
    for kind, count in (("requests", args.held), ("streams", args.streams)):
        gateway = start_gateway(bench, f"gw_capacity_{kind}", port, args.store,
                                max_connections=pool, timeout_s=args.hold + 60)
        asyncio.run(warm(gateway))
        time.sleep(1)  # the warm-up's bookkeeping
        held = Held(kind, count, rss_idle_kb=rss_kb(gateway.proc.pid))
        print(f"capacity: {count} {kind} held {args.hold:g} s ...", flush=True)
        asyncio.run(hold(gateway, upstream, held, stream=kind == "streams",
                         timeout_s=args.hold + 120))
        print(f"capacity {kind}: {dict(held.statuses)}, {held.whole} whole, peak held "
              f"{held.peak}, {held.per_held_kb:.1f} KB each", flush=True)
        run.stop(gateway.proc)
        out.append(held)
    return out


# -- polling -----------------------------------------------------------------------------------


@dataclass
class Polling:
    pollers: int
    tasks: int
    seconds: float
    statuses: Counter[str]
    upstream_polls: dict[str, int]  # per task, during the load

    @property
    def per_interval(self) -> list[float]:
        intervals = self.seconds / PENDING_TASK_TTL_S
        return [n / intervals for n in self.upstream_polls.values()]


async def poll_load(gateway: run.Server, task_ids: list[str], pollers: int,
                    duration: float) -> tuple[Counter[str], float]:
    headers = {"Authorization": f"Bearer {gateway.key}"}
    base = f"http://127.0.0.1:{gateway.port}/api/v1/tasks/"
    statuses: Counter[str] = Counter()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        end = time.monotonic() + duration

        async def poller(i: int) -> None:
            url = base + task_ids[i % len(task_ids)]
            while time.monotonic() < end:
                try:
                    async with session.get(url, headers=headers) as answer:
                        body = await answer.read()
                        pending = b'"pending"' in body or b'"processing"' in body
                        statuses[f"{answer.status} {answer.headers.get('x-cache', '-')}"
                                 f"{'' if pending else ' not running'}"] += 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    statuses[type(exc).__name__] += 1

        started = time.monotonic()
        await ramp(pollers, poller)
        return statuses, time.monotonic() - started


def polling(bench: run.Bench, args: argparse.Namespace) -> Polling:
    mock = bench.server("mock")
    gateway = start_gateway(bench, "gw_polling", mock.port, args.store,
                            max_connections=max(200, args.tasks * 2))
    headers = {"Authorization": f"Bearer {gateway.key}"}
    task_ids = []
    for i in range(args.tasks):  # running for a day: every poll finds it pending
        r = run.httpx.post(f"http://127.0.0.1:{gateway.port}/api/v1/images/generations",
                           headers=headers, timeout=10, json={
                               "model": "flux-2", "prompt": f"scale {i}", "mock_delay_s": 86400})
        if r.status_code != 200:
            raise run.BenchError(f"creating a task: {r.status_code} {r.text[:300]}")
        task_ids.append(r.json()["id"])

    def upstream_polls() -> Counter[str]:
        counts = run.httpx.get(f"http://127.0.0.1:{mock.port}/_mock/stats", timeout=10).json()
        return Counter({t: counts["counts"].get(f"GET tasks/{t}", 0) for t in task_ids})

    before = upstream_polls()
    print(f"polling: {args.pollers} clients, {args.tasks} tasks, {args.poll_duration:g} s ...",
          flush=True)
    statuses, seconds = asyncio.run(poll_load(gateway, task_ids, args.pollers,
                                              args.poll_duration))
    polls = upstream_polls() - before
    result = Polling(args.pollers, args.tasks, seconds, statuses,
                     {t: polls[t] for t in task_ids})
    print(f"polling: {dict(statuses)}", flush=True)
    run.stop(gateway.proc)
    return result


# -- report ------------------------------------------------------------------------------------


def met(ok: bool) -> str:
    return "**met**" if ok else "**NOT met**"


def flat_section(results: list[Flat], args: argparse.Namespace) -> list[str]:
    lines = [
        "## Flat costs", "",
        f"wrk, {args.connections} connections, every body distinct (cache miss), in consecutive "
        f"runs of {args.slice} s (the last one shorter) until {args.flat_requests:,} requests "
        "were answered; one gateway worker against the nginx stub, the store's defaults "
        "(`memory://`: `store.memory_max_bytes` 128 MB). First and last 10%: requests/s and CPU "
        "per request over the first and the last tenth of the requests answered (each run's "
        "requests taken as spread evenly over it). CPU: the gateway's own (Redis's added on "
        "Redis), from /proc.", "",
        "| store | requests | runs | req/s first 10% | req/s last 10% | last / first | CPU "
        "µs/req first 10% | CPU µs/req last 10% | RSS start | RSS end | errors | target >= "
        "0.95x |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for f in results:
        (r1, c1, _, _), (r2, c2, _, _) = f.window(True), f.window(False)
        lines.append(f"| {f.store} | {f.requests:,} | {len(f.slices)} | {r1:.0f} | {r2:.0f} | "
                     f"{r2 / r1:.2f}x | {c1:.0f} | {c2:.0f} | {f.rss_start_kb / 1024:.1f} MB | "
                     f"{f.rss_end_kb / 1024:.1f} MB | {f.errors} | {met(r2 / r1 >= 0.95)} |")
    lines.append("")
    for f in results:
        shown = ", ".join(f"{k}: {v:,}" for k, v in sorted(f.outcomes.items()))
        (_, c1, s1, n1), (_, c2, s2, n2) = f.window(True), f.window(False)
        redis = (f"; Redis's RSS {f.redis_rss_kb[0] / 1024:.1f} MB at the start, "
                 f"{f.redis_rss_kb[1] / 1024:.1f} MB at the end; of the CPU per request, "
                 f"Redis's {s1:.0f} then {s2:.0f} µs, the gateway's {c1 - s1:.0f} then "
                 f"{c2 - s2:.0f} µs" if f.redis_rss_kb else "")
        control = (f"; the nginx stub's CPU per request, which the data cannot change (if it "
                   f"grows too, the machine slowed): {n1:.1f} then {n2:.1f} µs (first and last "
                   "10%)")
        lines.append(f"- {f.store}: the gateway's count of answers (`/metrics`, whole run, one "
                     f"check request included): {shown}{redis}{control}.")
        rates = " ".join(f"{s.requests / s.seconds:.0f}" for s in f.slices)
        lines.append(f"  Requests/s per run, in order: {rates}.")
    return [*lines, ""]


def capacity_section(results: list[Held], args: argparse.Namespace) -> list[str]:
    lines = [
        "## Capacity", "",
        f"One gateway worker (`{args.store}` store, `upstream.max_connections: "
        f"{max(args.held, args.streams)}`) in front of bench/slow_upstream.py, which answers "
        f"every request after {args.hold:g} s (a stream: an event a second meanwhile, then the "
        "final event with `credits_consumed`); a fresh gateway per row, warmed up by 50 "
        "requests answered at once. The client (aiohttp, one connection per request) opens "
        f"{RAMP} connections every 50 ms. RSS idle: the gateway's before the load; RSS held: "
        "its highest while the upstream held the most requests (sampled every 0.2 s); per held "
        "request: (RSS held - RSS idle) / most held.", "",
        "| load | asked | answered 200 | whole | other outcomes | most held at once | seconds "
        "| RSS idle | RSS held | per held request | target <= 20 KB |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for h in results:
        other = ", ".join(f"{k}: {v}" for k, v in sorted(h.statuses.items()) if k != "200")
        all_ok = h.whole == h.asked
        lines.append(
            f"| {h.asked:,} {'concurrent streams' if h.kind == 'streams' else 'held requests'} "
            f"| {h.asked:,} | {h.statuses['200']:,} | {h.whole:,} | {other or 'none'} | "
            f"{h.peak:,} | {h.seconds:.1f} | {h.rss_idle_kb / 1024:.1f} MB | "
            f"{h.rss_held_kb / 1024:.1f} MB | {h.per_held_kb:.1f} KB | "
            f"{met(all_ok and h.per_held_kb <= 20)} |")
    lines += ["", "Whole: a 200 read to its end (a stream up to `data: [DONE]`, an answer with "
              "its `credits_consumed`). The target counts as met only when every request was "
              "answered whole.", ""]
    return lines


def polling_section(p: Polling, args: argparse.Namespace) -> list[str]:
    answered = sum(v for k, v in p.statuses.items() if k.startswith("200 "))
    total = sum(p.statuses.values())
    rates = sorted(p.per_interval)
    shown = ", ".join(f"`{k}`: {v:,}" for k, v in sorted(p.statuses.items()))
    most = max(p.upstream_polls.values())
    bound = int(p.seconds // PENDING_TASK_TTL_S) + 1  # polls a window of that length can hold
    return [
        "## Polling", "",
        f"The mock upstream (`aio-gateway mock-upstream --fast`, one process) keeps {p.tasks} "
        f"tasks running (created through the gateway, `mock_delay_s` a day); {p.pollers} "
        f"clients (aiohttp, a keep-alive connection each, in this harness's process) poll them "
        f"for {args.poll_duration:g} s, client i polling task i mod {p.tasks}, each a new poll "
        f"as soon as the last is answered. One gateway worker, `{args.store}` store, "
        f"`cache.pending_task_ttl_s: {PENDING_TASK_TTL_S:g}` (the default): a pending task's "
        "answer is cached that long and concurrent polls of one task follow one upstream "
        "call.", "",
        "| clients | tasks | seconds | polls answered | requests/s | upstream polls per task "
        f"per {PENDING_TASK_TTL_S:g} s: mean | min | max | at most one per {PENDING_TASK_TTL_S:g} "
        "s (the design) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        f"| {p.pollers:,} | {p.tasks} | {p.seconds:.1f} | {answered:,} of {total:,} | "
        f"{answered / p.seconds:.0f} | {sum(rates) / len(rates):.2f} | {rates[0]:.2f} | "
        f"{rates[-1]:.2f} | {met(answered == total and most <= bound)} |", "",
        f"Outcomes (status, X-Cache): {shown}. The upstream's polls are the mock's own count of "
        f"`GET /tasks/{{id}}` per task over the load; the design allows at most {bound} per "
        f"task in {p.seconds:.1f} s (one per interval, the first at the start), the most "
        f"seen was {most}.", "",
    ]


def report(bench: run.Bench, args: argparse.Namespace, command: str, started: datetime,
           sections: list[str], fd_limit: int) -> str:
    return "\n".join([
        "# The gateway at scale", "",
        f"Made by `{command}` (from the repository root) on {started:%Y-%m-%d %H:%M} UTC.", "",
        f"Machine: {os.cpu_count()} cores (`os.cpu_count()`), {platform.system()} "
        f"{platform.release()}, {platform.machine()}; Python {platform.python_version()}, "
        f"{run.tool_versions(bench)}; open files limit {fd_limit}. The load generator, the "
        "gateway, the upstream and Redis share these cores.", "",
        *sections,
    ]).rstrip() + "\n"


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated: flat,capacity,"
                   "polling (default all)")
    p.add_argument("--out", default=str(BENCH / "SCALE.md"), help="the Markdown report")
    p.add_argument("--flat-requests", type=int, default=1_000_000,
                   help="requests per store in the flat case (default 1,000,000)")
    p.add_argument("--flat-stores", default=",".join(STORES), help="default memory,redis")
    p.add_argument("--slice", type=int, default=10, help="seconds per wrk run (default 10)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--held", type=int, default=5000, help="concurrent held requests")
    p.add_argument("--streams", type=int, default=2500, help="concurrent held streams")
    p.add_argument("--hold", type=float, default=20.0,
                   help="seconds the slow upstream takes to answer (default 20)")
    p.add_argument("--store", choices=STORES, default="memory",
                   help="the store of the capacity and polling cases (default memory)")
    p.add_argument("--pollers", type=int, default=2000, help="polling clients (default 2000)")
    p.add_argument("--tasks", type=int, default=100, help="tasks polled (default 100)")
    p.add_argument("--poll-duration", type=float, default=30.0,
                   help="seconds of polling (default 30)")
    args = p.parse_args(argv)
    cases = args.cases.split(",")
    stores = args.flat_stores.split(",")
    if not cases or any(c not in CASES for c in cases):
        p.error(f"--cases: any of {', '.join(CASES)}")
    if not stores or any(s not in STORES for s in stores):
        p.error(f"--flat-stores: any of {', '.join(STORES)}")
    if min(args.flat_requests, args.slice, args.connections, args.held, args.streams,
           args.pollers, args.tasks) < 1 or min(args.hold, args.poll_duration) <= 0:
        p.error("the counts and durations must be positive")
    args.cases, args.flat_stores = cases, stores
    args.threads, args.cache_dir = 1, ""  # what run.Bench and run.wrk read
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tools = {name: run.find_tool(name) for name in ("wrk", "nginx", "redis-server")}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        print(f"bench/scale.py needs {', '.join(missing)}: apt-get install -y "
              f"{' '.join(missing)}", file=sys.stderr)
        return 2
    fd_limit = raise_fd_limit()
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python3", "bench/scale.py", *given])
    started = datetime.now(UTC)
    nonce = secrets.token_hex(4)
    sections: list[str] = []
    with tempfile.TemporaryDirectory(prefix="aio-scale-") as tmp, run.terminated_as_exit():
        bench = run.Bench(args, Path(tmp), {k: v for k, v in tools.items() if v})
        try:
            if "flat" in args.cases:
                sections += flat_section([flat(bench, store, args.flat_requests, args.slice,
                                               nonce) for store in args.flat_stores], args)
                for store in args.flat_stores:  # free the cores for the next cases
                    run.stop(bench.servers.pop(f"gw_{store}").proc)
            if "capacity" in args.cases:
                sections += capacity_section(capacity(bench, args), args)
            if "polling" in args.cases:
                sections += polling_section(polling(bench, args), args)
            text = report(bench, args, command, started, sections, fd_limit)
        except run.BenchError as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            return 1
        finally:
            bench.stop_all()
    out = Path(args.out)
    out.write_text(text)
    print(f"\n{text}\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
