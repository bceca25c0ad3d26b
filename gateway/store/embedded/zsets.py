"""Sorted-set commands: ZADD ZREM ZSCORE ZCARD ZCOUNT ZRANGEBYSCORE ZPOPMIN.

Members are kept in a list sorted by (score, member), as Redis orders them, next to a dict of
scores: lookups are O(1), ranges O(log n + m), an insert or removal moves list pointers (O(n),
a memmove; fine for the sizes a gateway keeps).
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right, insort
from operator import itemgetter

from .errors import SYNTAX, ResponseError
from .keyspace import Keyspace
from .parse import LLONG_MAX, double, format_double, integer, strtod
from .replies import Argv, Reply, Table

MEMBER_COST = 64  # approximate bytes a member costs beyond its bytes
_score = itemgetter(0)


class ZSet:
    __slots__ = ("order", "scores", "size")

    def __init__(self) -> None:
        self.scores: dict[bytes, float] = {}
        self.order: list[tuple[float, bytes]] = []
        self.size = 0

    def add(self, member: bytes, score: float) -> int:
        """Insert or move `member`; the size change. A score of -0 is kept as 0, as Redis's
        listpack keeps an integral score as an integer."""
        score += 0.0
        old = self.scores.get(member)
        if old is not None:
            del self.order[bisect_left(self.order, (old, member))]
        self.scores[member] = score
        insort(self.order, (score, member))
        if old is not None:
            return 0
        self.size += MEMBER_COST + len(member)
        return MEMBER_COST + len(member)

    def remove(self, member: bytes) -> int:
        score = self.scores.pop(member)
        del self.order[bisect_left(self.order, (score, member))]
        self.size -= MEMBER_COST + len(member)
        return -(MEMBER_COST + len(member))


def _read(ks: Keyspace, key: bytes) -> ZSet | None:
    return ks.lookup_typed(key, ZSet)  # type: ignore[return-value]


def zadd(ks: Keyspace, argv: Argv) -> Reply:
    flags: set[bytes] = set()
    i = 2
    while i < len(argv) and argv[i].lower() in (b"nx", b"xx", b"gt", b"lt", b"ch", b"incr"):
        flags.add(argv[i].lower())
        i += 1
    pairs = len(argv) - i
    if pairs % 2 or not pairs:
        raise ResponseError(SYNTAX)
    nx, xx, gt, lt, incr = (f in flags for f in (b"nx", b"xx", b"gt", b"lt", b"incr"))
    if nx and xx:
        raise ResponseError("ERR XX and NX options at the same time are not compatible")
    if (gt and nx) or (lt and nx) or (gt and lt):
        raise ResponseError("ERR GT, LT, and/or NX options at the same time are not compatible")
    if incr and pairs > 2:
        raise ResponseError("ERR INCR option supports a single increment-element pair")
    scores = [double(argv[j]) for j in range(i, len(argv), 2)]
    key = argv[1]
    z = _read(ks, key)
    added = changed = processed = 0
    score = 0.0
    if z is None and not xx:
        z = ZSet()
        ks.add(key, z)
    if z is not None:
        for score, j in zip(scores, range(i + 1, len(argv), 2), strict=True):
            member = argv[j]
            current = z.scores.get(member)
            if current is None:
                if xx:
                    continue
                ks.resized(key, z.add(member, score))
                added += 1
            else:
                if nx:
                    continue
                if incr:
                    score += current
                    if math.isnan(score):
                        raise ResponseError("ERR resulting score is not a number (NaN)")
                if (lt and score >= current) or (gt and score <= current):
                    continue
                if score != current:
                    z.add(member, score)
                    changed += 1
            processed += 1
    if incr:
        return format_double(score) if processed else None
    return added + changed if b"ch" in flags else added


def zrem(ks: Keyspace, argv: Argv) -> Reply:
    key = argv[1]
    z = _read(ks, key)
    if z is None:
        return 0
    removed = 0
    for member in argv[2:]:
        if member in z.scores:
            ks.resized(key, z.remove(member))
            removed += 1
    if not z.scores:
        ks.delete(key)
    return removed


def zscore(ks: Keyspace, argv: Argv) -> Reply:
    z = _read(ks, argv[1])
    score = None if z is None else z.scores.get(argv[2])
    return None if score is None else format_double(score)


def zcard(ks: Keyspace, argv: Argv) -> Reply:
    z = _read(ks, argv[1])
    return 0 if z is None else len(z.scores)


def _bound(raw: bytes) -> tuple[float, bool]:
    """`zslParseRange`: "(" makes it exclusive; C strtod, then nothing else but a NUL."""
    exclusive = raw[:1] == b"("
    body = raw[1:] if exclusive else raw
    value, used, _ = strtod(body)
    rest = body[used:]
    if (rest and rest[0] != 0) or math.isnan(value):
        raise ResponseError("ERR min or max is not a float")
    return value, exclusive


def zcount(ks: Keyspace, argv: Argv) -> Reply:
    low, low_ex = _bound(argv[2])
    high, high_ex = _bound(argv[3])
    z = _read(ks, argv[1])
    if z is None:
        return 0
    order = z.order
    start = (bisect_right if low_ex else bisect_left)(order, low, key=_score)
    end = (bisect_left if high_ex else bisect_right)(order, high, key=_score)
    return max(end - start, 0)


def zrangebyscore(ks: Keyspace, argv: Argv) -> Reply:
    withscores, offset, limit = False, 0, -1
    j = 4
    while j < len(argv):
        opt = argv[j].lower()
        if opt == b"withscores":
            withscores = True
        elif opt == b"limit" and len(argv) - j - 1 >= 2:
            offset, limit = integer(argv[j + 1]), integer(argv[j + 2])
            j += 2
        else:
            raise ResponseError(SYNTAX)
        j += 1
    low, low_ex = _bound(argv[2])
    high, high_ex = _bound(argv[3])
    z = _read(ks, argv[1])
    if z is None or offset < 0 or (offset > 0 and offset >= len(z.scores)):
        return []
    order = z.order
    start = (bisect_right if low_ex else bisect_left)(order, low, key=_score) + offset
    end = (bisect_left if high_ex else bisect_right)(order, high, key=_score)
    if limit >= 0:
        end = min(end, start + limit)
    out: list[Reply] = []
    for score, member in order[start:end]:
        out.append(member)
        if withscores:
            out.append(format_double(score))
    return out


def zpopmin(ks: Keyspace, argv: Argv) -> Reply:
    if len(argv) > 3:
        raise ResponseError(SYNTAX)
    count = 1
    if len(argv) == 3:
        count = integer(argv[2])
        if not 0 <= count <= LLONG_MAX:
            raise ResponseError("ERR value is out of range, must be positive")
    key = argv[1]
    z = _read(ks, key)
    out: list[Reply] = []
    if z is None:
        return out
    for score, member in z.order[:count]:
        ks.resized(key, z.remove(member))
        out += (member, format_double(score))
    if not z.scores:
        ks.delete(key)
    return out


COMMANDS: Table = {
    b"zadd": (zadd, -4), b"zrem": (zrem, -3), b"zscore": (zscore, 3), b"zcard": (zcard, 2),
    b"zcount": (zcount, 4),
    b"zrangebyscore": (zrangebyscore, -4), b"zpopmin": (zpopmin, -2),
}
