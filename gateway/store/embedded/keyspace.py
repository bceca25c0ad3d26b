"""The keyspace: values by key, expiry on the injected clock, volatile-lru eviction, sizes.

Expiry is lazy (a key past its deadline is gone when next touched) plus a bounded active sweep.
Keys with a deadline wait in one FIFO queue per power of two of their TTL: re-expiring a key
moves it to the back of its queue (O(1), no memory per call), and the sweep only ever looks at
queue heads. A head blocks only keys of a TTL within a factor of two of its own, so a key is
reclaimed at the latest about twice its TTL after it was set; lazy expiry makes it invisible
on time.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

from .errors import WRONGTYPE, ResponseError

KEY_COST = 64  # approximate bytes a key costs beyond its name and value
SWEEP_BUDGET = 32  # expired keys reclaimed at most per call


class Sized(Protocol):
    size: int


Value = bytes | Sized


@dataclass(frozen=True)
class Info:
    """What the keyspace holds: keys, approximate bytes, and what expiry and eviction removed."""

    keys: int
    bytes: int
    volatile_keys: int
    volatile_bytes: int
    expired: int
    evicted: int


class Keyspace:
    """Keys to values. A value is `bytes` (a string) or a collection carrying its own `size`."""

    def __init__(self, *, max_volatile_bytes: int | None = None) -> None:
        self.data: dict[bytes, Value] = {}
        self.expires: dict[bytes, tuple[int, OrderedDict[bytes, int]]] = {}
        self.now = 0  # ms, fixed for the duration of one command or script
        self.now_us = 0
        self.bytes = 0
        self.volatile_bytes = 0
        self._limit = max_volatile_bytes or 0
        self._queues: dict[int, OrderedDict[bytes, int]] = {}
        self._next_sweep = 0
        self._lru: OrderedDict[bytes, None] | None = (
            None if max_volatile_bytes is None else OrderedDict())
        self.expired = 0
        self.evicted = 0

    def info(self) -> Info:
        return Info(len(self.data), self.bytes, len(self.expires), self.volatile_bytes,
                    self.expired, self.evicted)

    # -- access --------------------------------------------------------------------------------

    def lookup(self, key: bytes) -> Value | None:
        """The live value at `key` (an expired key is deleted now), touching it for the LRU."""
        value = self.data.get(key)
        if value is None:
            return None
        deadline = self.expires.get(key)
        if deadline is not None:
            if deadline[0] < self.now:
                self._expire(key)
                return None
            if self._lru is not None:
                self._lru.move_to_end(key)
        return value

    def lookup_typed(self, key: bytes, kind: type) -> Value | None:
        value = self.lookup(key)
        if value is None or value.__class__ is kind:
            return value
        raise ResponseError(WRONGTYPE)

    def add(self, key: bytes, value: Value) -> None:
        """A new key (none lives at `key`), without a deadline."""
        self.data[key] = value
        self.bytes += cost(key, value)

    def replace(self, key: bytes, value: bytes, *, keep_ttl: bool = False) -> None:
        """SET: `value` at `key`, whatever was there; its deadline kept only if asked."""
        old = self.data.get(key)
        if old is None:
            self.add(key, value)
            return
        if not keep_ttl and key in self.expires:
            self.persist(key)
        delta = cost(key, value) - cost(key, old)
        self.data[key] = value
        self.resized(key, delta)

    def resized(self, key: bytes, delta: int) -> None:
        """The value at `key` grew (or shrank) by about `delta` bytes."""
        self.bytes += delta
        if key in self.expires:
            self.volatile_bytes += delta

    def delete(self, key: bytes) -> bool:
        value = self.data.pop(key, None)
        if value is None:
            return False
        size = cost(key, value)
        self.bytes -= size
        deadline = self.expires.pop(key, None)
        if deadline is not None:
            del deadline[1][key]
            self.volatile_bytes -= size
            if self._lru is not None:
                del self._lru[key]
        return True

    # -- deadlines -----------------------------------------------------------------------------

    def deadline(self, key: bytes) -> int | None:
        entry = self.expires.get(key)
        return None if entry is None else entry[0]

    def set_deadline(self, key: bytes, when: int) -> None:
        """`key` (which lives) expires once the clock passes `when` (ms)."""
        old = self.expires.get(key)
        if old is None:
            self.volatile_bytes += cost(key, self.data[key])
            if self._lru is not None:
                self._lru[key] = None
        else:
            del old[1][key]
            if self._lru is not None:
                self._lru.move_to_end(key)
        ttl = when - self.now
        band = ttl.bit_length() if ttl > 0 else 0
        queue = self._queues.get(band)
        if queue is None:
            queue = self._queues[band] = OrderedDict()
        queue[key] = when
        self.expires[key] = (when, queue)
        if when < self._next_sweep:
            self._next_sweep = when

    def persist(self, key: bytes) -> bool:
        entry = self.expires.pop(key, None)
        if entry is None:
            return False
        del entry[1][key]
        self.volatile_bytes -= cost(key, self.data[key])
        if self._lru is not None:
            del self._lru[key]
        return True

    def _expire(self, key: bytes) -> None:
        self.delete(key)
        self.expired += 1

    # -- upkeep, once per command or script ----------------------------------------------------

    def upkeep(self, now_us: int) -> None:
        """Set the clock, reclaim a bounded number of expired keys, evict down to the limit."""
        self.now_us = now_us
        self.now = now = now_us // 1000
        if now > self._next_sweep:
            self._sweep()
        if self._lru is not None and self.volatile_bytes > self._limit:
            self._evict()

    def _sweep(self) -> None:
        budget, now = SWEEP_BUDGET, self.now
        next_sweep = 1 << 63
        for queue in self._queues.values():
            while queue:
                key, when = next(iter(queue.items()))
                if when >= now:
                    next_sweep = min(next_sweep, when)
                    break
                if not budget:
                    self._next_sweep = now - 1  # more to do: continue on the next call
                    return
                self._expire(key)
                budget -= 1
        self._next_sweep = next_sweep

    def _evict(self) -> None:
        assert self._lru is not None
        while self.volatile_bytes > self._limit and self._lru:
            self.delete(next(iter(self._lru)))
            self.evicted += 1

    # -- SCAN MATCH ----------------------------------------------------------------------------

    def scan(self, pattern: bytes) -> list[bytes]:
        match = glob(pattern).fullmatch
        now = self.now
        return [key for key in self.data if match(key) is not None
                and (key not in self.expires or self.expires[key][0] >= now)]


def cost(key: bytes, value: Value) -> int:
    """Approximate bytes of one key: its name, its value, and a fixed overhead."""
    return KEY_COST + len(key) + (len(value) if isinstance(value, bytes) else value.size)


@lru_cache(maxsize=256)
def glob(pattern: bytes) -> re.Pattern[bytes]:
    """Redis's glob (`stringmatchlen`) as an anchored regex: `*`, `?`, `[a-z]`, `[^...]`, `\\`.
    Bytes compare as C's signed chars in ranges, as in Redis."""
    out = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == ord("*"):
            out.append(b".*")
        elif c == ord("?"):
            out.append(b".")
        elif c == ord("["):
            i += 1
            negate = i < n and pattern[i] == ord("^")
            if negate:
                i += 1
            allowed: set[int] = set()
            while i < n:
                c = pattern[i]
                if c == ord("\\") and n - i >= 2:
                    i += 1
                    allowed.add(pattern[i])
                elif c == ord("]"):
                    break
                elif n - i >= 3 and pattern[i + 1] == ord("-"):
                    low, high = sorted((_signed(c), _signed(pattern[i + 2])))
                    allowed.update(b & 0xFF for b in range(low, high + 1))
                    i += 2
                else:
                    allowed.add(c)
                i += 1
            if negate:
                allowed = set(range(256)) - allowed
            out.append(b"[" + b"".join(re.escape(bytes([b])) for b in sorted(allowed)) + b"]"
                       if allowed else b"(?!)")
        else:
            if c == ord("\\") and n - i >= 2:
                i += 1
            out.append(re.escape(pattern[i:i + 1]))
        i += 1
    return re.compile(b"".join(out), re.DOTALL)


def _signed(byte: int) -> int:
    return byte - 256 if byte > 127 else byte
