"""The one exception the embedded Redis raises, and the messages Redis sends for common errors."""

from __future__ import annotations


class ResponseError(Exception):
    """An error reply, with Redis's message as it is sent on the wire, code included
    ("WRONGTYPE Operation against a key holding the wrong kind of value", "NOSCRIPT ...")."""

    @property
    def message(self) -> str:
        return str(self.args[0])


WRONGTYPE = "WRONGTYPE Operation against a key holding the wrong kind of value"
NOT_INTEGER = "ERR value is not an integer or out of range"
NOT_FLOAT = "ERR value is not a valid float"
SYNTAX = "ERR syntax error"
OVERFLOW = "ERR increment or decrement would overflow"
