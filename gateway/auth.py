"""Who is behind an `Authorization: Bearer` header: a static key, or a JWT from the IdP.

Static keys are found by their sha256 (one dict lookup, no comparison of secret bytes), then
checked against their validity window on the gateway's clock. A token that is no configured key
and looks like a JWT goes to the JWT verifier when `auth.jwt` is set. Both give the same
`Principal`, and every failure the same 401: the reason is logged at debug level only.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

from . import config as cfg
from .errors import AuthenticationError, PermissionDenied
from .jwks import Jwks, JwksSettings
from .jwt import JwtError, JwtVerifier
from .records import record

KEY_PREFIX = "aiogw_"
EXPIRY_WINDOWS = {"7d": 7 * 86400.0, "30d": 30 * 86400.0}  # gateway_keys_expiring{within}

log = logging.getLogger("gateway")


@record
class Principal:
    team: str
    key_id: str


@dataclass(frozen=True, slots=True)
class Grant:
    """One accepted secret: who it names, and when (epoch seconds, end excluded)."""

    principal: Principal
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class TeamKey:
    """A team key as operators see it (no secret): for the admin API and the expiry metric."""

    team: str
    key: cfg.Key


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


def timestamp(when: datetime | None, default: float) -> float:
    return default if when is None else when.timestamp()


class Authenticator:
    """The key index (with validity windows) and the JWT verifier of one config."""

    def __init__(self, config: cfg.Config, *, previous: Authenticator | None = None) -> None:
        self.team_keys = [TeamKey(team, key) for team, t in config.teams.items() for key in t.keys]
        self._keys = dict(_grants((k.team, k.key) for k in self.team_keys))
        self._admin = dict(_grants(("", key) for key in config.admin.keys))
        self.jwt: JwtVerifier | None = None
        if config.auth.jwt is not None:
            jwt = config.auth.jwt
            settings = JwksSettings(jwt.jwks_url, jwt.jwks_timeout_s, jwt.jwks_refresh_s,
                                    jwt.jwks_cooldown_s)
            known = previous.jwt.jwks if previous is not None and previous.jwt else None
            # a reload keeps the fetched keys: an IdP that is down then still logs no one out
            jwks = known if known is not None and known.settings == settings else Jwks(settings)
            self.jwt = JwtVerifier(jwt, config.teams, jwks)

    async def authenticate(self, authorization: bytes | None, now: float) -> Principal:
        """The team and key id behind the header at `now`; `AuthenticationError` otherwise.

        A static key never waits: the only await is the JWT path's JWKS fetch."""
        token = bearer_token(authorization)
        if token is not None:
            grant = self._keys.get(hash_key(token))
            if grant is not None:
                if grant.start <= now < grant.end:
                    return grant.principal
                log.debug("key %s refused: outside its validity window", grant.principal.key_id)
            elif self.jwt is not None and token.count(b".") == 2:
                try:
                    team, key_id = await self.jwt.verify(token, now)
                except JwtError as exc:
                    log.debug("jwt refused: %s", exc)
                else:
                    return Principal(team, key_id)
        raise AuthenticationError("Missing or invalid API key.")

    def admin(self, authorization: bytes | None, now: float) -> str:
        """The admin key id behind the header; 403 for a valid team key, 401 otherwise."""
        token = bearer_token(authorization)
        digest = hash_key(token) if token is not None else ""
        grant = self._admin.get(digest)
        if grant is not None and grant.start <= now < grant.end:
            return grant.principal.key_id
        grant = self._keys.get(digest)
        if grant is not None and grant.start <= now < grant.end:
            raise PermissionDenied("This key is not an admin key.")
        raise AuthenticationError("Missing or invalid admin key.")

    def expiring(self, now: float, within_s: float) -> list[TeamKey]:
        """Team keys whose `expires_at` is after `now` and at most `within_s` later."""
        return [k for k in self.team_keys
                if now < timestamp(k.key.expires_at, math.inf) <= now + within_s]


def _grants(keys: Iterable[tuple[str, cfg.Key]]) -> Iterator[tuple[str, Grant]]:
    for team, key in keys:
        principal = Principal(team, key.id)
        end = timestamp(key.expires_at, math.inf)
        yield key.sha256, Grant(principal, timestamp(key.not_before, -math.inf), end)
        for old in key.previous:
            yield old.sha256, Grant(principal, -math.inf, old.expires_at.timestamp())
