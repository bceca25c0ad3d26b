"""Set commands: SADD SREM SISMEMBER SMEMBERS SCARD."""

from __future__ import annotations

from .keyspace import Keyspace
from .replies import Argv, Reply, Table

MEMBER_COST = 40  # approximate bytes a member costs beyond its bytes


class Set(dict[bytes, None]):
    """Members in insertion order (Redis leaves the order unspecified), with a size."""

    __slots__ = ("size",)

    def __init__(self) -> None:
        super().__init__()
        self.size = 0


def _read(ks: Keyspace, key: bytes) -> Set | None:
    return ks.lookup_typed(key, Set)  # type: ignore[return-value]


def sadd(ks: Keyspace, argv: Argv) -> Reply:
    key = argv[1]
    s = _read(ks, key)
    if s is None:
        s = Set()
        ks.add(key, s)
    added = delta = 0
    for member in argv[2:]:
        if member not in s:
            s[member] = None
            added += 1
            delta += MEMBER_COST + len(member)
    s.size += delta
    ks.resized(key, delta)
    return added


def srem(ks: Keyspace, argv: Argv) -> Reply:
    key = argv[1]
    s = _read(ks, key)
    if s is None:
        return 0
    removed = delta = 0
    for member in argv[2:]:
        if member in s:
            del s[member]
            removed += 1
            delta -= MEMBER_COST + len(member)
    if not s:
        ks.delete(key)
    else:
        s.size += delta
        ks.resized(key, delta)
    return removed


def sismember(ks: Keyspace, argv: Argv) -> Reply:
    s = _read(ks, argv[1])
    return int(s is not None and argv[2] in s)


def smembers(ks: Keyspace, argv: Argv) -> Reply:
    s = _read(ks, argv[1])
    return [] if s is None else list(s)


def scard(ks: Keyspace, argv: Argv) -> Reply:
    s = _read(ks, argv[1])
    return 0 if s is None else len(s)


COMMANDS: Table = {
    b"sadd": (sadd, -3), b"srem": (srem, -3), b"sismember": (sismember, 3),
    b"smembers": (smembers, 2), b"scard": (scard, 2),
}
