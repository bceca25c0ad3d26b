"""Hash commands: HGET HSET HSETNX HMGET HDEL HINCRBY HGETALL HLEN HEXISTS."""

from __future__ import annotations

from .errors import OVERFLOW, ResponseError
from .keyspace import Keyspace
from .parse import LLONG_MAX, LLONG_MIN, as_integer, integer
from .replies import Argv, Reply, Table

FIELD_COST = 48  # approximate bytes a field costs beyond its name and value


class Hash(dict[bytes, bytes]):
    """Fields in insertion order (Redis's listpack order for small hashes), with a size."""

    __slots__ = ("size",)

    def __init__(self) -> None:
        super().__init__()
        self.size = 0


def _read(ks: Keyspace, key: bytes) -> Hash | None:
    return ks.lookup_typed(key, Hash)  # type: ignore[return-value]


def _write(ks: Keyspace, key: bytes) -> Hash:
    found = _read(ks, key)
    if found is not None:
        return found
    created = Hash()
    ks.add(key, created)
    return created


def _put(ks: Keyspace, key: bytes, h: Hash, field: bytes, value: bytes) -> bool:
    old = h.get(field)
    h[field] = value
    delta = FIELD_COST + len(field) + len(value) if old is None else len(value) - len(old)
    h.size += delta
    ks.resized(key, delta)
    return old is None


def hset(ks: Keyspace, argv: Argv) -> Reply:
    if len(argv) % 2:
        raise ResponseError("ERR wrong number of arguments for 'hset' command")
    key = argv[1]
    h = _write(ks, key)
    added = delta = 0
    for i in range(2, len(argv), 2):
        field, value = argv[i], argv[i + 1]
        old = h.get(field)
        h[field] = value
        if old is None:
            added += 1
            delta += FIELD_COST + len(field) + len(value)
        else:
            delta += len(value) - len(old)
    if delta:
        h.size += delta
        ks.resized(key, delta)
    return added


def hsetnx(ks: Keyspace, argv: Argv) -> Reply:
    key = argv[1]
    h = _write(ks, key)
    if argv[2] in h:
        return 0
    return int(_put(ks, key, h, argv[2], argv[3]))


def hget(ks: Keyspace, argv: Argv) -> Reply:
    h = _read(ks, argv[1])
    return None if h is None else h.get(argv[2])


def hmget(ks: Keyspace, argv: Argv) -> Reply:
    h = _read(ks, argv[1])
    if h is None:
        return [None] * (len(argv) - 2)
    get = h.get
    return [get(field) for field in argv[2:]]


def hdel(ks: Keyspace, argv: Argv) -> Reply:
    key = argv[1]
    h = _read(ks, key)
    if h is None:
        return 0
    removed = delta = 0
    for field in argv[2:]:
        value = h.pop(field, None)
        if value is not None:
            removed += 1
            delta -= FIELD_COST + len(field) + len(value)
    if not h:
        ks.delete(key)
    elif delta:
        h.size += delta
        ks.resized(key, delta)
    return removed


def hincrby(ks: Keyspace, argv: Argv) -> Reply:
    by = integer(argv[3])
    key, field = argv[1], argv[2]
    h = _write(ks, key)
    old = h.get(field)
    value = 0 if old is None else as_integer(old)
    if value is None:
        raise ResponseError("ERR hash value is not an integer")
    if (by < 0 and value < 0 and by < LLONG_MIN - value) or (
            by > 0 and value > 0 and by > LLONG_MAX - value):
        raise ResponseError(OVERFLOW)
    value += by
    raw = b"%d" % value
    h[field] = raw
    delta = FIELD_COST + len(field) + len(raw) if old is None else len(raw) - len(old)
    if delta:
        h.size += delta
        ks.resized(key, delta)
    return value


def hgetall(ks: Keyspace, argv: Argv) -> Reply:
    h = _read(ks, argv[1])
    out: list[Reply] = []
    if h is not None:
        for field, value in h.items():
            out += (field, value)
    return out


def hlen(ks: Keyspace, argv: Argv) -> Reply:
    h = _read(ks, argv[1])
    return 0 if h is None else len(h)


def hexists(ks: Keyspace, argv: Argv) -> Reply:
    h = _read(ks, argv[1])
    return int(h is not None and argv[2] in h)


COMMANDS: Table = {
    b"hset": (hset, -4), b"hsetnx": (hsetnx, 4), b"hget": (hget, 3), b"hmget": (hmget, -3),
    b"hdel": (hdel, -3), b"hincrby": (hincrby, 4), b"hgetall": (hgetall, 2),
    b"hlen": (hlen, 2), b"hexists": (hexists, 3),
}
