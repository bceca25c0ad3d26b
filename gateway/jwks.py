"""The identity provider's signing keys: a JWKS document, fetched over HTTP and cached.

A token whose `kid` is not in the cache starts a fetch (or joins the one in flight), but at most
one fetch starts per `cooldown_s`, so a flood of tokens with made-up kids costs the IdP one
request per cooldown. Keys older than `refresh_s` are refetched in the background while they keep
answering. Every fetch is bounded by `timeout_s`; a failed one keeps the keys already known, so an
IdP that is down does not log anyone out.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import certifi
import httpx
import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

log = logging.getLogger("gateway")

Alg = Literal["RS256", "ES256"]
ALGS: frozenset[str] = frozenset({"RS256", "ES256"})
MAX_BODY = 256 * 1024
MAX_KEYS = 64
KID = re.compile(r"[\x21-\x7e]{1,256}")
_B64URL = re.compile(rb"[A-Za-z0-9_-]+")


class JwksError(ValueError):
    """A JWKS document (or one of its keys) that cannot be used."""


def b64url(text: str | bytes) -> bytes:
    """Unpadded base64url (RFC 7515), strictly: only its alphabet, no padding, no whitespace."""
    raw = text if isinstance(text, bytes) else text.encode("latin-1", "replace")
    if not _B64URL.fullmatch(raw) or len(raw) % 4 == 1:
        raise JwksError("not base64url")
    try:
        return base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
    except binascii.Error:
        raise JwksError("not base64url") from None


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One public key and the one algorithm it may verify (never chosen by the token)."""

    alg: Alg
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey

    def verify(self, signature: bytes, data: bytes) -> bool:
        try:
            if isinstance(self.key, rsa.RSAPublicKey):
                self.key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
                return True
            if len(signature) != 64:  # JWS ES256: r || s, 32 bytes each (RFC 7518 3.4)
                return False
            r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            self.key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))
            return True
        except InvalidSignature:
            return False


def parse_jwks(body: bytes) -> dict[str, SigningKey]:
    """The usable signing keys of a JWKS document, by kid.

    Keys for other uses or algorithms, without a kid, or malformed are skipped (an IdP may
    publish encryption keys alongside); a kid that appears twice is dropped as ambiguous.
    """
    if len(body) > MAX_BODY:
        raise JwksError("document too large")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise JwksError("not JSON") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise JwksError("no 'keys' list")
    if len(entries) > MAX_KEYS:
        raise JwksError(f"more than {MAX_KEYS} keys")
    keys: dict[str, SigningKey] = {}
    twice: set[str] = set()
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or not KID.fullmatch(kid):
            continue
        try:
            key = _signing_key(entry)
        except (JwksError, ValueError):
            continue
        if key is None:
            continue
        if kid in keys:
            twice.add(kid)
        keys[kid] = key
    for kid in twice:
        del keys[kid]
    return keys


def _signing_key(jwk: Mapping[str, Any]) -> SigningKey | None:
    if jwk.get("use", "sig") != "sig":
        return None
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return None
    kty, alg = jwk.get("kty"), jwk.get("alg")
    if kty == "RSA" and alg in (None, "RS256"):
        n = int.from_bytes(b64url(_text(jwk, "n")), "big")
        e = int.from_bytes(b64url(_text(jwk, "e")), "big")
        if not 2048 <= n.bit_length() <= 8192 or e < 3 or e % 2 == 0 or e.bit_length() > 32:
            raise JwksError("RSA key out of range")
        return SigningKey("RS256", rsa.RSAPublicNumbers(e, n).public_key())
    if kty == "EC" and alg in (None, "ES256") and jwk.get("crv") == "P-256":
        x, y = b64url(_text(jwk, "x")), b64url(_text(jwk, "y"))
        if len(x) != 32 or len(y) != 32:
            raise JwksError("P-256 coordinates are 32 bytes")
        numbers = ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1())
        return SigningKey("ES256", numbers.public_key())  # ValueError when off the curve
    return None


def _text(jwk: Mapping[str, Any], name: str) -> str:
    value = jwk.get(name)
    if not isinstance(value, str) or len(value) > 2048:
        raise JwksError(f"'{name}' is missing")
    return value


@dataclass(frozen=True, slots=True)
class JwksSettings:
    url: str
    timeout_s: float
    refresh_s: float
    cooldown_s: float


class Jwks:
    """The cached key set of one JWKS URL. `now` comes from the gateway's clock."""

    def __init__(self, settings: JwksSettings) -> None:
        self.settings = settings
        self._keys: dict[str, SigningKey] = {}
        self._fetched_at = -math.inf  # last fetch that succeeded
        self._tried_at = -math.inf  # last fetch started
        self._fetch: asyncio.Task[None] | None = None
        self._tls: ssl.SSLContext | None = None

    async def key(self, kid: str, now: float) -> SigningKey | None:
        """The key named `kid`, fetching the document if it is unknown (and allowed)."""
        key = self._keys.get(kid)
        if key is not None:
            if now - self._fetched_at >= self.settings.refresh_s:
                self._refresh(now)  # in the background: the cached key answers this request
            return key
        fetch = self._refresh(now)
        if fetch is None:
            return None
        await asyncio.shield(fetch)  # one caller giving up does not cancel the others' fetch
        return self._keys.get(kid)

    def _refresh(self, now: float) -> asyncio.Task[None] | None:
        """The fetch in flight, or a new one unless the last started less than cooldown_s ago."""
        if self._fetch is not None and not self._fetch.done():
            return self._fetch
        if now - self._tried_at < self.settings.cooldown_s:
            return None
        self._tried_at = now
        self._fetch = asyncio.get_running_loop().create_task(self._load(now))
        return self._fetch

    async def _load(self, now: float) -> None:
        url = self.settings.url
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                keys = parse_jwks(await self._get())
        except (httpx.HTTPError, TimeoutError, JwksError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else repr(exc)
            log.warning("jwks: fetching %s failed (%s); %d cached key(s) stay in use",
                        url, reason, len(self._keys))
            return
        if keys.keys() != self._keys.keys():
            log.info("jwks: %d signing key(s) from %s", len(keys), url)
        self._keys, self._fetched_at = keys, now

    async def _get(self) -> bytes:
        if self._tls is None:
            self._tls = ssl.create_default_context(cafile=certifi.where())
        async with httpx.AsyncClient(verify=self._tls, timeout=self.settings.timeout_s,
                                     follow_redirects=False, trust_env=False) as client, \
                client.stream("GET", self.settings.url,
                              headers={"accept": "application/json"}) as response:
            if response.status_code != 200:
                raise JwksError(f"HTTP {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_BODY:
                    raise JwksError("document too large")
            return bytes(body)
