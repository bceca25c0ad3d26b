"""What the gateway accepts from a client, checked once, before anything else is done with it.

`check(scope)`, first for every proxied request: no control characters where text is expected,
and no second copy of a header that must be one. A control character in a path, a query
string or a header value is never part of a legitimate call to the API, and each one is a way
to smuggle something past a check written for text: Python's `$` matches before a trailing
newline, a NUL ends a C string, CR and LF split a header or a log line. uvicorn's parser
(httptools) refuses some of them in raw form (CR, LF and NUL in a header, most of them raw in
the URL) but passes others, and it decodes `%0A` in the path into a real newline. So the gateway
refuses them all, raw or percent-encoded, with 400 `invalid_request`, before it authenticates,
counts, reads the body or forwards anything. Controls are C0 (0x00-0x1f) and DEL (0x7f). In
header values, horizontal tab (0x09) is allowed: RFC 9110 (5.5) lets a field value hold HTAB
between its characters, as it does a space, and the headers the gateway interprets refuse it
where it does not belong (a Bearer token, an `Idempotency-Key`, an `X-Request-ID`).

`json_object(body, content_type)`: the body of a POST, a JSON object the gateway can pass on
exactly, and its canonical form (sorted keys, no insignificant whitespace: equal documents give
equal bytes), which the cache key and the forwarded body are made of. orjson reads nesting up
to 1023 levels but writes only 254, and reads an integer beyond 64 bits as an inexact float; so
a body must nest at most 254 levels, and its numbers stay below 2**64 in magnitude. Both checks
run in orjson's C code (the one write of the canonical form) but for bodies that hold a float
from 1e16 up, which are walked.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote_to_bytes

import orjson

from .asgi import Headers, Scope
from .errors import InvalidRequest

_EXACT = 2.0**64
_JSON_TYPES = (b"application/json", b"application/x-www-form-urlencoded", b"text/plain")
# fields that must appear once (RFC 9110 5.3): with two, which one counts depends on the reader
_SINGLETONS = frozenset({b"authorization", b"content-type", b"idempotency-key", b"x-request-id",
                         b"x-callback-url", b"x-callback-secret-id"})

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


def repeated_singleton(headers: Headers) -> bytes | None:
    """The name of a header that must appear once and appears more often, if any."""
    seen = [name for name, _ in headers if name in _SINGLETONS]
    if len(seen) == len(set(seen)):
        return None
    return next(name for name in seen if seen.count(name) > 1)


def check(scope: Scope) -> None:
    """Raise `InvalidRequest` (400) for a control character, or a repeated singleton header."""
    headers = scope["headers"]
    where = control_character_in(scope["path"], scope["query_string"], headers)
    if where is not None:
        names = {"path": "path", "query": "query string", "header": "header values"}
        raise InvalidRequest(
            f"Control characters are not allowed in the request's {names[where]}.")
    twice = repeated_singleton(headers)
    if twice is not None:
        raise InvalidRequest(f"The {twice.decode().title()} header may appear only once.")


def json_object(body: bytes, content_type: bytes | None) -> tuple[dict[str, Any], bytes]:
    """The request body as a JSON object and in canonical form; `InvalidRequest` (400, or 415
    for another media type) when it is not one the gateway can check and pass on exactly."""
    if content_type is not None:
        media = content_type.split(b";", 1)[0].strip().lower()
        if media not in _JSON_TYPES and not media.endswith(b"+json"):
            raise InvalidRequest("The request body must be JSON (Content-Type: application/json).",
                                 status=415)
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        written = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # orjson writes 254 levels at most
        raise InvalidRequest("The request body nests JSON more than 254 levels deep.") from None
    # orjson writes any float from 1e16 up with an exponent, "e+": only then is a walk needed
    if b"e+" in written and _large_number_in(payload):
        raise InvalidRequest("The request body holds a number of magnitude 2**64 or more, "
                             "which the gateway cannot pass on exactly.")
    return payload, fitted(written)


def fitted(data: bytes) -> bytes:
    """A copy of orjson's output in a buffer of its own size, for bytes kept past the request's
    first steps: orjson 3.13 returns every document in an allocation of at least 4 KB (a held
    request kept two of them, 8 KB, a fifth of its memory)."""
    return bytes(memoryview(data))


def _large_number_in(payload: dict[str, Any]) -> bool:
    """Whether a float of magnitude 2**64 or more is anywhere in the document (a walk without
    recursion: it may be 254 levels deep)."""
    stack: list[Any] = [payload]
    while stack:
        node = stack.pop()
        for child in node.values() if type(node) is dict else node:
            kind = type(child)  # orjson makes exactly dict, list, float...
            if kind is dict or kind is list:
                stack.append(child)
            elif kind is float and not -_EXACT < child < _EXACT:
                return True
    return False
