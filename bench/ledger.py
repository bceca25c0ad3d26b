#!/usr/bin/env python3
"""Ledger rows per second written to PostgreSQL while the gateway serves load.

    python3 bench/ledger.py [--duration 10] [--connections 16] [--store redis|memory]
                            [--batch-rows 1000] [--out FILE]

Starts a private PostgreSQL (tests/postgres.py), a private redis-server (with --store redis),
`aio-gateway mock-upstream --fast` and one gateway process with `ledger.url` set, then loads
the gateway with wrk (bench/post.lua, every body distinct: every request is a charge and so a
ledger entry) in two phases:

  steady    PostgreSQL up: rows written per second keep pace with the requests?
  catch-up  PostgreSQL killed for `--duration` seconds under load (the backlog builds in the
            store), then restarted under load: rows per second while the backlog drains, the
            shipper's ceiling while the gateway keeps serving.

Rows and the backlog are read from the gateway's own metrics (gateway_ledger_rows_total,
gateway_ledger_pending) every 0.1 s. At the end every store entry must be in PostgreSQL once.
Needs wrk, redis-server (for --store redis) and PostgreSQL (initdb, postgres).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import asyncpg
import httpx

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from harness import free_port, process, wait_http  # noqa: E402  (bench/harness.py)

from gateway.auth import hash_key  # noqa: E402
from gateway.ledger import LedgerDB  # noqa: E402
from gateway.ledger.migrate import migrate  # noqa: E402
from tests.postgres import PostgresServer  # noqa: E402

KEY = "aiogw_bench_ledger_key_0123456789abcdef"
UPSTREAM_KEY = "aio_mock_key"








class Sampler:
    """gateway_ledger_rows_total and gateway_ledger_pending, every 0.1 s, with the time."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.wait(0.1):
                with contextlib.suppress(httpx.HTTPError):
                    text = client.get(f"{self.url}/metrics").text
                    self.samples.append((time.monotonic(), _metric(text, "rows_total"),
                                         _metric(text, "pending")))

    def rows_per_s(self, start: float, end: float) -> float:
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return 0.0
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    def resumed_at(self, after: float) -> float | None:
        """The last sample after `after` before the row count went up."""
        later = [s for s in self.samples if s[0] >= after]
        return next((a[0] for a, b in itertools.pairwise(later) if b[1] > a[1]), None)

    def max_pending(self, start: float, end: float) -> float:
        return max((s[2] for s in self.samples if start <= s[0] <= end), default=0.0)

    def drained_at(self, after: float, rows: float) -> float | None:
        return next((s[0] for s in self.samples if s[0] >= after and s[1] >= rows), None)

    def wait_drained(self, after: float, rows: float, timeout: float = 120.0) -> float | None:
        """When gateway_ledger_rows_total reached `rows` (after `after`), waiting for it."""
        deadline = time.monotonic() + timeout
        while (found := self.drained_at(after, rows)) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        return found

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^gateway_ledger_{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def wrk(port: int, connections: int, duration: int, nonce: str) -> int:
    argv = [shutil.which("wrk") or "wrk", "-t1", f"-c{connections}", f"-d{duration}s",
            "--timeout", "10s", "-s", str(BENCH / "post.lua"),
            f"http://127.0.0.1:{port}/api/v1/chat/completions", "--", KEY, "distinct", nonce]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith("BENCH "))
    return int(re.search(r'"requests": (\d+)', line).group(1))  # type: ignore[union-attr]


def config(upstream: int, store: str, ledger: str, batch_rows: int) -> str:
    return f"""# written by bench/ledger.py
listen: {{host: 127.0.0.1, port: 8080, shutdown_grace_s: 10}}
upstream: {{base_url: "http://127.0.0.1:{upstream}/api/v1", api_key: {UPSTREAM_KEY},
           requests_per_minute: null}}
store: {{url: "{store}", key_prefix: bench}}
cache: {{endpoints: []}}
pricing: {{default: 10, models: {{gemini: 2}}}}
teams:
  bench:
    keys: [{{id: bench, sha256: "{hash_key(KEY)}"}}]
ledger: {{url: "{ledger}", batch_rows: {batch_rows}, interval_s: 0.2, timeout_s: 5}}
logging: {{level: warning, access_log: false}}
"""


async def _migrate(url: str) -> None:
    db = LedgerDB(url)
    try:
        await migrate(db)
    finally:
        await db.close()


async def _rows(url: str) -> tuple[int, int]:
    conn = await asyncpg.connect(url)
    try:
        return (await conn.fetchval("SELECT count(*) FROM ledger_events"),
                await conn.fetchval("SELECT count(DISTINCT id) FROM ledger_events"))
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--store", choices=["redis", "memory"], default="redis")
    parser.add_argument("--batch-rows", type=int, default=1000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="aio-bench-ledger-"))
    pg = PostgresServer()
    pg.start()
    redis: subprocess.Popen[bytes] | None = None
    try:
        ledger_url = pg.new_database()
        asyncio.run(_migrate(ledger_url))
        store = "memory://"
        if args.store == "redis":
            redis_port = free_port()
            redis = subprocess.Popen(
                ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL)
            store = f"redis://127.0.0.1:{redis_port}/0"
        upstream, port = free_port(), free_port()
        path = tmp / "gateway.yaml"
        path.write_text(config(upstream, store, ledger_url, args.batch_rows))
        python = sys.executable
        with process([python, "-m", "gateway", "mock-upstream", "--fast", "--port",
                      str(upstream)], tmp / "mock.log"), \
             process([python, "-m", "gateway", "serve", "--config", str(path), "--port",
                      str(port)], tmp / "gateway.log"):
            url = f"http://127.0.0.1:{port}"
            wait_http(f"http://127.0.0.1:{upstream}/_mock/stats")
            wait_http(f"{url}/healthz")
            lines = run_phases(args, url, port, pg)
            rows, distinct = asyncio.run(_rows(ledger_url))
            lines.append(f"- rows in PostgreSQL at the end: {rows} ({distinct} distinct ids)")
        report = "\n".join(lines)
        print(report)
        if args.out:
            args.out.write_text(report + "\n")
        return 0
    finally:
        if redis is not None:
            redis.terminate()
            redis.wait()
        pg.close()
        shutil.rmtree(tmp, ignore_errors=True)


def run_phases(args: argparse.Namespace, url: str, port: int, pg: PostgresServer) -> list[str]:
    d, c = args.duration, args.connections
    sampler = Sampler(url)
    lines = [f"# Ledger shipping: {args.store} store, {c} connections, {d} s per phase, "
             f"batch_rows {args.batch_rows}, {os.cpu_count()} cores", ""]
    try:
        start = time.monotonic()
        sent = wrk(port, c, d, "steady")
        end = time.monotonic()
        written = sampler.rows_per_s(start, end)
        drained = sampler.wait_drained(end, sent)
        lines.append(f"- steady: {sent / (end - start):.0f} requests/s served, "
                     f"{written:.0f} rows/s written during the load, at most "
                     f"{sampler.max_pending(start, end):.0f} pending; caught up "
                     + (f"{drained - end:.2f} s after the load" if drained else "(not seen)"))

        pg.kill()
        down = wrk(port, c, d, "down")
        pending = sampler.max_pending(time.monotonic() - 1, time.monotonic())
        pg.start()
        start = time.monotonic()
        more = wrk(port, c, d, "catch-up")
        end = time.monotonic()
        # the backlog is every entry made before the restart: those of both phases so far
        drained = sampler.wait_drained(start, sent + down)
        resumed = sampler.resumed_at(start)
        everything = sampler.wait_drained(start, sent + down + more)
        if drained is None or resumed is None or everything is None:
            lines.append(f"- catch-up: {down} entries built up while PostgreSQL was down; "
                         "not caught up within 120 s")
            return lines
        lines.append(f"- catch-up: {down} entries built up while PostgreSQL was down "
                     f"(gateway_ledger_pending {pending:.0f}); after the restart, under "
                     f"{more / (end - start):.0f} requests/s, shipping resumed after "
                     f"{resumed - start:.1f} s (backoff) and wrote "
                     f"{sampler.rows_per_s(resumed, drained):.0f} rows/s until the backlog was "
                     f"in, {drained - start:.1f} s after the restart")
    finally:
        sampler.stop()
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
