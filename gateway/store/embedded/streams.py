"""Stream commands: XADD XTRIM XRANGE XLEN.

A stream is two parallel lists (ids, entries) and the index of its first live entry: appending
is O(1), trimming from the head O(trimmed) (the dead prefix is dropped once it is half the
list), XRANGE bisects. An id `<ms>-<seq>` is held as one int, `ms << 64 | seq`.

Approximate trimming (`~`) trims exactly, within its LIMIT; Redis trims only whole radix-tree
nodes, so it may keep more entries than asked for.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

from .errors import SYNTAX, ResponseError
from .keyspace import Keyspace
from .parse import integer, unsigned
from .replies import Argv, Nested, Reply, Table

ENTRY_COST = 80  # approximate bytes an entry costs beyond its fields and values
MAX_ID = (1 << 128) - 1
_SEQ = (1 << 64) - 1
_BAD_ID = "ERR Invalid stream ID specified as stream command argument"
_APPROX_LIMIT = 100 * 100  # Redis: 100 * stream-node-max-entries


class Stream:
    __slots__ = ("entries", "head", "ids", "last", "size")

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.entries: list[tuple[bytes, ...] | None] = []
        self.head = 0
        self.last = 0
        self.size = 0

    def __len__(self) -> int:
        return len(self.ids) - self.head

    def append(self, id_: int, fields: tuple[bytes, ...]) -> int:
        self.ids.append(id_)
        self.entries.append(fields)
        self.last = id_
        delta = ENTRY_COST + sum(map(len, fields))
        self.size += delta
        return delta

    def trim(self, count: int) -> int:
        """Drop the first `count` entries; the size change."""
        delta = 0
        entries = self.entries
        for i in range(self.head, self.head + count):
            delta -= ENTRY_COST + sum(map(len, entries[i] or ()))
            entries[i] = None
        self.head += count
        if self.head > 64 and 2 * self.head > len(self.ids):
            del self.ids[:self.head], self.entries[:self.head]
            self.head = 0
        self.size += delta
        return delta


def _format(id_: int) -> bytes:
    return b"%d-%d" % (id_ >> 64, id_ & _SEQ)


def _parse_id(raw: bytes, missing_seq: int, *, strict: bool,
              star: bool = False) -> tuple[int, bool]:
    """`streamGenericParseIDOrReply`: (id, seq given); `star` accepts `<ms>-*` (XADD)."""
    if len(raw) > 127 or (strict and raw in (b"-", b"+")):
        raise ResponseError(_BAD_ID)
    if raw == b"-":
        return 0, True
    if raw == b"+":
        return MAX_ID, True
    ms_part, dash, seq_part = raw.partition(b"-")
    ms = unsigned(ms_part)
    if ms is None:
        raise ResponseError(_BAD_ID)
    if not dash:
        return ms << 64 | missing_seq, True
    if star and seq_part == b"*":
        return ms << 64, False
    seq = unsigned(seq_part)
    if seq is None:
        raise ResponseError(_BAD_ID)
    return ms << 64 | seq, True


class _Trim:
    """MAXLEN | MINID [=|~] threshold [LIMIT n], as XADD and XTRIM parse them."""

    def __init__(self) -> None:
        self.strategy = b""
        self.approx = False
        self.threshold = 0
        self.limit = 0

    def parse(self, argv: Argv, xadd: bool) -> tuple[int, bool, int | None, bool]:
        """Options from argv[2]: (index of the id, NOMKSTREAM, id given or None, seq given)."""
        i, n = 2, len(argv)
        limit_given, nomkstream, id_, seq_given = False, False, None, True
        while i < n:
            more = n - 1 - i
            opt = argv[i]
            lower = opt.lower()
            if xadd and opt == b"*":
                break
            if lower in (b"maxlen", b"minid") and more:
                if self.strategy:
                    raise ResponseError("ERR syntax error, MAXLEN and MINID options at the same "
                                        "time are not compatible")
                self.approx = False
                if more >= 2 and argv[i + 1] in (b"~", b"="):
                    self.approx = argv[i + 1] == b"~"
                    i += 1
                self.set(lower, argv[i + 1])
                i += 1
            elif lower == b"limit" and more:
                self.limit = integer(argv[i + 1])
                if self.limit < 0:
                    raise ResponseError("ERR The LIMIT argument must be >= 0.")
                limit_given = True
                i += 1
            elif xadd and lower == b"nomkstream":
                nomkstream = True
            elif xadd:
                id_, seq_given = _parse_id(opt, 0, strict=True, star=True)
                break
            else:
                raise ResponseError(SYNTAX)
            i += 1
        if self.limit and not self.strategy:
            raise ResponseError("ERR syntax error, LIMIT cannot be used without specifying a "
                                "trimming strategy")
        if not xadd and not self.strategy:
            raise ResponseError("ERR syntax error, XTRIM must be called with a trimming strategy")
        if limit_given and not self.approx:
            raise ResponseError("ERR syntax error, LIMIT cannot be used without the special ~ "
                                "option")
        if not limit_given:
            self.limit = _APPROX_LIMIT if self.approx else 0
        return i, nomkstream, id_, seq_given

    def set(self, strategy: bytes, threshold: bytes) -> None:
        """`maxlen` or `minid` (lowercase) and its threshold as given."""
        if strategy == b"maxlen":
            self.threshold = integer(threshold)
            if self.threshold < 0:
                raise ResponseError("ERR The MAXLEN argument must be >= 0.")
        else:
            self.threshold = _parse_id(threshold, 0, strict=True)[0]
        self.strategy = strategy

    def apply(self, ks: Keyspace, key: bytes, s: Stream) -> int:
        if self.strategy == b"maxlen":
            count = max(len(s) - self.threshold, 0)
        else:
            count = bisect_left(s.ids, self.threshold, lo=s.head) - s.head
        if self.limit:
            count = min(count, self.limit)
        if count:
            ks.resized(key, s.trim(count))
        return count


def _read(ks: Keyspace, key: bytes) -> Stream | None:
    return ks.lookup_typed(key, Stream)  # type: ignore[return-value]


def _exact(argv: Argv) -> _Trim | None:
    """`<key> MAXLEN|MINID <threshold>` from argv[1], the exact trim the ledger's scripts send on
    every request, parsed without the option loop; None for any other shape."""
    strategy = argv[2].lower()
    if strategy not in (b"maxlen", b"minid") or argv[3] in (b"~", b"="):
        return None
    trim = _Trim()
    trim.set(strategy, argv[3])
    return trim


def xadd(ks: Keyspace, argv: Argv) -> Reply:
    trim = _exact(argv) if len(argv) > 5 and len(argv) % 2 and argv[4] == b"*" else None
    if trim is None:
        trim = _Trim()
        at, nomkstream, given, seq_given = trim.parse(argv, xadd=True)
    else:
        at, nomkstream, given, seq_given = 4, False, None, True
    fields = argv[at + 1:]
    if len(fields) < 2 or len(fields) % 2:
        raise ResponseError("ERR wrong number of arguments for 'xadd' command")
    if given == 0 and seq_given:
        raise ResponseError("ERR The ID specified in XADD must be greater than 0-0")
    key = argv[1]
    s = _read(ks, key)
    if s is None:
        if nomkstream:
            return None
        s = Stream()
        ks.add(key, s)
    if s.last == MAX_ID:
        raise ResponseError("ERR The stream has exhausted the last possible ID, unable to add "
                            "more items")
    if given is None:  # `*`: the clock, kept monotonic
        id_ = ks.now << 64 if ks.now > s.last >> 64 else s.last + 1
    elif not seq_given and given >> 64 == s.last >> 64:  # `<ms>-*` on the last entry's ms
        id_ = s.last + 1 if s.last & _SEQ != _SEQ else 0
    else:
        id_ = given
    if id_ <= s.last:
        raise ResponseError("ERR The ID specified in XADD is equal or smaller than the target "
                            "stream top item")
    ks.resized(key, s.append(id_, fields))
    if trim.strategy:
        trim.apply(ks, key, s)
    return _format(id_)


def xtrim(ks: Keyspace, argv: Argv) -> Reply:
    trim = _exact(argv) if len(argv) == 4 else None
    if trim is None:
        trim = _Trim()
        trim.parse(argv, xadd=False)
    s = _read(ks, argv[1])
    return 0 if s is None else trim.apply(ks, argv[1], s)


def _interval(raw: bytes, missing_seq: int) -> tuple[int, bool]:
    if len(raw) > 1 and raw[:1] == b"(":
        return _parse_id(raw[1:], missing_seq, strict=True)[0], True
    return _parse_id(raw, missing_seq, strict=False)[0], False


def xrange(ks: Keyspace, argv: Argv) -> Reply:
    start, start_ex = _interval(argv[2], 0)
    if start_ex:
        if start == MAX_ID:
            raise ResponseError("ERR invalid start ID for the interval")
        start += 1
    end, end_ex = _interval(argv[3], _SEQ)
    if end_ex:
        if end == 0:
            raise ResponseError("ERR invalid end ID for the interval")
        end -= 1
    count = -1
    j = 4
    while j < len(argv):
        if argv[j].lower() == b"count" and j + 1 < len(argv):
            count = max(integer(argv[j + 1]), 0)
            j += 2
        else:
            raise ResponseError(SYNTAX)
    s = _read(ks, argv[1])
    if s is None:
        return []
    if count == 0:
        return None
    lo = bisect_left(s.ids, start, lo=s.head)
    hi = bisect_right(s.ids, end, lo=lo)
    if count > 0:
        hi = min(hi, lo + count)
    return Nested([Nested([_format(s.ids[i]), list(s.entries[i] or ())]) for i in range(lo, hi)])


def xlen(ks: Keyspace, argv: Argv) -> Reply:
    s = _read(ks, argv[1])
    return 0 if s is None else len(s)


COMMANDS: Table = {
    b"xadd": (xadd, -5), b"xtrim": (xtrim, -4), b"xrange": (xrange, -4), b"xlen": (xlen, 2),
}
