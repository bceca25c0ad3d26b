"""Bearer JWTs from the organisation's identity provider, verified into a team and a key id.

A token is checked in this order, and the first failure refuses it: its size and shape (compact
JWS, three base64url parts), its header (`alg` RS256 or ES256 and nothing else, a `kid`, no
`crit`), the key for `kid` from the JWKS (whose algorithm must be the header's), the signature,
and only then the claims: `exp` (required), `nbf`, `iss`, `aud` (with `leeway_s`), the team claim
(a configured team) and the key claim. Header fields that point at other keys (`jku`, `x5u`,
`jwk`, `x5c`) are never followed: keys come from the configured JWKS only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from typing import Any

import orjson

from . import config as cfg
from .jwks import ALGS, KID, Jwks, JwksError, b64url

MAX_TOKEN = 8192
KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@:-]{0,63}")
FALLBACK_KEY_ID = "jwt"


class JwtError(ValueError):
    """Why a token was refused: for a debug log line, never for the client."""


class JwtVerifier:
    def __init__(self, config: cfg.Jwt, teams: Collection[str], jwks: Jwks) -> None:
        self.config = config
        self.teams = frozenset(teams)
        self.jwks = jwks

    async def verify(self, token: bytes, now: float) -> tuple[str, str]:
        """The (team, key id) a valid token names; raises `JwtError` otherwise."""
        if len(token) > MAX_TOKEN:
            raise JwtError("token too long")
        parts = token.split(b".")
        if len(parts) != 3:
            raise JwtError("not a compact JWS")
        header = _object(parts[0], "header")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALGS:
            raise JwtError("algorithm refused (RS256 and ES256 only)")
        if "crit" in header:
            raise JwtError("critical header extensions are not supported")
        kid = header.get("kid")
        if not isinstance(kid, str) or not KID.fullmatch(kid):
            raise JwtError("no usable kid in the header")
        key = await self.jwks.key(kid, now)
        if key is None:
            raise JwtError("unknown kid")
        if key.alg != alg:
            raise JwtError("the header's alg is not the key's")
        if not key.verify(_decode(parts[2], "signature"), parts[0] + b"." + parts[1]):
            raise JwtError("bad signature")
        return self._identity(_object(parts[1], "payload"), now)

    def _identity(self, claims: Mapping[str, Any], now: float) -> tuple[str, str]:
        config = self.config
        exp = _time(claims, "exp")
        if exp is None:
            raise JwtError("no exp claim")
        if now >= exp + config.leeway_s:
            raise JwtError("expired")
        nbf = _time(claims, "nbf")
        if nbf is not None and now < nbf - config.leeway_s:
            raise JwtError("not yet valid (nbf)")
        if claims.get("iss") != config.issuer:
            raise JwtError("wrong issuer")
        aud = claims.get("aud")
        if aud != config.audience and not (isinstance(aud, list) and config.audience in aud):
            raise JwtError("wrong audience")
        team = claims.get(config.team_claim)
        if not isinstance(team, str) or team not in self.teams:
            raise JwtError("the team claim names no configured team")
        key_id = FALLBACK_KEY_ID
        if config.key_claim is not None:
            value = claims.get(config.key_claim)
            if isinstance(value, str) and KEY_ID.fullmatch(value):
                key_id = value
        return team, key_id


def _decode(part: bytes, name: str) -> bytes:
    try:
        return b64url(part)
    except JwksError:
        raise JwtError(f"the {name} is not base64url") from None


def _object(part: bytes, name: str) -> dict[str, Any]:
    try:
        value = orjson.loads(_decode(part, name))
    except orjson.JSONDecodeError:
        raise JwtError(f"the {name} is not JSON") from None
    if not isinstance(value, dict):
        raise JwtError(f"the {name} is not a JSON object")
    return value


def _time(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise JwtError(f"{name} is not a number of seconds")
    return float(value)
