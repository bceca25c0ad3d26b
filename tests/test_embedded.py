"""The embedded Redis against a real one: the same commands and scripts, the same replies.

Each differential test drives a real redis-server (over a raw RESP2 connection read by hiredis,
so replies and error messages are exactly what Redis sent) and an EmbeddedRedis side by side.
The embedded clock is set from Redis's TIME before each call, so replies that depend on the
time (a TTL, a timestamp) may differ by the few milliseconds between the two reads: those are
compared within that slack, everything else exactly. Expiry and eviction are tested on the
injected clock alone, with no sleeps.
"""

from __future__ import annotations

import asyncio
import random
import re
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from importlib import resources
from typing import Any

import hiredis
import pytest
import redis.asyncio
import redis.exceptions

from gateway.quota import Quota
from gateway.store.base import (
    AccountPace,
    Admission,
    CacheRef,
    Completion,
    LedgerTrim,
    Reservation,
    Settle,
    SlotAsk,
    Verdict,
)
from gateway.store.embedded import EmbeddedRedis, ResponseError
from gateway.store.redis import RedisEngine
from gateway.store.scripts import ScriptStore

from .conftest import RedisServer


class Raw:
    """A RESP2 connection to Redis whose replies are hiredis's, errors returned (not raised)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.reader = hiredis.Reader()

    def __call__(self, *args: Any) -> Any:
        self.sock.sendall(hiredis.pack_command(tuple(encode(a) for a in args)))
        while True:
            reply = self.reader.gets()
            if reply is not False:
                return reply
            self.reader.feed(self.sock.recv(1 << 16))

    def close(self) -> None:
        self.sock.close()


def encode(value: Any) -> bytes:
    """An argument as redis-py encodes it."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return b"%d" % value if isinstance(value, int) else repr(value).encode()


class Err(str):
    """An error reply, by its message."""


def norm(reply: Any) -> Any:
    if isinstance(reply, (ResponseError, hiredis.ReplyError)):
        return Err(reply.args[0])
    if isinstance(reply, list):
        return [norm(item) for item in reply]
    return reply


class Pair:
    """A real Redis and an embedded one, driven together."""

    def __init__(self, server: RedisServer) -> None:
        self.raw = Raw(server.port)
        self.raw("FLUSHALL")
        self.raw("SCRIPT", "FLUSH")
        self.now = 0.0
        self.ours = EmbeddedRedis(clock=lambda: self.now)
        self.synced_ms = 0
        self.lag_ms = 0

    def sync(self) -> None:
        """The embedded clock := Redis's clock, now."""
        seconds, micros = self.raw("TIME")
        self.now = int(seconds) + int(micros) / 1e6
        self.synced_ms = int(seconds) * 1000 + int(micros) // 1000

    def lagged(self) -> None:
        """Note how long after the last sync Redis ran the last command: an expiry set then
        is later in Redis than in ours by up to that much."""
        seconds, micros = self.raw("TIME")
        self.lag_ms = max(self.lag_ms, int(seconds) * 1000 + int(micros) // 1000 - self.synced_ms)

    def slack(self) -> int:
        """How far apart a TTL may read: the lag when its expiry was set, or now, at most."""
        self.lagged()
        return self.lag_ms + 2

    def command(self, *args: Any) -> tuple[Any, Any]:
        self.sync()
        replies = norm(capture(lambda: self.ours.execute(*args))), norm(self.raw(*args))
        self.lagged()
        return replies

    def script(self, source: str, keys: tuple[Any, ...] = (),
               args: tuple[Any, ...] = ()) -> tuple[Any, Any]:
        loaded = self.raw("SCRIPT", "LOAD", source)
        if isinstance(loaded, hiredis.ReplyError):
            return norm(capture(lambda: self.ours.script_load(source))), norm(loaded)
        sha = self.ours.script_load(source)
        assert sha == loaded.decode()
        self.sync()
        ours = norm(capture(lambda: self.ours.evalsha(sha, keys, args)))
        theirs = norm(self.raw("EVALSHA", sha, len(keys), *keys, *args))
        self.lagged()
        return ours, theirs

    def close(self) -> None:
        self.raw.close()


def capture(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except ResponseError as exc:
        return exc


@pytest.fixture
def pair(redis_server: RedisServer) -> Iterator[Pair]:
    both = Pair(redis_server)
    yield both
    both.close()


_NUMBER = re.compile(rb"(-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)")


def close(ours: Any, theirs: Any, slack: int) -> bool:
    """Equal, except that numbers (alone or inside text) may differ by `slack`."""
    if isinstance(ours, list) and isinstance(theirs, list):
        return len(ours) == len(theirs) and all(
            close(a, b, slack) for a, b in zip(ours, theirs, strict=True))
    if isinstance(ours, Err) and isinstance(theirs, Err):
        return close(ours.encode(), theirs.encode(), slack)
    if isinstance(ours, bytes) and isinstance(theirs, bytes):
        a, b = _NUMBER.split(ours), _NUMBER.split(theirs)
        return len(a) == len(b) and all(
            x == y if i % 2 == 0 else abs(float(x) - float(y)) <= slack
            for i, (x, y) in enumerate(zip(a, b, strict=True)))
    if type(ours) is int and type(theirs) is int:
        return abs(ours - theirs) <= slack
    return bool(ours == theirs and type(ours) is type(theirs))


def dump_ours(r: EmbeddedRedis) -> dict[bytes, list[Any]]:
    return {key: describe(r.execute, key) for key in r.scan("*")}


def dump_theirs(raw: Raw) -> dict[bytes, list[Any]]:
    return {key: describe(raw, key) for key in raw("KEYS", "*")}


def describe(call: Callable[..., Any], key: bytes) -> list[Any]:
    kind = call("TYPE", key)
    read: dict[bytes, Callable[[], Any]] = {
        b"string": lambda: call("GET", key),
        b"hash": lambda: call("HGETALL", key),
        b"set": lambda: sorted(call("SMEMBERS", key)),
        b"zset": lambda: call("ZRANGEBYSCORE", key, "-inf", "+inf", "WITHSCORES"),
        b"stream": lambda: [call("XLEN", key), call("XRANGE", key, "-", "+")],
    }
    return [kind, read[kind](), call("PTTL", key)]


def assert_same_keyspace(pair: Pair) -> None:
    pair.sync()
    ours = dump_ours(pair.ours)
    theirs = dump_theirs(pair.raw)
    slack = pair.slack()
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert close(ours[key], value, slack), f"{key!r}: ours {ours[key]!r}, redis {value!r}"


# -- a random walk over every command ----------------------------------------------------------

KEYS = [b"k0", b"k1", b"k2", b"k3", b"k4", b"k5"]
INTS = [b"0", b"1", b"-1", b"7", b"42", b"-100", b"9223372036854775807", b"-9223372036854775808",
        b"9223372036854775808", b"01", b"+1", b" 1", b"1.5", b"abc", b"", b"-0", b"1e3"]
FLOATS = [b"0", b"1.5", b"-2.25", b"1e3", b"inf", b"-inf", b"+inf", b"nan", b"0x10", b"1e400",
          b"abc", b"", b"-0", b"3", b"10", b" 2", b"1e-400", b".5", b"5."]
VALUES = [b"a", b"b", b"c", b"1", b"22", b"-3", b"x" * 40, "é".encode(), b"\x00\xff", b""]
TIMES_REL = [b"0", b"-5", b"abc", b"9223372036854775807"]


def _generators() -> dict[str, Callable[[random.Random], list[bytes]]]:
    def key(r: random.Random) -> bytes:
        return r.choice(KEYS)

    def some(r: random.Random, pool: list[bytes], most: int = 3) -> list[bytes]:
        return [r.choice(pool) for _ in range(r.randint(1, most))]

    def relative(r: random.Random, scale: int) -> bytes:
        if r.random() < 0.2:
            return r.choice(TIMES_REL)
        return b"%d" % (r.randint(10**6, 10**9) // scale)

    def absolute(r: random.Random, scale: int) -> bytes:
        return r.choice([b"1", b"1000", b"%d" % (4_102_444_800_000 // scale + r.randint(0, 10**6))])

    def set_options(r: random.Random) -> list[bytes]:
        options: list[bytes] = []
        for _ in range(r.randint(0, 2)):
            choice = r.choice(["NX", "XX", "GET", "KEEPTTL", "EX", "PX", "EXAT", "PXAT", "BOGUS"])
            options.append(choice.encode())
            if choice in ("EX", "PX"):
                options.append(relative(r, 1000 if choice == "EX" else 1))
            elif choice in ("EXAT", "PXAT"):
                options.append(absolute(r, 1000 if choice == "EXAT" else 1))
        return options

    counter = [0]

    def stream_id(r: random.Random) -> bytes:
        roll = r.random()
        if roll < 0.7:
            counter[0] += r.randint(0, 3)
            ms, seq = divmod(counter[0], 3)
            return b"%d-%d" % (ms, seq) if r.random() < 0.8 else b"%d-*" % ms
        return r.choice([b"0-0", b"0", b"abc", b"-", b"+", b"5", b"3-", b"1-2-3", b"01-1"])

    def range_id(r: random.Random) -> bytes:
        return r.choice([b"-", b"+", b"(0-1", b"(3", b"2", b"4-1", b"(-", b"(+", b"abc",
                         b"%d-%d" % (r.randint(0, counter[0] // 3 + 1), r.randint(0, 2))])

    def trim(r: random.Random) -> list[bytes]:
        strategy = r.choice([b"MAXLEN", b"MINID"])
        out = [strategy] + ([b"="] if r.random() < 0.3 else [])
        out.append(b"%d" % r.randint(0, 5) if strategy == b"MAXLEN" else range_id(r))
        if r.random() < 0.05:
            out += [b"LIMIT", b"10"]
        return out

    def pairs(r: random.Random, left: list[bytes], right: list[bytes]) -> list[bytes]:
        out = []
        for _ in range(r.randint(1, 3)):
            out += [r.choice(left), r.choice(right)]
        return out

    fields = [b"f1", b"f2", b"f3", b"f4"]
    members = [b"m1", b"m2", b"m3", b"m4", b"1", b"2"]
    return {
        "GET": lambda r: [key(r)],
        "SET": lambda r: [key(r), r.choice(VALUES), *set_options(r)],
        "INCR": lambda r: [key(r)],
        "DECR": lambda r: [key(r)],
        "INCRBY": lambda r: [key(r), r.choice(INTS)],
        "DECRBY": lambda r: [key(r), r.choice(INTS)],
        "DEL": lambda r: some(r, KEYS),
        "UNLINK": lambda r: some(r, KEYS),
        "EXISTS": lambda r: some(r, KEYS),
        "TYPE": lambda r: [key(r)],
        "PTTL": lambda r: [key(r)],
        "TTL": lambda r: [key(r)],
        "PEXPIRE": lambda r: [key(r), relative(r, 1), *r.sample(
            [b"NX", b"XX", b"GT", b"LT", b"BOGUS"], r.choice([0, 0, 1, 1, 2]))],
        "EXPIRE": lambda r: [key(r), relative(r, 1000), *r.sample(
            [b"NX", b"XX", b"GT", b"LT"], r.choice([0, 0, 1, 2]))],
        "PERSIST": lambda r: [key(r)],
        "HSET": lambda r: [key(r), *pairs(r, fields, VALUES)][:None if r.random() < 0.95 else -1],
        "HSETNX": lambda r: [key(r), r.choice(fields), r.choice(VALUES)],
        "HGET": lambda r: [key(r), r.choice(fields)],
        "HMGET": lambda r: [key(r), *some(r, fields)],
        "HDEL": lambda r: [key(r), *some(r, fields)],
        "HINCRBY": lambda r: [key(r), r.choice(fields), r.choice(INTS)],
        "HGETALL": lambda r: [key(r)],
        "HLEN": lambda r: [key(r)],
        "HEXISTS": lambda r: [key(r), r.choice(fields)],
        "SADD": lambda r: [key(r), *some(r, members)],
        "SREM": lambda r: [key(r), *some(r, members)],
        "SISMEMBER": lambda r: [key(r), r.choice(members)],
        "SMEMBERS": lambda r: [key(r)],
        "SCARD": lambda r: [key(r)],
        "ZADD": lambda r: [key(r), *r.sample([b"NX", b"XX", b"GT", b"LT", b"CH", b"INCR"],
                                             r.choice([0, 0, 1, 2])), *pairs(r, FLOATS, members)],
        "ZREM": lambda r: [key(r), *some(r, members)],
        "ZSCORE": lambda r: [key(r), r.choice(members)],
        "ZCARD": lambda r: [key(r)],
        "ZCOUNT": lambda r: [key(r), r.choice([*FLOATS, b"(1", b"(3", b"(", b"-inf"]),
                             r.choice([*FLOATS, b"(10", b"+inf", b"(+inf"])],
        "ZRANGEBYSCORE": lambda r: [
            key(r), r.choice([*FLOATS, b"(1", b"(3", b"("]), r.choice([*FLOATS, b"(10"]),
            *([b"WITHSCORES"] if r.random() < 0.5 else []),
            *([b"LIMIT", r.choice(INTS[:6]), r.choice(INTS[:6])] if r.random() < 0.3 else [])],
        "ZPOPMIN": lambda r: [key(r), *([r.choice(INTS[:6])] if r.random() < 0.5 else [])],
        "XADD": lambda r: [key(r), *([b"NOMKSTREAM"] if r.random() < 0.1 else []),
                           *(trim(r) if r.random() < 0.3 else []), stream_id(r),
                           *pairs(r, fields, VALUES)],
        "XTRIM": lambda r: [key(r), *trim(r)],
        "XRANGE": lambda r: [key(r), range_id(r), range_id(r),
                             *([b"COUNT", r.choice(INTS[:6])] if r.random() < 0.3 else [])],
        "XLEN": lambda r: [key(r)],
    }


@pytest.mark.parametrize(("seed", "via"), [(1, "command"), (2, "command"), (3, "command"),
                                          (4, "script"), (5, "script")])
def test_random_commands_reply_as_redis_does(pair: Pair, seed: int, via: str) -> None:
    """Sent directly, or from a script (`redis.pcall`: the reply crosses into Lua and back)."""
    rnd = random.Random(seed)
    generators = _generators()
    names = sorted(generators)
    for step in range(2500):
        name = rnd.choice(names)
        args = generators[name](rnd)
        if rnd.random() < 0.02:
            args = args[:rnd.randint(0, len(args))]  # arity errors
        spelled = name.lower() if rnd.random() < 0.3 else name
        if via == "command":
            ours, theirs = pair.command(spelled, *args)
        else:
            ours, theirs = pair.script("return redis.pcall(unpack(ARGV))", (), (spelled, *args))
        if name == "SMEMBERS" and isinstance(theirs, list):
            ours, theirs = sorted(ours), sorted(theirs)
        if name in ("PTTL", "TTL"):
            same = close(ours, theirs, pair.slack() if name == "PTTL" else 1)
        else:
            same = ours == theirs and type(ours) is type(theirs)
        assert same, f"step {step}: {name} {args!r}: ours {ours!r}, redis {theirs!r}"
    assert_same_keyspace(pair)
    assert_sizes_add_up(pair.ours)


def assert_sizes_add_up(r: EmbeddedRedis) -> None:
    """The running byte counts equal a recount from scratch."""
    from gateway.store.embedded import hashes, keyspace, sets, streams, zsets

    ks = r._keyspace
    total = volatile = 0
    for key, value in ks.data.items():
        if isinstance(value, hashes.Hash):
            assert value.size == sum(hashes.FIELD_COST + len(f) + len(v) for f, v in value.items())
        elif isinstance(value, sets.Set):
            assert value.size == sum(sets.MEMBER_COST + len(m) for m in value)
        elif isinstance(value, zsets.ZSet):
            assert value.size == sum(zsets.MEMBER_COST + len(m) for m in value.scores)
            assert value.order == sorted((s, m) for m, s in value.scores.items())
        elif isinstance(value, streams.Stream):
            live = value.entries[value.head:]
            assert value.size == sum(streams.ENTRY_COST + sum(map(len, e or ())) for e in live)
        size = keyspace.cost(key, value)
        total += size
        volatile += size if key in ks.expires else 0
    assert (ks.bytes, ks.volatile_bytes) == (total, volatile)
    assert sum(len(queue) for queue in ks._queues.values()) == len(ks.expires)


def test_unknown_commands_and_arity(pair: Pair) -> None:
    for args in (("NOPE",), ("nope", "a", "b"), ("GET",), ("get", "a", "b"), ("SET", "a"),
                 ("HSET", "h", "f"), ("XADD", "s", "*", "f"), ("TIME", "x")):
        ours, theirs = pair.command(*args)
        assert ours == theirs


# -- scripts -----------------------------------------------------------------------------------

REPLIES = [
    "return 1", "return -1.9", "return 3.99", "return 2^63", "return -2^63", "return 1e300",
    "return 0/0", "return true", "return false", "return nil", "return 'x'", "return {}",
    "return {1, 'a', {2, {3}}, false, 'after'}", "return {1, nil, 3}", "return {a=1}",
    "return {err='My Error'}", "return {err='-oops'}", "return {ok='fine'}",
    "return {1, {err='nested'}, {ok='s'}}", "return redis.error_reply('My Error')",
    "return redis.error_reply('oops')", "return redis.error_reply('-CODE msg')",
    "return redis.error_reply('-NOSPACE')", "return redis.error_reply('line\\r\\n')",
    "return redis.error_reply(5)", "return redis.error_reply()", "return redis.status_reply('OK')",
    "return redis.status_reply()", "return {double=1.5}", "return {double=0.1}",
    "return {double=1/0}", "return {map={a=1}}", "return {set={x=true}}",
    "return {big_number='123'}", "return {verbatim_string={format='txt', string='abc'}}",
    "return {err=5}", "return {ok=5}", "return {err='x', ok='y'}", "return {ok='y', double=1.5}",
    "return cjson.null", "return {1, cjson.null, 2}", "return {err='a\\nb'}",
    "return {ok='a\\r\\nb'}", "return redis.call('TYPE', 'nokey')",
    "return redis.call('SET', 'x', '1')", "return {redis.call('SET', 'x', '1'), 7}",
    "return redis.call('GET', 'nokey')", "return {redis.call('GET', 'nokey'), 1}",
    "return type(redis.call('GET', 'nokey'))", "return redis.call('HMGET', 'nokey', 'a', 'b')",
    "return type(redis.call('HMGET', 'nokey', 'a')[1])", "return redis.sha1hex('abc')",
    "return redis.sha1hex(12)", "return redis.sha1hex()", "return redis.replicate_commands()",
    "return _VERSION", "return #KEYS .. #ARGV", "return {KEYS[1], ARGV[1], ARGV[2]}",
    "return type(cjson.null)", "return type(_G)", "return tostring(redis.LOG_WARNING)",
    "return redis.log(redis.LOG_WARNING, 'from a test')",
    "return {tonumber('0x10'), tonumber(' 5 '), tonumber('1e2')}",
    "return string.format('%.14g', 0.1)", "return getmetatable('').__index == string",
    "local t = {} t.x = 1 return t.x", "return rawget(_G, 'nonexist') == nil",
    "return {string.rep('ab', 3), table.concat({1, 2}, '-'), math.floor(2.5), select('#', 1, 2)}",
    "return {unpack({1, 2, 3})}", "local t = {3, 1, 2} table.sort(t) return t",
    "return {pcall(function() return 1, 2 end)}",
    "return coroutine.wrap(function() coroutine.yield(5) end)()",
    "return loadstring('return 1 + 1')()", "return redis.setresp(2)",
    "pcall(cjson.encode, 1/0) pcall(cjson.encode, 1/0) return cjson.encode({1})",
    "pcall(redis.log) return {redis.log(redis.LOG_DEBUG, 'x')}",
    "local a = cjson.decode('{\"k\":[1]}') a.k[1] = 2 return cjson.decode('{\"k\":[1]}').k",
    "return {cjson.encode(cjson.decode('[1,2]')), cjson.encode(cjson.decode('[1,2]'))}",
]

ERRORS = [
    "error('hi')", "error('x', 0)", "error()", "error(42)", "error({err='custom'})",
    "error(redis.error_reply('CODE y'))", "local x = nil; return x.y",
    "return redis.call('nosuchcommand')", "return redis.call()", "return redis.call('get')",
    "return redis.call('set', 'x', {})", "return redis.call('set', 'x', nil)",
    "return redis.call('set', 'x', true)", "foo = 1", "return foo", "string.x = 1",
    "redis = nil", "KEYS = 5", "return cjson.encode(1/0)",
    "return cjson.encode({[1]=1,[20]=3})", "return cjson.encode({[true]=1})",
    "return cjson.encode(function() end)", "return cjson.encode()", "return cjson.decode()",
    "return cjson.decode({})", "return redis.log()", "redis.log('x', 'y')", "redis.log(9, 'y')",
    "return redis.setresp(4)", "return (", "return redis.call('incr', 'str')",
    "\n\nreturn redis.call('incr', 'str')", "local function f() error('deep') end\nf()",
    "return pcall(redis.call, 'incr', 'str')",
    "local ok, e = pcall(redis.call, 'incr', 'str') return {tostring(ok), e}",
    "local ok, e = pcall(function() redis.call('incr', 'str') end) return {type(e), e}",
    "local ok, e = pcall(error, {err='x'}) return e",
    "local ok, e = pcall(cjson.decode, 'x') return e",
    "local ok, e = pcall(cjson.encode, {f = function() end}) return e",
    "local ok, e = pcall(redis.call) return e",
    "local ok, e = pcall(redis.call, 'get', {}) return e",
    "return {xpcall(function() redis.call('incr', 'str') end, function(e) return type(e) .. ':' .. "
    "e.err end)}",
    "local e = redis.pcall('incr', 'str') error(e)",
    "local t = redis.pcall('incr', 'str'); t.err = 'NEW msg'; return t",
    "return redis.pcall('incr', 'str')", "return {type(redis.pcall('incr', 'str'))}",
    "return redis.call('set', 'k', 'v', 'PX', '-1')", "return redis.call('incrby', 'n', 1.5)",
    "return redis.pcall('nosuchcommand')", "return redis.pcall('get')",
    "return redis.call('GET', 'str', 'extra')", "return cjson.decode('[1,2')",
]


@pytest.mark.parametrize("source", REPLIES + ERRORS)
def test_scripts_reply_as_redis_does(pair: Pair, source: str) -> None:
    pair.command("SET", "str", "not a number")
    ours, theirs = pair.script(source, ("key1",), ("arg1", "arg2"))
    assert ours == theirs and type(ours) is type(theirs)


def test_an_error_keeps_the_writes_made_before_it(pair: Pair) -> None:
    pair.command("SET", "str", "x")
    source = ("redis.call('SET', 'partial', '1') redis.call('HSET', 'h', 'f', 'v') "
              "redis.call('INCR', 'str') redis.call('SET', 'never', '1')")
    ours, theirs = pair.script(source)
    assert ours == theirs and isinstance(theirs, Err)
    assert_same_keyspace(pair)
    assert pair.ours.execute("EXISTS", "partial", "h", "never") == 2


def test_noscript(pair: Pair) -> None:
    missing = "0" * 40
    with pytest.raises(ResponseError) as raised:
        pair.ours.evalsha(missing, [], [])
    assert Err(raised.value.args[0]) == norm(pair.raw("EVALSHA", missing, 0))


NUMBERS = ["1e15", "0.1", "-0.5", "1e17", "2^53+1", "1/3", "-1e-7", "123456789.123", "1e300",
           "2^63", "-2^63", "1e14", "99999999999999", "123456789012345678", "0.1+0.2", "1/0",
           "-1/0", "0/0", "7", "-12", "2^31", "1e-300"]


@pytest.mark.parametrize("expr", NUMBERS)
def test_numbers_are_written_as_redis_writes_them(pair: Pair, expr: str) -> None:
    source = (f"local n = ({expr}) redis.call('SET', KEYS[1], n) "
              "local ok, json = pcall(cjson.encode, n) "
              "local z = redis.pcall('ZADD', 'z', n, 'm') "
              "return {redis.call('GET', KEYS[1]), tostring(n), json, n, z, "
              "redis.call('ZSCORE', 'z', 'm'), string.format('%.17g', n)}")
    ours, theirs = pair.script(source, ("n",))
    assert ours == theirs


JSON = [b"{}", b"[]", b'{"a":1}', b"[1,2,3]",
        b'{"b":1,"a":[1,2,null,{}],"c":"\\u00e9\\ud83d\\ude00","d":1.5e300,"e":123456789012345678}',
        b'"x"', b"123", b"-0", b"0.1", b"1e-7", b"[true,false,null]",
        b'{"nested":{"deep":[{"x":[[[]]]}]}}', b'"esc\\"\\\\\\/\\b\\f\\n\\r\\t"',
        b'"\\u0001\\u001f\\u007f"', b' {"a" : 1 } ', b"[1,2", b"", b'{"a":nan}', b"[inf, -inf]",
        b"+5", b"0x1F", b"012", b"[1]\x00garbage", b'"\\ud800"', b"tru", b"{1:2}", b'"abc',
        '{"k":"é"}'.encode(), b'"\xff\xfe"', b"[" * 1001, b"[" * 999 + b"]" * 999, b"a\x00",
        b'{"a":1,}', b"[1 2]", b'"\\x"', b"[-]", b"1e", b"-inf", b"NaN", b"Infinity",
        b'{"team":"t","key_id":"k","model":"m","route":"chat/completions","request_id":"r",'
        b'"cached":false,"credits":12,"reserved":10,"period":"m2026-11","n":[1,2,3]}',
        b'{"a":"' + b"x" * 300 + b'","dup":1,"dup":2}', b"[1.5e-310, 2e308, -2e308]",
        b'"tab\there"', b'{"\\u0000":"\\u0000"}', b"-0", b"[1,-0]", b'{"a": -0 }', b"[\n-0]",
        b"[-0e1, -0.0, -0.5]", b'{"min_id":"1788016005737-0","n":[-0]}']


def test_a_stream_id_in_a_string_keeps_cjson_on_orjson(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a number -0 needs lua-cjson's own parser (orjson reads it as 0): the ledger's trim
    bound ("<ms>-0", in every payload) must not send each script's payload to it (62 us
    against 5 on a payload of ours)."""
    from gateway.store.embedded import cjson

    def refused(*args: Any) -> Any:
        raise AssertionError("the slow parser")

    null = object()
    assert cjson.decode(b'{"a":[-0]}', null) == {b"a": [-0.0]}
    monkeypatch.setattr(cjson, "_Parser", refused)
    doc = b'{"ledger":{"min_id":"1788016005737-0","max_len":"10"},"n":[-0.5,-0e1]}'
    assert cjson.decode(doc, null) == {b"ledger": {b"min_id": b"1788016005737-0",
                                                   b"max_len": b"10"}, b"n": [-0.5, -0.0]}


@pytest.mark.parametrize("doc", JSON, ids=range(len(JSON)))
def test_cjson_round_trips_as_in_redis(pair: Pair, doc: bytes) -> None:
    sources = ["return cjson.encode(cjson.decode(ARGV[1]))", "return type(cjson.decode(ARGV[1]))"]
    if len(doc) < 900:  # a reply 999 arrays deep is more than Python compares
        sources.append("return cjson.decode(ARGV[1])")
    for source in sources:
        ours, theirs = pair.script(source, (), (doc,))
        assert ours == theirs, source


ENCODE = [
    "{a=1,b={},c={1,2,{x='y'}},d=cjson.null,e='a\"b\\\\c/d\\n\\1\\127\\200'}",
    "{[1]=1,[3]=3}", "{[1]=1,[2]=3,x=1}", "{[1.5]=1}", "{{}, {{}}}", "-1e-7", "100000000000000",
    "2^63", "{[0]=1}", "{[-1]=1}", "{1,2,nil,4}", "{nil,nil,3}", "{[11]=1}", "{[10]=1}",
    "(function() local t = {} for i = 1, 40 do t['k' .. i] = i end return t end)()",
    "(function() local t = {} for i = 40, 1, -1 do t['key_' .. i * 7] = {i} end return t end)()",
    "{true, false, 'x', 0.5}", "'\\0'", "{[1/0]=1}", "{['']=''}",
]


@pytest.mark.parametrize("expr", ENCODE)
def test_cjson_encodes_as_in_redis(pair: Pair, expr: str) -> None:
    ours, theirs = pair.script(f"return cjson.encode({expr})")
    assert ours == theirs


# -- the project's own scripts, called as RedisStore calls them --------------------------------


def _library(name: str) -> str:
    lua = resources.files("gateway.store") / "lua"
    return (lua / "lib.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


class Recorder:
    """The store's link to Redis (as `Multiplexed`): every command goes to Redis and also runs
    on the embedded Redis, replies compared; the store sees Redis's replies."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.scripts = 0

    async def call(self, command: tuple[Any, ...]) -> Any:
        return self._one(*command)

    async def execute(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        return [self._one(*command) for command in commands]

    async def close(self) -> None:
        return None

    def _one(self, *args: Any) -> Any:
        pair = self.pair
        if args[:2] == ("SCRIPT", "LOAD"):
            sha = pair.raw("SCRIPT", "LOAD", args[2]).decode()
            assert pair.ours.script_load(args[2]) == sha
            return sha
        pair.sync()
        if args[0] == "EVALSHA":
            sha, numkeys = args[1], args[2]
            keys, rest = args[3:3 + numkeys], args[3 + numkeys:]
            ours = norm(capture(lambda: pair.ours.evalsha(sha, keys, rest)))
            self.scripts += 1
        else:
            ours = norm(capture(lambda: pair.ours.execute(*args)))
        reply = pair.raw(*args)
        theirs = norm(reply)
        slack = pair.slack()
        assert close(ours, theirs, slack), f"{args!r}: ours {ours!r}, redis {theirs!r}"
        return reply


CONTEXT = b'{"team":"t","key_id":"k","model":"m","route":"chat/completions","request_id":"r"}'


def _admission(ticket: str, **kw: Any) -> Admission:
    return Admission(team="t", key_id="k", ticket=ticket, hold_ms=600_000, **kw)


def _reserve(ticket: str, amount: int, period: str = "m2026-11") -> Reservation:
    return Reservation(ticket, period, amount, CONTEXT)


async def _store_walk(store: ScriptStore) -> list[Verdict]:
    """The store's operations, each kind of outcome at least once."""
    ref = CacheRef("chat/completions", "d" * 64)
    shared = CacheRef("chat/completions", "f" * 64, shared=True)
    # long enough that no quota, pacing slot or lock frees up during the walk
    quota = Quota("hour", 3, 3600.0)
    accounts = (AccountPace("main", 60_000.0, 2, 60, 5_000_000),
                AccountPace("spare", 60_000.0, 1, 60))
    pace = SlotAsk(accounts, ("main",), queue_ms=90_000.0)
    verdicts = []

    async def admit(ticket: str, **kw: Any) -> None:
        verdicts.append((await store.admit(_admission(ticket, **kw))).verdict)

    await store.connect()
    for i in range(4):
        await admit(f"q{i}", quotas=(quota,))
    for i in range(3):
        await admit(f"b{i}", reservation=_reserve(f"b{i}", 40_000), budget_limit=100_000)
    await store.finish(Completion("t", "b0", Settle.CHARGE, "b0", charge=15_000))
    await store.finish(Completion("t", "b1", Settle.REFUND, "b1"))
    await store.finish(Completion("t", "b1", Settle.REFUND, "b1"))  # settled already
    await store.finish(Completion("t", "b2", Settle.HOLD, "b2", hold_id="task:abc",
                                  hold_ms=60_000, task_owner=("abc", 60_000)))
    await admit("poll", task_id="abc")
    await admit("nope", task_id="nope")
    await store.finish(Completion("t", "poll", Settle.CHARGE, "task:abc", charge=90_000))
    await admit("lead", cache=ref)
    await admit("follow", cache=ref)
    await store.flight("t", ref)
    entry = b'{"s": 200, "h": [], "c": 2500, "t": 60}\n{"answer": 1}'
    await store.finish(Completion("t", "lead", cache_put=(ref, entry, 60_000), release=ref))
    await store.flight("t", ref)
    await admit("hit", cache=ref, hit_event=CONTEXT, idempotency=("idem", "fp"))
    await admit("retry", idempotency=("idem", "fp"))
    await admit("i1", idempotency=("key", "fp1"))
    await admit("i2", idempotency=("key", "fp1"))
    await admit("i3", idempotency=("key", "fp2"))
    await store.finish(Completion("t", "i1", idempotency=("key", b"answer", 60_000)))
    await admit("i4", idempotency=("key", "fp1"))
    await admit("j1", idempotency=("key2", "fp"))
    await store.finish(Completion("t", "j1", idempotency=("key2", None, 0)))
    await admit("j2", idempotency=("key2", "fp"))
    await admit("s1", cache=shared, slot=pace, quotas=(Quota("hour", 100, 3600.0),),
                reservation=_reserve("s1", 10_000), budget_limit=10**9)
    for i in range(4):
        await admit(f"p{i}", slot=pace)  # granted, queued, then refused
    await admit("full", slot=replace(pace, max_waiting=1))
    await admit("none", slot=replace(pace, usable=()))
    await store.claim(["p1", "p2", "gone"], accounts)
    await store.slot("u", "moved", replace(pace, usable=("spare",), weight=3))
    await store.slot("u", "moved2", replace(pace, usable=("spare",), min_interval_ms=1000.0))
    await store.claim(["p1", "moved2"], accounts, leave=True)
    await store.account_states(accounts, down=("main", 60.0, 402))
    await store.account_states(accounts, up="main", spend=[("main", 1500), ("spare", 10)])
    await store.pace(accounts[1], 10**6)
    await store.revoke("t", "k", True)
    await admit("revoked")
    await store.revoke("t", "k", False)
    cancelled = _admission("c1", reservation=_reserve("c1", 5_000), cache=ref)
    await store.cancel(cancelled)
    verdicts.append((await store.admit(cancelled)).verdict)
    await admit("kb", reservation=Reservation("kb", "m2026-11", 60_000, CONTEXT, key="k"),
                key_budget_limit=50_000)
    for i in range(5):
        await store.finish(Completion("t", f"l{i}", event=b'{"n": %d}' % i))
    await store.finish(Completion("t", "l5", event=b'{"n": 5}', ledger=LedgerTrim(min_ms=1)))
    await store.finish(Completion("t", "l6", event=b'{"n": 6}', ledger=LedgerTrim(min_ms=10**13)))
    await store.finish(Completion("t", "l7", event=b'{"n": 7}', ledger=LedgerTrim(min_ms=1)))
    await store.finish(Completion("t", "d1", Settle.CHARGE, "d1", charge=7,
                                  direct=_reserve("d1", 9_000)))
    await store.finish(Completion("t", "d1", Settle.CHARGE, "d1", charge=7,
                                  direct=_reserve("d1", 9_000)))  # once per ticket
    await store.heartbeat("proc", 1)
    await store.bump_config()
    await store.budgets([("t", "m2026-11")])
    await store.try_lock("lock", "me", 1000)
    return verdicts


def test_the_projects_scripts_reply_as_on_redis(pair: Pair, redis_server: RedisServer) -> None:
    async def main() -> list[Verdict]:
        client = redis.asyncio.Redis(host="127.0.0.1", port=redis_server.port)
        recorder = Recorder(pair)
        store = ScriptStore(RedisEngine(client, recorder), prefix="test")
        try:
            verdicts = await _store_walk(store)
        finally:
            await store.close()
        assert recorder.scripts > 40
        return verdicts

    verdicts = asyncio.run(main())
    assert set(verdicts) == set(Verdict)
    assert_same_keyspace(pair)


def test_the_cluster_scripts_reply_as_on_redis(pair: Pair) -> None:
    lookup, store_entry = _library("lookup"), _library("store_entry")
    keys = ("c:entry", "c:flight")

    def look(ticket: str) -> tuple[str, ...]:
        return (f'{{"ticket":"{ticket}","hold_ms":10000}}',)

    def store(ticket: str, entry: str = "") -> tuple[str, ...]:
        ttl = ',"cache_ttl_ms":60000' if entry else ""
        return (f'{{"ticket":"{ticket}","release":true{ttl}}}', entry)

    for source, args in ((lookup, look("t1")), (lookup, look("t2")), (store_entry, store("t2")),
                         (store_entry, store("t1")), (lookup, look("t3")),
                         (store_entry, store("t3", "entry")), (lookup, look("t4"))):
        ours, theirs = pair.script(source, keys, args)
        assert close(ours, theirs, pair.slack())
    assert_same_keyspace(pair)


# -- the embedded engine on its own clock ------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance_ms(self, ms: float) -> None:
        self.now += ms / 1000


def test_a_key_expires_once_the_clock_passes_its_deadline() -> None:
    clock = Clock()
    r = EmbeddedRedis(clock=clock)
    r.execute("SET", "k", "v", "PX", "100")
    clock.advance_ms(100)
    assert r.execute("PTTL", "k") == 0 and r.execute("GET", "k") == b"v"
    clock.advance_ms(1)
    assert r.execute("GET", "k") is None and r.execute("PTTL", "k") == -2
    assert r.info().keys == 0 and r.info().expired == 1


def test_re_expiring_a_key_costs_no_memory() -> None:
    clock = Clock()
    r = EmbeddedRedis(clock=clock)
    sha = r.script_load("redis.call('HINCRBY', KEYS[1], 'n', 1) "
                        "return redis.call('PEXPIRE', KEYS[1], ARGV[1])")
    for i in range(20_000):
        clock.advance_ms(1)
        assert r.evalsha(sha, ["quota"], [1000 + i % 5000]) == 1
    queued = sum(len(queue) for queue in r._keyspace._queues.values())
    assert queued == 1 and len(r._keyspace.expires) == 1
    assert r.execute("HGET", "quota", "n") == b"20000"


def test_expired_keys_are_reclaimed_without_being_touched() -> None:
    clock = Clock()
    r = EmbeddedRedis(clock=clock)
    for i in range(1000):
        r.execute("SET", f"short:{i}", "v", "PX", str(10 + i % 7))
        r.execute("SET", f"long:{i}", "v", "EX", "3600")
    r.execute("SET", "forever", "v")
    clock.advance_ms(20)
    r.execute("TIME")
    assert r.info().expired == 32  # each call reclaims a bounded number
    calls = 1
    while r.info().keys > 1001:
        r.execute("TIME")
        calls += 1
        assert calls < 100
    assert r.info().expired == 1000 and r.execute("EXISTS", "forever", "long:3") == 2
    assert r.info().volatile_keys == 1000


def test_eviction_drops_the_least_recently_used_volatile_keys() -> None:
    clock = Clock()
    r = EmbeddedRedis(clock=clock, max_volatile_bytes=10_000)
    for i in range(100):
        r.execute("SET", f"keep:{i}", "x" * 100)  # no TTL: never evicted
    for i in range(100):
        r.execute("SET", f"v:{i}", "x" * 100, "EX", "60")
        if i >= 10:
            r.execute("GET", "v:0")  # v:0 stays recently used
    info = r.info()
    assert info.volatile_bytes <= 10_000 + 300
    assert info.evicted > 0 and info.keys == 100 + info.volatile_keys
    assert r.execute("EXISTS", "v:0") == 1 and r.execute("EXISTS", "v:1") == 0
    assert r.execute("EXISTS", "v:99") == 1
    assert all(r.execute("EXISTS", f"keep:{i}") for i in range(100))
    r.execute("PERSIST", "v:99")
    assert r.info().volatile_keys == info.volatile_keys - 1


def test_sizes_follow_the_values() -> None:
    r = EmbeddedRedis(clock=Clock())
    empty = r.info().bytes
    r.execute("HSET", "h", "f", "x" * 1000)
    r.execute("SADD", "s", "m" * 500)
    r.execute("ZADD", "z", "1", "n" * 500)
    r.execute("XADD", "x", "1-1", "f", "v" * 500)
    grown = r.info().bytes
    assert grown - empty > 2500
    r.execute("HDEL", "h", "f")
    r.execute("SREM", "s", "m" * 500)
    r.execute("ZPOPMIN", "z")
    r.execute("XTRIM", "x", "MAXLEN", "0")
    r.execute("DEL", "x")
    assert r.info().bytes == empty and r.info().keys == 0


def test_stream_ids_come_from_the_clock_and_never_go_back() -> None:
    clock = Clock()
    r = EmbeddedRedis(clock=clock)
    ms = int(clock.now * 1000)
    assert r.execute("XADD", "s", "*", "f", "1") == b"%d-0" % ms
    assert r.execute("XADD", "s", "*", "f", "2") == b"%d-1" % ms
    clock.advance_ms(-5000)  # the clock went back
    assert r.execute("XADD", "s", "*", "f", "3") == b"%d-2" % ms
    clock.advance_ms(5001)
    assert r.execute("XADD", "s", "*", "f", "4") == b"%d-0" % (ms + 1)


def test_a_stream_trimmed_from_the_head_stays_small() -> None:
    clock = Clock()
    r = EmbeddedRedis(clock=clock)
    for _ in range(10_000):
        clock.advance_ms(1)
        minid = int(clock.now * 1000) - 50
        r.execute("XADD", "ledger", "MINID", f"{minid}-0", "*", "e", "{}")
    stream = r._keyspace.data[b"ledger"]
    assert r.execute("XLEN", "ledger") == 51
    assert len(stream.ids) <= 2 * 51 + 65  # type: ignore[union-attr]
    assert len(r.execute("XRANGE", "ledger", "-", "+")) == 51


def test_scan_matches_a_glob_as_redis_does(pair: Pair) -> None:
    keys = [b"aio:{t:a}:cache:chat:1", b"aio:{t:b}:cache:img:2", b"aio:{org}:pace", b"a?b",
            b"a*b", b"abc", b"a[b", b"x\\y", "é".encode(), b"\xff", b"-", b"]"]
    for key in keys:
        pair.command("SET", key, "v")
    for pattern in (b"*", b"aio:*:cache:*", b"aio:{t:a}:cache:chat:*", b"a?b", b"a\\?b",
                    b"a[*]b", b"a[^b]*", b"a[a-c]c", b"a[c-a]c", b"[\\]]", b"x\\\\y", b"a[b",
                    b"[", b"*[\x80-\xff]*", b"[a-", b"???", b"\\-", b"a*b*"):
        ours = sorted(pair.ours.scan(pattern))
        theirs = sorted(pair.raw("KEYS", pattern))
        assert ours == theirs, pattern


def test_nested_replies_reach_a_script_as_tables(pair: Pair) -> None:
    """XRANGE inside a script: tables in tables (the store reads its ledger this way)."""
    for i in range(3):
        pair.command("XADD", "stream", f"{i + 1}-0", "e", f"v{i}")
    for source in ("return redis.call('XRANGE', KEYS[1], '-', '+')",
                   "return redis.call('XRANGE', KEYS[1], '(1-0', '+', 'COUNT', 1)",
                   "local t = redis.call('XRANGE', KEYS[1], '-', '+'); return {#t, t[2][2][2]}"):
        ours, theirs = pair.script(source, ("stream",))
        assert ours == theirs, source
