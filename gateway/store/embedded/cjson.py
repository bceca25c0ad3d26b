"""cjson.decode as lua-cjson 2.1 decodes in Redis 7.0 (defaults: invalid numbers such as `nan`,
`inf`, hex and a leading `+` accepted, 1000 levels deep, the text ends at a NUL byte).

Valid JSON goes through orjson; anything orjson refuses (or might read differently: a number
`-0`, depth, surrogates) goes through `_Parser`, a port of lua-cjson's parser that fails with its
messages.
"""

from __future__ import annotations

import re
from typing import Any, NoReturn

import orjson

from .parse import strtod

MAX_DEPTH = 1000


class DecodeError(Exception):
    """lua-cjson's message, without the position of the caller (added by the caller)."""


_ZERO = re.compile(rb"-0(?![.eE0-9])")
_BEFORE_A_NUMBER = frozenset(b"[,: \t\n\r\f\v")


def _negative_zero(data: bytes) -> bool:
    """Whether the text may hold a number -0 (orjson reads it as the integer 0, lua-cjson as
    the float -0); not for a "-0" inside a word such as a stream id ("1788016005737-0")."""
    for match in _ZERO.finditer(data):
        start = match.start()
        if not start or data[start - 1] in _BEFORE_A_NUMBER:
            return True
    return False


def decode(data: bytes, null: object) -> Any:
    """The decoded document: dicts (bytes keys), lists, bytes, floats, bools, `null`."""
    if b"-0" not in data or not _negative_zero(data):
        try:
            return _plain(orjson.loads(data), null)
        except (orjson.JSONDecodeError, UnicodeEncodeError, _TooDeep):
            pass
    return _Parser(data, null).document()


class _TooDeep(Exception):
    pass


def _plain(root: Any, null: object) -> Any:
    """orjson's document with bytes for str, floats for ints, `null` for None."""
    try:
        return _shallow(root, null, _SHALLOW)
    except _Deeper:
        return _nested(root, null)


_SHALLOW = 64  # levels converted by recursion (every payload of ours); deeper: `_nested`


class _Deeper(Exception):
    pass


def _shallow(value: Any, null: object, levels: int) -> Any:
    """The conversion, by recursion; with `levels` 0, of a scalar only (`_nested` uses that)."""
    cls = value.__class__
    if cls is str:
        return value.encode()
    if cls is dict:
        if not levels:
            raise _Deeper
        return {key.encode(): item.encode() if item.__class__ is str
                else _shallow(item, null, levels - 1) for key, item in value.items()}
    if cls is list:
        if not levels:
            raise _Deeper
        return [item.encode() if item.__class__ is str else _shallow(item, null, levels - 1)
                for item in value]
    if cls is int:
        return float(value)
    return null if value is None else value


def _nested(root: Any, null: object) -> Any:
    """`_plain` for any document, without recursion (a document may be 1000 levels deep)."""
    stack: list[tuple[Any, Any, int]] = []

    def convert(value: Any, depth: int) -> Any:
        cls = value.__class__
        if cls is not dict and cls is not list:
            return _shallow(value, null, 0)
        if depth > MAX_DEPTH:
            raise _TooDeep
        out: Any = {} if cls is dict else []
        stack.append((value, out, depth))
        return out

    top = convert(root, 1)
    while stack:
        source, target, depth = stack.pop()
        if source.__class__ is dict:
            for key, value in source.items():
                target[key.encode()] = convert(value, depth + 1)
        else:
            target.extend([convert(value, depth + 1) for value in source])
    return top


_WHITESPACE = b" \t\n\r"
_SINGLE = {ord("{"): "T_OBJ_BEGIN", ord("}"): "T_OBJ_END", ord("["): "T_ARR_BEGIN",
           ord("]"): "T_ARR_END", ord(":"): "T_COLON", ord(","): "T_COMMA"}
_ESCAPES = {ord('"'): b'"', ord("\\"): b"\\", ord("/"): b"/", ord("b"): b"\b",
            ord("f"): b"\f", ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t"}
_HEX4 = re.compile(rb"[0-9a-fA-F]{4}")
_PLAIN_STRING = re.compile(rb'[^"\\]*')
Token = tuple[str, Any, int]  # type, value (or error message), index


class _Parser:
    def __init__(self, data: bytes, null: object) -> None:
        if len(data) >= 2 and (not data[0] or not data[1]):
            raise DecodeError("JSON parser does not support UTF-16 or UTF-32")
        end = data.find(b"\0")
        self.data = data if end < 0 else data[:end]  # a C string ends at its first NUL
        self.pos = 0
        self.depth = 0
        self.null = null

    def document(self) -> Any:
        """lua-cjson's recursive descent, with an explicit stack of open containers."""
        stack: list[tuple[dict[bytes, Any] | list[Any], bytes]] = []  # (container, pending key)
        token = self.next()
        while True:
            kind = token[0]
            if kind == "T_OBJ_BEGIN" or kind == "T_ARR_BEGIN":
                self.descend()
                container: dict[bytes, Any] | list[Any] = {} if kind == "T_OBJ_BEGIN" else []
                token = self.next()
                if token[0] != ("T_OBJ_END" if kind == "T_OBJ_BEGIN" else "T_ARR_END"):
                    if kind == "T_OBJ_BEGIN":
                        stack.append((container, self.key(token)))
                        token = self.next()
                    else:
                        stack.append((container, b""))
                    continue
                self.depth -= 1
                value: Any = container
            elif kind in ("T_STRING", "T_NUMBER", "T_BOOLEAN"):
                value = token[1]
            elif kind == "T_NULL":
                value = self.null
            else:
                self.fail("value", token)
            while True:  # `value` is complete: put it in its container, close finished ones
                if not stack:
                    token = self.next()
                    if token[0] != "T_END":
                        self.fail("the end", token)
                    return value
                container, key = stack[-1]
                token = self.next()
                if isinstance(container, dict):
                    container[key] = value
                    end, expected = "T_OBJ_END", "comma or object end"
                else:
                    container.append(value)
                    end, expected = "T_ARR_END", "comma or array end"
                if token[0] == end:
                    stack.pop()
                    self.depth -= 1
                    value = container
                    continue
                if token[0] != "T_COMMA":
                    self.fail(expected, token)
                token = self.next()
                if isinstance(container, dict):
                    stack[-1] = (container, self.key(token))
                    token = self.next()
                break

    def key(self, token: Token) -> bytes:
        """An object key, and its colon."""
        if token[0] != "T_STRING":
            self.fail("object key string", token)
        colon = self.next()
        if colon[0] != "T_COLON":
            self.fail("colon", colon)
        return bytes(token[1])

    def fail(self, expected: str, token: Token) -> NoReturn:
        found = token[1] if token[0] == "T_ERROR" else token[0]
        raise DecodeError(f"Expected {expected} but found {found} at character {token[2] + 1}")

    def descend(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise DecodeError(f"Found too many nested data structures ({self.depth}) at "
                              f"character {self.pos}")

    def next(self) -> Token:
        data, i = self.data, self.pos
        while i < len(data) and data[i] in _WHITESPACE:
            i += 1
        self.pos = i
        if i >= len(data):
            return "T_END", None, i
        c = data[i]
        if c in _SINGLE:
            self.pos = i + 1
            return _SINGLE[c], None, i
        if c == ord('"'):
            return self.string(i)
        if c == ord("-") or ord("0") <= c <= ord("9"):
            return self.number(i)
        for word, value in ((b"true", True), (b"false", False)):
            if data.startswith(word, i):
                self.pos = i + len(word)
                return "T_BOOLEAN", value, i
        if data.startswith(b"null", i):
            self.pos = i + 4
            return "T_NULL", None, i
        if c in b"iInN+" and self.odd_number(i):
            return self.number(i)
        return "T_ERROR", "invalid token", i

    def odd_number(self, i: int) -> bool:
        """`json_is_invalid_number`: a leading +, hex, leading zeros, inf or nan."""
        data = self.data
        if data[i:i + 1] == b"+":
            return True
        if data[i:i + 1] == b"-":
            i += 1
        head = data[i:i + 3].lower()
        return head.startswith(b"inf") or head.startswith(b"nan")

    def number(self, i: int) -> Token:
        value, used, _ = strtod(self.data[i:])
        if not used:
            return "T_ERROR", "invalid number", i
        self.pos = i + used
        return "T_NUMBER", value, i

    def string(self, start: int) -> Token:
        data, out, j = self.data, bytearray(), start + 1
        while True:
            plain = _PLAIN_STRING.match(data, j)
            assert plain is not None
            out += plain[0]
            j = plain.end()
            if j >= len(data):
                return "T_ERROR", "unexpected end of string", j
            if data[j] == ord('"'):
                self.pos = j + 1
                return "T_STRING", bytes(out), start
            escape = data[j + 1] if j + 1 < len(data) else 0
            if escape == ord("u"):
                decoded = self.unicode_escape(j)
                if decoded is None:
                    return "T_ERROR", "invalid unicode escape code", j
                out += decoded[0]
                j += decoded[1]
            elif escape in _ESCAPES:
                out += _ESCAPES[escape]
                j += 2
            else:
                return "T_ERROR", "invalid escape code", j

    def unicode_escape(self, j: int) -> tuple[bytes, int] | None:
        data = self.data
        high = _HEX4.fullmatch(data, j + 2, j + 6)
        if high is None:
            return None
        code = int(high[0], 16)
        length = 6
        if code & 0xF800 == 0xD800:
            if code & 0x400 or data[j + 6:j + 8] != b"\\u":
                return None
            low = _HEX4.fullmatch(data, j + 8, j + 12)
            if low is None or int(low[0], 16) & 0xFC00 != 0xDC00:
                return None
            code = (((code & 0x3FF) << 10) | (int(low[0], 16) & 0x3FF)) + 0x10000
            length = 12
        return chr(code).encode(), length
