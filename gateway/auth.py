"""Internal keys: hashing, generation and the Bearer lookup (by sha256, so one dict lookup)."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import AuthenticationError

KEY_PREFIX = "aiogw_"


@dataclass(frozen=True, slots=True)
class Principal:
    team: str
    key_id: str


def hash_key(key: str | bytes) -> str:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).hexdigest()


def new_key() -> str:
    """A fresh internal key: 256 bits from the OS CSPRNG, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def bearer_token(authorization: bytes | None) -> bytes | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token or b" " in token:
        return None
    return token


def authenticate(authorization: bytes | None, index: Mapping[str, Principal]) -> Principal:
    """The principal behind `Authorization: Bearer <key>`; the same error for every failure."""
    token = bearer_token(authorization)
    principal = index.get(hash_key(token)) if token is not None else None
    if principal is None:
        raise AuthenticationError("Missing or invalid API key.")
    return principal
