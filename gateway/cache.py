"""Cache keys (method, path, canonical JSON body, team) and the stored entry format."""

from __future__ import annotations

import hashlib

import orjson

from .asgi import Headers, Reply


def request_digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.hexdigest()


def client_directive(cache_control: bytes | None) -> str | None:
    """`no-store` (neither read nor write the cache) or `no-cache` (refresh it), from the client."""
    if not cache_control:
        return None
    value = cache_control.lower()
    if b"no-store" in value:
        return "no-store"
    if b"no-cache" in value:
        return "no-cache"
    return None


def encode_entry(reply: Reply, *, credits: int, ttl_s: float) -> bytes:
    """One line of JSON metadata, then the body as is."""
    meta = {
        "s": reply.status,
        "h": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in reply.headers],
        "c": credits,
        "t": ttl_s,
    }
    return orjson.dumps(meta) + b"\n" + reply.body


def decode_entry(blob: bytes) -> tuple[Reply, int, float]:
    """(reply, credits the original answer cost, ttl it was stored with)."""
    head, _, body = blob.partition(b"\n")
    meta = orjson.loads(head)
    headers: Headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in meta["h"]]
    return Reply(meta["s"], headers, body), int(meta["c"]), float(meta["t"])
