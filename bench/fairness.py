#!/usr/bin/env python3
"""Each team's share of a scarce upstream, and its wait for a slot, under a flood.

    python3 bench/fairness.py [--duration 30] [--warmup 3] [--per-minute 600] [--replicas 2]
                              [--store redis|memory] [--out bench/FAIRNESS.md]

Starts a private redis-server (with --store redis), `aio-gateway mock-upstream --fast` (it
answers at once: a request's time is its wait for an upstream slot) and `--replicas` gateway
processes sharing the store, one upstream account at `--per-minute` requests a minute. Then,
for `--duration` seconds each, two scenarios, the load spread over the replicas:

  flood     team `flood` keeps 200 requests waiting (a new one as soon as one is answered);
            team `light` sends one request a second.
  weights   teams `heavy3` (upstream_weight 3) and `heavy1` (weight 1) keep 40 waiting each.

For each team, over `--duration` seconds after a `--warmup` (the first requests meet 200
connections opening at once): the requests answered, its share of the upstream slots (answers
in that time), and its wait (the request's time through the gateway) at p50 and p99, of the
requests both sent and answered in that time. Needs redis-server for --store redis.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import yaml
from harness import free_port, process, wait_http  # bench/harness.py

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
UPSTREAM_KEY = "aio_bench_fairness_upstream_key"
SCENARIOS = {  # team -> (upstream_weight, requests kept waiting, or seconds between requests)
    "flood": {"flood": (1, 200, None), "light": (1, None, 1.0)},
    "weights": {"heavy3": (3, 40, None), "heavy1": (1, 40, None)},
}




def key_of(team: str) -> str:
    return f"aiogw_bench_fairness_{team}_0123456789abcdef"






def config(upstream_port: int, store_url: str, per_minute: int, prefix: str) -> dict[str, object]:
    teams = {team: {"keys": [{"id": f"{team}-key",
                              "sha256": hashlib.sha256(key_of(team).encode()).hexdigest()}],
                    "upstream_weight": weight, "max_waiting": 250}
             for scenario in SCENARIOS.values() for team, (weight, _, _) in scenario.items()}
    return {
        "upstream": {"base_url": f"http://127.0.0.1:{upstream_port}/api/v1",
                     "api_key": UPSTREAM_KEY, "requests_per_minute": per_minute, "burst": 1,
                     "queue_timeout_s": 60, "retries": 0},
        "store": {"url": store_url, "key_prefix": prefix},
        "cache": {"ttl_s": 0},
        "teams": teams,
        "logging": {"access_log": False, "level": "warning"},
        "listen": {"shutdown_grace_s": 1},  # requests still waiting at the end are not counted
    }


@dataclass
class Team:
    name: str
    answered: int = 0  # 200s that came in the measured time
    waits: list[float] = field(default_factory=list)  # of those also sent in it, seconds
    refused: int = 0  # anything else that came in the measured time


async def load(urls: list[str], scenario: dict[str, tuple[int, int | None, float | None]],
               duration: float, warmup: float) -> dict[str, Team]:
    teams = {name: Team(name) for name in scenario}
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    turn = iter(range(10**9))
    begin = time.monotonic() + warmup
    end = begin + duration

    async def one(client: httpx.AsyncClient, team: Team) -> None:
        n = next(turn)
        started = time.monotonic()
        answer = await client.post(
            f"{urls[n % len(urls)]}/api/v1/chat/completions",
            headers={"Authorization": f"Bearer {key_of(team.name)}"},
            json={"model": "gemini", "messages": [{"role": "user", "content": f"{n}"}]})
        now = time.monotonic()
        if not begin <= now <= end:
            return
        if answer.status_code != 200:
            team.refused += 1
            return
        team.answered += 1
        if started >= begin:
            team.waits.append(now - started)

    async def keep_waiting(client: httpx.AsyncClient, team: Team) -> None:
        while time.monotonic() < end:
            await one(client, team)

    async def every(client: httpx.AsyncClient, team: Team, interval: float) -> None:
        sent: set[asyncio.Task[None]] = set()
        while time.monotonic() < end:
            task = asyncio.ensure_future(one(client, team))
            sent.add(task)
            task.add_done_callback(sent.discard)
            await asyncio.sleep(interval)
        await asyncio.gather(*sent, return_exceptions=True)

    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        work = []
        for name, (_, waiting, interval) in scenario.items():
            if waiting is not None:
                work += [keep_waiting(client, teams[name]) for _ in range(waiting)]
            else:
                assert interval is not None
                work.append(every(client, teams[name], interval))
        tasks = [asyncio.ensure_future(w) for w in work]
        await asyncio.sleep(warmup + duration)
        await asyncio.sleep(0.5)  # the answers of the last moment
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return teams


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def table(scenario: dict[str, tuple[int, int | None, float | None]],
          teams: dict[str, Team], duration: float) -> str:
    total = sum(t.answered for t in teams.values()) or 1
    lines = ["| team | weight | load | answered | refused | share of slots | wait p50 | wait p99 |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, (weight, waiting, interval) in scenario.items():
        team = teams[name]
        what = f"{waiting} waiting" if waiting is not None else f"1 every {interval:g} s"
        lines.append(
            f"| {name} | {weight} | {what} | {team.answered} | {team.refused} | "
            f"{team.answered / total:.1%} | {quantile(team.waits, 0.5) * 1000:.0f} ms | "
            f"{quantile(team.waits, 0.99) * 1000:.0f} ms |")
    rate = total / duration
    return "\n".join(lines) + f"\n\n{total} slots in {duration:g} s ({rate:.1f}/s).\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=30.0, help="seconds per scenario")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds not counted, first")
    p.add_argument("--per-minute", type=int, default=600, help="the account's limit")
    p.add_argument("--replicas", type=int, default=2, help="gateway processes (Redis only)")
    p.add_argument("--store", choices=["redis", "memory"], default="redis")
    p.add_argument("--out", default=str(BENCH / "FAIRNESS.md"))
    args = p.parse_args(argv)
    replicas = args.replicas if args.store == "redis" else 1
    if args.store == "redis" and shutil.which("redis-server") is None:
        sys.exit("--store redis needs redis-server (apt-get install -y redis-server)")
    tmp = Path(tempfile.mkdtemp(prefix="aio-fairness-"))
    with contextlib.ExitStack() as stack:
        store_url = "memory://"
        if args.store == "redis":
            redis_port = free_port()
            stack.enter_context(process(
                ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no"], tmp / "redis.log"))
            store_url = f"redis://127.0.0.1:{redis_port}/0"
        upstream_port = free_port()
        stack.enter_context(process(
            [sys.executable, "-m", "gateway", "mock-upstream", "--port", str(upstream_port),
             "--key", UPSTREAM_KEY, "--fast"], tmp / "mock.log"))
        wait_http(f"http://127.0.0.1:{upstream_port}/_mock/stats")
        sections = []
        for name, scenario in SCENARIOS.items():
            path = tmp / f"{name}.yaml"
            path.write_text(yaml.safe_dump(config(upstream_port, store_url, args.per_minute,
                                                  prefix=f"fair-{name}")))
            urls = []
            with contextlib.ExitStack() as gateways:
                for i in range(replicas):
                    port = free_port()
                    gateways.enter_context(process(
                        [sys.executable, "-m", "gateway", "serve", "--config", str(path),
                         "--host", "127.0.0.1", "--port", str(port)],
                        tmp / f"gateway-{name}-{i}.log"))
                    urls.append(f"http://127.0.0.1:{port}")
                for url in urls:
                    wait_http(f"{url}/healthz")
                teams = asyncio.run(load(urls, scenario, args.duration, args.warmup))
            sections.append(f"### {name}\n\n{table(scenario, teams, args.duration)}")
            print(sections[-1])
    report = (
        f"# Fair share of the upstream under a flood\n\n"
        f"`python3 bench/fairness.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
        f"\n\n{datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Machine: {os.cpu_count()} cores, "
        f"{platform.machine()}, Python {platform.python_version()}. One upstream account at "
        f"{args.per_minute} requests a minute, {replicas} gateway process(es) sharing "
        f"{args.store}, the mock upstream answering at once: a request's time is its wait for "
        f"an upstream slot.\n\n" + "\n".join(sections))
    Path(args.out).write_text(report)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
