"""EmbeddedRedis: the keyspace, the command table and the Lua engine, put together."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import hashes, sets, streams, strings, zsets
from .errors import ResponseError
from .keyspace import Info, Keyspace
from .lua import Scripting
from .parse import format_double
from .replies import Argv, Nested, Reply, Status, Table, text

Arg = str | bytes | int | float

COMMANDS: Table = {**strings.COMMANDS, **hashes.COMMANDS, **sets.COMMANDS, **zsets.COMMANDS,
                   **streams.COMMANDS}
_LOOKUP: Table = {**COMMANDS, **{name.upper(): entry for name, entry in COMMANDS.items()}}
_FROM_SCRIPT_ARGS = "ERR Lua redis lib command arguments must be strings or integers"


class EmbeddedRedis:
    """Redis, in-process: our Lua scripts run under lupa over a Python keyspace.

    Replies are what redis-py (hiredis, RESP2, no response callbacks) returns from a real Redis
    7.0 for the same script or command: bytes, int, None, lists; an error reply raises
    ResponseError (an error nested in a script's array reply is a ResponseError in the list).
    Every call runs to completion without yielding, so a script is atomic on the event loop;
    use an instance from one thread only. Time comes from `clock` (seconds), read once per call:
    TIME, expiry and stream ids use it. With `max_volatile_bytes`, keys that carry a TTL are
    evicted least recently used first (before a call) while their approximate size is above it;
    keys without a TTL never are.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time,
                 max_volatile_bytes: int | None = None) -> None:
        if max_volatile_bytes is not None and max_volatile_bytes < 0:
            raise ValueError("max_volatile_bytes must be >= 0")
        self._clock = clock
        self._keyspace = Keyspace(max_volatile_bytes=max_volatile_bytes)
        self._scripting = Scripting(self._call, self._pcall)
        self._scripts: dict[str, tuple[Any, bytes]] = {}  # sha1 -> (function, sha1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(keys={len(self._keyspace.data)})"

    def _begin(self) -> Keyspace:
        keyspace = self._keyspace
        keyspace.upkeep(round(self._clock() * 1_000_000))
        return keyspace

    def script_load(self, source: str) -> str:
        """SCRIPT LOAD: compile once, keep by sha1."""
        body = source.encode()
        sha = hashlib.sha1(body).hexdigest()
        if sha not in self._scripts:
            self._scripts[sha] = (self._scripting.compile(body), sha.encode())
        return sha

    def evalsha(self, sha: str, keys: Sequence[str | bytes], args: Sequence[Arg]) -> Any:
        """EVALSHA: run a loaded script with KEYS and ARGV."""
        script = self._scripts.get(sha) or self._scripts.get(sha.lower())
        if script is None:
            raise ResponseError("NOSCRIPT No matching script. Please use EVAL.")
        self._begin()
        return self._scripting.run(script[0], script[1], _encode_all(keys), _encode_all(args))

    def execute(self, *command: Arg) -> Any:
        """One command, as a client sends it."""
        if not command:
            raise ValueError("no command")
        argv = tuple(_encode(arg) for arg in command)
        entry = _LOOKUP.get(argv[0]) or _LOOKUP.get(argv[0].lower())
        if entry is None:
            shown = "".join(f"'{text(arg[:128])}' " for arg in argv[1:])[:128]
            raise ResponseError(f"ERR unknown command '{text(argv[0][:128])}', with args "
                                f"beginning with: {shown}".replace("\r", " ").replace("\n", " "))
        handler, arity = entry
        if len(argv) != arity and (arity > 0 or len(argv) < -arity):
            raise ResponseError(f"ERR wrong number of arguments for "
                                f"'{text(argv[0].lower())}' command")
        reply = handler(self._begin(), argv)
        if isinstance(reply, Status):
            return bytes(reply)
        return _lists(reply) if isinstance(reply, Nested) else reply

    def scan(self, match: str | bytes) -> list[bytes]:
        """Every live key matching a Redis glob, as a full SCAN MATCH would return them."""
        return self._begin().scan(_encode(match))

    def info(self) -> Info:
        """Keys, approximate bytes (all and with a TTL), keys expired and evicted so far."""
        return self._keyspace.info()

    # -- from scripts --------------------------------------------------------------------------

    def _call(self, *args: Any) -> Any:
        """redis.call: a Redis error raises (as a Lua error the script may catch)."""
        for arg in args:
            if arg.__class__ is not bytes:
                args = _script_args(args)
                break
        else:
            if not args:
                raise ResponseError("ERR Please specify at least one argument for this redis "
                                    "lib call")
        try:
            handler, arity = _LOOKUP[args[0]]
        except KeyError:
            entry = _LOOKUP.get(args[0].lower())
            if entry is None:
                raise ResponseError("ERR Unknown Redis command called from script") from None
            handler, arity = entry
        if arity != len(args) and (arity > 0 or len(args) < -arity):
            raise ResponseError("ERR Wrong number of args calling Redis command from script")
        reply = handler(self._keyspace, args)
        kind = reply.__class__
        if kind is bytes or kind is int:
            return reply
        if reply is None:
            return False
        if kind is list or kind is Nested:
            return self._lua_list(reply)  # type: ignore[arg-type]
        return self._scripting.status(reply)

    def _pcall(self, *args: Any) -> Any:
        """redis.pcall: a Redis error comes back as {err = message}."""
        try:
            return self._call(*args)
        except ResponseError as exc:
            return self._scripting.error(exc.message.encode("utf-8", "surrogateescape"))

    def _lua_list(self, items: list[Reply]) -> Any:
        """An array reply as Redis gives it to Lua: a table, nil elements as false."""
        if items.__class__ is Nested or None in items:
            items = [False if item is None else self._lua_list(item) if isinstance(item, list)
                     else item for item in items]
        if len(items) > 1000:
            return self._scripting.table(items)
        return self._scripting.pack(*items)


def _lists(reply: Reply) -> Reply:
    return [_lists(item) for item in reply] if isinstance(reply, list) else reply


def _encode_all(values: Sequence[Arg]) -> list[bytes]:
    return [value.encode() if type(value) is str else value if type(value) is bytes
            else _encode(value) for value in values]


def _encode(value: Arg) -> bytes:
    """An argument as redis-py encodes it."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"invalid argument type: {type(value).__name__}")
    return b"%d" % value if isinstance(value, int) else repr(value).encode()


def _script_args(args: tuple[Any, ...]) -> Argv:
    """Arguments of redis.call: strings as they are, numbers as "%.17g", nothing else."""
    return tuple([arg if arg.__class__ is bytes else _number(arg) for arg in args])


def _number(arg: Any) -> bytes:
    kind = arg.__class__
    if kind is int:  # lupa gives an integral Lua number as an int
        return b"%d" % arg if -10**17 < arg < 10**17 else format_double(float(arg))
    if kind is float:
        return format_double(arg)
    raise ResponseError(_FROM_SCRIPT_ARGS)
