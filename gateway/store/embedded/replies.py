"""What commands return, and the shape of a command table."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

from .keyspace import Keyspace


class Status(bytes):
    """A status reply (`+OK`): a script sees `{ok=...}`, a caller its bytes."""


OK = Status(b"OK")


class Nested(list["Reply"]):
    """An array reply holding arrays (XRANGE): the only kind a script gets tables in tables."""


Reply: TypeAlias = bytes | int | list["Reply"] | None
Argv = tuple[bytes, ...]
Handler = Callable[[Keyspace, Argv], Reply]
Table = dict[bytes, tuple[Handler, int]]  # lowercase name -> (handler, arity as Redis counts it)


def text(raw: bytes) -> str:
    """Client bytes inside an error message, losslessly."""
    return raw.decode("utf-8", "surrogateescape")
