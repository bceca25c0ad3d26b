"""Lua 5.1 (lupa) set up as Redis's scripting engine; `runtime.lua` holds the Lua side.

Lua strings cross as bytes (`encoding=None`). `redis.call`, `redis.pcall`, `redis.sha1hex` and
`cjson.decode` are Python functions, which Lua calls as C functions: a script's frame stays on
the stack under them, so errors report the script's line as Redis does. Python objects are
opaque to scripts (no attribute access).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from importlib import resources
from typing import Any

from lupa import lua51  # type: ignore[import-untyped]

from . import cjson
from .errors import ResponseError
from .parse import format_double

logger = logging.getLogger("gateway.store.embedded")
_LEVELS = (logging.DEBUG, logging.DEBUG, logging.INFO, logging.WARNING)
_VARARGS = 4000  # more arguments than this go to Lua in tables (the C stack holds ~8000)
_CACHED_DOCUMENTS, _CACHED_DOCUMENT = 256, 1024  # how many decoded documents, up to what size


class LuaStringError(Exception):
    """A Lua error message raised from Python, as `luaL_error` raises one from C."""


def _opaque(obj: object, name: str, is_setting: bool) -> str:
    raise AttributeError("not accessible from Lua")


def lua_number_text(value: float) -> bytes:
    """A Lua number as `tostring` writes it ("%.14g")."""
    if value != value or value in (float("inf"), float("-inf")):
        return format_double(value)
    return b"%.14g" % value


def _describe(error: object) -> tuple[int, bytes | None]:
    """What a Python exception that crossed into Lua was: 1 a Redis error, 2 a Lua error."""
    if isinstance(error, ResponseError):
        return 1, error.message.encode("utf-8", "surrogateescape")
    if isinstance(error, LuaStringError):
        return 2, error.args[0]
    return 0, None


def _reply_error(message: bytes) -> ResponseError:
    return ResponseError(message.decode("utf-8", "surrogateescape"))


def _reply_list(*items: Any) -> list[Any]:
    return list(items)


def _extend(items: list[Any], *more: Any) -> None:
    items.extend(more)


def _sha1hex(*args: Any) -> bytes:
    if len(args) != 1:
        raise ResponseError("ERR wrong number of arguments")
    value = args[0]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = lua_number_text(value)
    return hashlib.sha1(value if isinstance(value, bytes) else b"").hexdigest().encode()


def _log(level: float, message: bytes) -> None:
    logger.log(_LEVELS[int(level)], "%s", message.decode("utf-8", "replace"))


class Scripting:
    """Compiles scripts and runs them; `call` and `pcall` are redis.call and redis.pcall."""

    def __init__(self, call: Callable[..., Any], pcall: Callable[..., Any]) -> None:
        self._lua = lua51.LuaRuntime(encoding=None, unpack_returned_tuples=True,
                                     register_eval=False, register_builtins=False,
                                     attribute_filter=_opaque)
        source = resources.files(__package__).joinpath("runtime.lua").read_bytes()
        chunk = self._lua.globals().loadstring(source, b"=embedded-redis")
        if isinstance(chunk, tuple):
            raise RuntimeError(chunk[1])
        api = chunk(call, pcall, _sha1hex, self._decode, _describe, _reply_error, _reply_list,
                    _extend, _log)
        self._run, self._run_tables, self._compile = api.run, api.run_tables, api.compile
        self._where, self._null = api.where, api.null
        self.pack, self.status, self.error = api.pack, api.status, api.error
        self.table = self._lua.table_from
        # documents decoded lately (a cache entry's header is decoded on every hit), as Python
        # values: the Lua tables are made anew from them
        self._decoded: dict[bytes, Any] = {}

    def compile(self, source: bytes) -> Any:
        """The script as a Lua function; a compile error raises as Redis reports it."""
        result = self._compile(source)
        if isinstance(result, tuple):
            message = result[1].decode("utf-8", "surrogateescape").replace("\r", " ")
            raise ResponseError("ERR Error compiling script (new function): "
                                + message.replace("\n", " "))
        return result

    def run(self, function: Any, sha: bytes, keys: list[bytes], args: list[bytes]) -> Any:
        """The script's reply, converted as Redis converts it; an error reply raises."""
        if len(keys) + len(args) <= _VARARGS:
            result = self._run(function, sha, len(keys), *keys, *args)
        else:
            result = self._run_tables(function, sha, self.table(keys), self.table(args))
        if result[0]:
            if result[1]:  # an array of plain values, as values
                return list(result[2:])
            reply = result[2]
            if reply.__class__ is ResponseError:
                raise reply
            return reply
        if result[2] is not None:
            raise result[2]  # a bug in a command, not an error a script made
        raise ResponseError(result[1].decode("utf-8", "surrogateescape"))

    def _decode(self, *args: Any) -> Any:
        """cjson.decode: a Lua value, or a Lua error such as lua-cjson raises."""
        if len(args) != 1:
            raise LuaStringError(self._where() + b"bad argument #1 to 'decode' (expected 1 "
                                 b"argument)")
        data = args[0]
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            data = lua_number_text(data)
        elif not isinstance(data, bytes):
            raise LuaStringError(self._where() + b"bad argument #1 to 'decode' (string "
                                 b"expected, got " + _lua_type(data) + b")")
        value = self._decoded.get(data)
        if value is None:
            try:
                value = cjson.decode(data, self._null)
            except cjson.DecodeError as exc:
                raise LuaStringError(self._where() + str(exc).encode()) from None
            if len(data) <= _CACHED_DOCUMENT:
                if len(self._decoded) >= _CACHED_DOCUMENTS:
                    self._decoded.clear()
                self._decoded[data] = value
        if isinstance(value, (dict, list)):  # a new table each time: scripts change them
            return self.table(value, recursive=True)
        return value


def _lua_type(value: Any) -> bytes:
    if value is None:
        return b"nil"
    if isinstance(value, bool):
        return b"boolean"
    kind = lua51.lua_type(value)
    return kind.encode() if isinstance(kind, str) else b"userdata"
