#!/usr/bin/env python3
"""The embedded Redis's own speed (gateway/store/embedded), on CPU time per call:

- a script of ten redis.calls, an empty script, one direct command;
- the project's admit.lua answering a cache hit (quota counted, ledger event appended), with the
  KEYS and payload the store builds;
- flat costs: N cache-hit admits (default 1,000,000) on a clock advancing 25 us per call, the
  ledger kept for one second of it; the throughput of the last 10% against the first 10%, and
  the RSS along the way.

    python3 bench/embedded.py [--calls 1000000] [--repeat 25]

CPU time (not wall time) is reported because the machine is shared: another process taking the
core does not count against us.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import timeit
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.quota import Quota
from gateway.store.base import Admission, CacheRef, Completion, LedgerTrim, Verdict
from gateway.store.embedded import EmbeddedRedis
from gateway.store.memory import EmbeddedEngine
from gateway.store.scripts import ScriptStore

TEN_CALLS = """
local t = redis.call('TIME')
local q = redis.call('HMGET', KEYS[1], 'a', 'b')
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1 then return 0 end
local e = redis.call('GET', KEYS[4])
redis.call('HSET', KEYS[1], 'a', ARGV[2], 'b', ARGV[3])
redis.call('PEXPIRE', KEYS[1], 60000)
redis.call('HINCRBY', KEYS[5], 'reserved', 10)
redis.call('SET', KEYS[6], ARGV[1], 'PX', 10000)
local ttl = redis.call('PTTL', KEYS[6])
return {1, tonumber(t[1]), e or false, ttl}
"""
CONTEXT = (b'{"team":"research","key_id":"research-key","model":"gemini",'
           b'"route":"chat/completions","request_id":"0123456789abcdef"}')
ENTRY = b'{"s": 200, "h": [["content-type", "application/json"]], "c": 2000, "t": 3600}\n' + (
    b'{"id": "chatcmpl_1", "choices": [{"message": {"content": "' + b"x" * 400 + b'"}}]}')


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never waits (the embedded store answers at once)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the call waited for something")


def cpu_us(call: Callable[[], Any], repeat: int, number: int = 2000) -> float:
    timer = timeit.Timer(call, timer=time.process_time)
    return min(timer.repeat(number=number, repeat=repeat)) / number * 1e6


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def hit_store(clock: Clock) -> tuple[EmbeddedRedis, ScriptStore, Callable[[int], Admission]]:
    embedded = EmbeddedEngine(clock=clock)
    engine, store = embedded.redis, ScriptStore(embedded, prefix="bench")
    ref = CacheRef("chat/completions", "d" * 64)
    sync(store.finish(Completion("research", "lead", cache_put=(ref, ENTRY, 3_600_000))))
    quota = Quota("minute", 10**9, 60.0)

    def hit(i: int) -> Admission:
        return Admission(team="research", key_id="research-key", ticket=f"t{i}", hold_ms=30_000,
                         quotas=(quota,), cache=ref, hit_event=CONTEXT,
                         ledger=LedgerTrim(min_ms=int(clock.now * 1000) - 1000))

    return engine, store, hit


def micro(repeat: int) -> None:
    engine = EmbeddedRedis()
    engine.execute("SET", "entry", "x" * 200)
    sha = engine.script_load(TEN_CALLS)
    keys = ["q", "tomb", "revoked", "entry", "budget", "lock"]
    args = ["ticket", "1.5|123", "2.5|456"]
    empty = engine.script_load("return 1")
    for label, call in (("script of 10 redis.calls", lambda: engine.evalsha(sha, keys, args)),
                        ("empty script", lambda: engine.evalsha(empty, [], [])),
                        ("one command (GET)", lambda: engine.execute("GET", "entry"))):
        print(f"{label:30}{cpu_us(call, repeat):6.1f} us")

    clock = Clock()
    engine, store, hit = hit_store(clock)
    admission = hit(0)
    assert sync(store.admit(admission)).verdict is Verdict.HIT
    counter = iter(range(10**9))

    def one_hit() -> None:
        clock.now += 25e-6
        sync(store.admit(hit(next(counter))))

    print(f"{'admit.lua cache hit, store':30}{cpu_us(one_hit, repeat):6.1f} us  "
          "(Admission -> ARGV -> script -> AdmitResult)")


def flat(calls: int) -> None:
    clock = Clock()
    engine, store, hit = hit_store(clock)
    tenth, part = calls // 10, calls // 100
    rates, best, rss = [], [], [rss_mb()]
    for window in range(10):
        spent = []
        for chunk in range(10):
            started = time.process_time()
            first = window * tenth + chunk * part
            for i in range(first, first + part):
                clock.now += 25e-6
                result = sync(store.admit(hit(i)))
            spent.append(time.process_time() - started)
            assert result.verdict is Verdict.HIT
        rates.append(tenth / sum(spent))
        best.append(part / min(spent))  # the least disturbed hundredth: less noise on a busy box
        rss.append(rss_mb())
    info = engine.info()
    print(f"flat costs: {calls:,} cache-hit admits, clock +25 us each, ledger kept 1 s")
    print("  admits/s (CPU) per tenth: " + " ".join(f"{r:,.0f}" for r in rates))
    print("  best hundredth of each:   " + " ".join(f"{r:,.0f}" for r in best))
    print(f"  last 10% / first 10%: {rates[-1] / rates[0]:.3f} (best hundredths: "
          f"{best[-1] / best[0]:.3f})")
    print("  RSS MB after each tenth: " + " ".join(f"{m:.1f}" for m in rss[1:])
          + f"  (start {rss[0]:.1f})")
    ledger = engine.execute("XLEN", "bench:{t:research}:ledger")
    print(f"  keyspace at the end: {info.keys} keys, ~{info.bytes / 2**20:.1f} MB, "
          f"{info.expired} expired; ledger entries: {ledger}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=25)
    options = parser.parse_args()
    print(f"Python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.1f}, "
          f"{os.cpu_count()} CPUs")
    micro(options.repeat)
    if options.calls:
        flat(options.calls)


if __name__ == "__main__":
    main()
