"""String and keyspace commands: GET SET INCR[BY] DECR[BY], DEL UNLINK EXISTS TYPE, TTLs, TIME."""

from __future__ import annotations

from .errors import OVERFLOW, SYNTAX, ResponseError
from .hashes import Hash
from .keyspace import Keyspace
from .parse import LLONG_MAX, LLONG_MIN, integer
from .replies import OK, Argv, Reply, Status, Table, text
from .sets import Set
from .streams import Stream
from .zsets import ZSet

TYPES = {bytes: Status(b"string"), Hash: Status(b"hash"), Set: Status(b"set"),
         ZSet: Status(b"zset"), Stream: Status(b"stream")}
_NX, _XX, _GET, _KEEPTTL, _EX, _PX, _EXAT, _PXAT = (1 << i for i in range(8))
_EXPIRES = _EX | _PX | _EXAT | _PXAT


def get(ks: Keyspace, argv: Argv) -> Reply:
    return ks.lookup_typed(argv[1], bytes)  # type: ignore[return-value]


def set_(ks: Keyspace, argv: Argv) -> Reply:
    if len(argv) == 3:  # the common forms first: SET k v, SET k v PX ms
        ks.replace(argv[1], argv[2])
        return OK
    if len(argv) == 5 and argv[3] in (b"PX", b"px"):
        deadline = _deadline(ks, argv[4], _PX)
        ks.replace(argv[1], argv[2], keep_ttl=True)
        ks.set_deadline(argv[1], deadline)
        return OK
    flags, expire = 0, b""
    j, n = 3, len(argv)
    while j < n:
        opt = argv[j].lower()
        more = j + 1 < n
        if opt == b"nx" and not flags & _XX:
            flags |= _NX
        elif opt == b"xx" and not flags & _NX:
            flags |= _XX
        elif opt == b"get":
            flags |= _GET
        elif opt == b"keepttl" and not flags & _EXPIRES:
            flags |= _KEEPTTL
        elif opt in _UNITS and more and not flags & (_KEEPTTL | (_EXPIRES & ~_UNITS[opt])):
            flags |= _UNITS[opt]
            expire = argv[j + 1]
            j += 1
        else:
            raise ResponseError(SYNTAX)
        j += 1
    key = argv[1]
    when = _deadline(ks, expire, flags) if flags & _EXPIRES else None
    old: Reply = ks.lookup_typed(key, bytes) if flags & _GET else None  # type: ignore[assignment]
    found = ks.lookup(key) is not None
    if (flags & _NX and found) or (flags & _XX and not found):
        return old
    ks.replace(key, argv[2], keep_ttl=bool(flags & _KEEPTTL))
    if when is not None:
        ks.set_deadline(key, when)
    return old if flags & _GET else OK


_UNITS = {b"ex": _EX, b"px": _PX, b"exat": _EXAT, b"pxat": _PXAT}


def _deadline(ks: Keyspace, raw: bytes, flags: int) -> int:
    value = integer(raw)
    seconds = bool(flags & (_EX | _EXAT))
    if value <= 0 or (seconds and value > LLONG_MAX // 1000):
        raise ResponseError("ERR invalid expire time in 'set' command")
    if seconds:
        value *= 1000
    if flags & (_EX | _PX):
        value += ks.now
    if value > LLONG_MAX:
        raise ResponseError("ERR invalid expire time in 'set' command")
    return value


def _incr(ks: Keyspace, key: bytes, by: int) -> int:
    old = ks.lookup_typed(key, bytes)
    value = 0 if old is None else integer(old)  # type: ignore[arg-type]
    if (by < 0 and value < 0 and by < LLONG_MIN - value) or (
            by > 0 and value > 0 and by > LLONG_MAX - value):
        raise ResponseError(OVERFLOW)
    value += by
    ks.replace(key, b"%d" % value, keep_ttl=True)
    return value


def incr(ks: Keyspace, argv: Argv) -> Reply:
    return _incr(ks, argv[1], 1)


def decr(ks: Keyspace, argv: Argv) -> Reply:
    return _incr(ks, argv[1], -1)


def incrby(ks: Keyspace, argv: Argv) -> Reply:
    return _incr(ks, argv[1], integer(argv[2]))


def decrby(ks: Keyspace, argv: Argv) -> Reply:
    by = integer(argv[2])
    if by == LLONG_MIN:
        raise ResponseError("ERR decrement would overflow")
    return _incr(ks, argv[1], -by)


def delete(ks: Keyspace, argv: Argv) -> Reply:
    return sum(1 for key in argv[1:] if ks.lookup(key) is not None and ks.delete(key))


def exists(ks: Keyspace, argv: Argv) -> Reply:
    if len(argv) == 2:
        return 0 if ks.lookup(argv[1]) is None else 1
    return sum(1 for key in argv[1:] if ks.lookup(key) is not None)


def type_(ks: Keyspace, argv: Argv) -> Reply:
    value = ks.lookup(argv[1])
    return Status(b"none") if value is None else TYPES[value.__class__]


def _ttl(ks: Keyspace, key: bytes) -> int:
    if ks.lookup(key) is None:
        return -2
    when = ks.deadline(key)
    return -1 if when is None else max(when - ks.now, 0)


def pttl(ks: Keyspace, argv: Argv) -> Reply:
    return _ttl(ks, argv[1])


def ttl(ks: Keyspace, argv: Argv) -> Reply:
    ms = _ttl(ks, argv[1])
    return ms if ms < 0 else (ms + 500) // 1000


def _expire(ks: Keyspace, argv: Argv, unit: int) -> Reply:
    name = "expire" if unit == 1000 else "pexpire"
    if len(argv) == 3 and unit == 1:  # the common form: PEXPIRE key ms
        when = integer(argv[2])
        if when > LLONG_MAX - ks.now:
            raise ResponseError(f"ERR invalid expire time in '{name}' command")
        when += ks.now
        if ks.lookup(argv[1]) is None:
            return 0
        if when <= ks.now:
            ks.delete(argv[1])
        else:
            ks.set_deadline(argv[1], when)
        return 1
    flags: set[bytes] = set()
    for opt in argv[3:]:
        if opt.lower() not in (b"nx", b"xx", b"gt", b"lt"):
            raise ResponseError(f"ERR Unsupported option {text(opt)}")
        flags.add(opt.lower())
    if b"nx" in flags and flags & {b"xx", b"gt", b"lt"}:
        raise ResponseError("ERR NX and XX, GT or LT options at the same time are not compatible")
    if b"gt" in flags and b"lt" in flags:
        raise ResponseError("ERR GT and LT options at the same time are not compatible")
    when = integer(argv[2])
    if unit == 1000:
        if when > LLONG_MAX // 1000 or when < -(-LLONG_MIN // 1000):
            raise ResponseError(f"ERR invalid expire time in '{name}' command")
        when *= 1000
    if when > LLONG_MAX - ks.now:
        raise ResponseError(f"ERR invalid expire time in '{name}' command")
    when += ks.now
    key = argv[1]
    if ks.lookup(key) is None:
        return 0
    current = ks.deadline(key)
    if ((b"nx" in flags and current is not None) or (b"xx" in flags and current is None)
            or (b"gt" in flags and (current is None or when <= current))
            or (b"lt" in flags and current is not None and when >= current)):
        return 0
    if when <= ks.now:
        ks.delete(key)
    else:
        ks.set_deadline(key, when)
    return 1


def pexpire(ks: Keyspace, argv: Argv) -> Reply:
    return _expire(ks, argv, 1)


def expire(ks: Keyspace, argv: Argv) -> Reply:
    return _expire(ks, argv, 1000)


def persist(ks: Keyspace, argv: Argv) -> Reply:
    return 1 if ks.lookup(argv[1]) is not None and ks.persist(argv[1]) else 0


def time(ks: Keyspace, argv: Argv) -> Reply:
    return [b"%d" % (ks.now_us // 1_000_000), b"%d" % (ks.now_us % 1_000_000)]


COMMANDS: Table = {
    b"get": (get, 2), b"set": (set_, -3), b"incr": (incr, 2), b"decr": (decr, 2),
    b"incrby": (incrby, 3), b"decrby": (decrby, 3), b"del": (delete, -2),
    b"unlink": (delete, -2), b"exists": (exists, -2), b"type": (type_, 2), b"pttl": (pttl, 2),
    b"ttl": (ttl, 2), b"pexpire": (pexpire, -3), b"expire": (expire, -3),
    b"persist": (persist, 2), b"time": (time, 1),
}
