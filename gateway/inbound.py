"""The first check of every proxied request: no control characters where text is expected.

A control character in a path, a query string or a header value is never part of a legitimate
call to the API, and each one is a way to smuggle something past a check written for text:
Python's `$` matches before a trailing newline, a NUL ends a C string, CR and LF split a header
or a log line. uvicorn's parser (httptools) refuses some of them in raw form (CR, LF and NUL in a
header, most of them raw in the URL) but passes others, and it decodes `%0A` in the path into a
real newline. So the gateway refuses them all, raw or percent-encoded, with 400
`invalid_request`, before it authenticates, counts, reads the body or forwards anything.

Controls are C0 (0x00-0x1f) and DEL (0x7f). In header values, horizontal tab (0x09) is allowed:
RFC 9110 (5.5) lets a field value hold HTAB between its characters, as it does a space, and the
headers the gateway interprets refuse it where it does not belong (a Bearer token, an
`Idempotency-Key`, an `X-Request-ID`).
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

from .asgi import Headers, Scope
from .errors import InvalidRequest

_CONTROL_TEXT = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_CONTROL_IN_FIELD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def control_character_in(path: str, query: bytes, headers: Headers) -> str | None:
    """Where a control character is (`path`, `query` or `header`), or None when there is none.

    `path` is the decoded path (uvicorn has undone the percent-encoding); `query` the raw query
    string, checked as sent and percent-decoded.
    """
    if _CONTROL_TEXT.search(path):
        return "path"
    if query and _CONTROL.search(unquote_to_bytes(query) if b"%" in query else query):
        return "query"  # raw controls survive the unquoting
    if _CONTROL_IN_FIELD.search(b"\t".join(value for _, value in headers)):
        return "header"
    return None


def check(scope: Scope) -> None:
    """Raise `InvalidRequest` (400) when the request carries a control character."""
    where = control_character_in(scope["path"], scope["query_string"], scope["headers"])
    if where is not None:
        names = {"path": "path", "query": "query string", "header": "header values"}
        raise InvalidRequest(
            f"Control characters are not allowed in the request's {names[where]}.")
