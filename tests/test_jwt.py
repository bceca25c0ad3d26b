"""JWT identity end to end: real RSA and EC keys, a JWKS served over HTTP by a small IdP app on a
free port, a gateway in front of the mock upstream. A JWT and a static key share one path."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import config as cfg
from gateway.app import create_app
from gateway.jwks import JwksError, parse_jwks

from .conftest import (
    ADMIN_KEY,
    KEYS,
    GatewayFactory,
    Mock,
    RunningGateway,
    ServerThread,
    base_config,
)
from .test_limits import teams_with
from .test_proxy import error_of, wait_ledger

ISSUER = "https://idp.test/"
AUDIENCE = "aio-gateway"
Private = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwk(key: Private, kid: str, **extra: Any) -> dict[str, Any]:
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        numbers = public.public_numbers()
        return {"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
                "n": b64(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
                "e": b64(numbers.e.to_bytes(3, "big")), **extra}
    point = public.public_numbers()
    return {"kty": "EC", "kid": kid, "crv": "P-256", "use": "sig",
            "x": b64(point.x.to_bytes(32, "big")), "y": b64(point.y.to_bytes(32, "big")), **extra}


def sign(key: Private, kid: str | None, claims: dict[str, Any], **header: Any) -> str:
    head = {"alg": "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256", "typ": "JWT"}
    head.update({"kid": kid} if kid is not None else {})
    head.update(header)
    signing_input = f"{b64(json.dumps(head).encode())}.{b64(json.dumps(claims).encode())}"
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    else:
        r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return f"{signing_input}.{b64(signature)}"


class Clock:
    """The gateway's clock, driven by the test."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class IdP:
    """The organisation's identity provider as far as the gateway sees it: a JWKS URL."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        self.server = ServerThread(Starlette(routes=[Route("/jwks", self._jwks)])).start()

    async def _jwks(self, request: Request) -> Response:
        self.fetches += 1
        return JSONResponse({"keys": self.keys})

    @property
    def url(self) -> str:
        return f"{self.server.url}/jwks"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def idp(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> Iterator[IdP]:
    provider = IdP()
    provider.keys = [jwk(rsa_key, "rsa-1"), jwk(ec_key, "ec-1")]
    yield provider
    provider.server.stop()


def jwt_section(jwks_url: str, **overrides: Any) -> dict[str, Any]:
    return {"jwt": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": jwks_url,
                    "team_claim": "team", "key_claim": "sub", "leeway_s": 30,
                    "jwks_timeout_s": 1, "jwks_refresh_s": 300, "jwks_cooldown_s": 60,
                    **overrides}}


def claims(clock: Clock, **overrides: Any) -> dict[str, Any]:
    return {"iss": ISSUER, "aud": AUDIENCE, "sub": "batch-job", "team": "research",
            "iat": int(clock.now), "exp": int(clock.now) + 600, **overrides}


def call(gateway: RunningGateway, token: str, content: str = "hello",
         **extra: Any) -> httpx.Response:
    body = {"model": "gemini", "messages": [{"role": "user", "content": content}], **extra}
    return gateway.client.post("/api/v1/chat/completions", json=body,
                               headers={"Authorization": f"Bearer {token}"})


def test_a_token_goes_through_the_teams_quota_budget_and_ledger(
        make_gateway: GatewayFactory, store_url: str, idp: IdP, mock: Mock,
        rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> None:
    clock = Clock()
    gateway = make_gateway(store_url, clock=clock, auth=jwt_section(idp.url),
                           teams=teams_with(requests_per_minute=4, budget={"credits": 100}))
    rs256 = sign(rsa_key, "rsa-1", claims(clock))
    es256 = sign(ec_key, "ec-1", claims(clock, sub="nightly:eval@ci"))
    assert call(gateway, rs256, "a", mock_credits=3).status_code == 200
    assert call(gateway, es256, "b", mock_credits=5).status_code == 200
    assert gateway.chat("c", extra={"mock_credits": 7}).status_code == 200  # the static key
    assert call(gateway, rs256, "d").status_code == 200
    refused = call(gateway, es256, "e")  # the team's 4 a minute, whoever asks
    assert refused.status_code == 429 and error_of(refused)["type"] == "rate_limit"
    assert idp.fetches == 1

    entries = wait_ledger(gateway, 4)
    assert [(e["team"], e["key_id"]) for e in entries] == [
        ("research", "batch-job"), ("research", "nightly:eval@ci"), ("research", "research-key"),
        ("research", "batch-job")]
    assert gateway.team()["spent"] == 3 + 5 + 7 + 2
    assert gateway.team("marketing")["spent"] == 0


def test_a_spent_budget_refuses_a_token_like_a_key(
        make_gateway: GatewayFactory, store_url: str, idp: IdP, mock: Mock,
        rsa_key: rsa.RSAPrivateKey) -> None:
    clock = Clock()
    gateway = make_gateway(store_url, clock=clock, auth=jwt_section(idp.url),
                           teams=teams_with(budget={"credits": 5}))
    token = sign(rsa_key, "rsa-1", claims(clock))
    assert call(gateway, token, "a", mock_credits=5).status_code == 200
    wait_ledger(gateway, 1)
    for answer in (call(gateway, token, "b"), gateway.chat("c")):
        assert answer.status_code == 402 and error_of(answer)["type"] == "insufficient_credits"


def test_every_bad_token_is_the_same_401(
        make_gateway: GatewayFactory, idp: IdP, mock: Mock, rsa_key: rsa.RSAPrivateKey,
        ec_key: ec.EllipticCurvePrivateKey, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway")
    clock = Clock()
    gateway = make_gateway(clock=clock, auth=jwt_section(idp.url))
    good = sign(rsa_key, "rsa-1", claims(clock))
    assert call(gateway, good).status_code == 200
    invalid_key = call(gateway, "aiogw_not_a_key")
    assert invalid_key.status_code == 401

    public_pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    hs256_input = (f"{b64(json.dumps({'alg': 'HS256', 'kid': 'rsa-1'}).encode())}."
                   f"{b64(json.dumps(claims(clock)).encode())}")
    hs256 = hs256_input + "." + b64(hmac.new(public_pem, hs256_input.encode(),
                                             hashlib.sha256).digest())
    head, payload, signature = good.split(".")
    none = b64(json.dumps({"alg": "none", "kid": "rsa-1"}).encode())
    other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(clock.now)
    signed = {  # why -> (token, the reason logged at debug level)
        "expired": (claims(clock, exp=now - 31), "expired"),
        "not yet valid": (claims(clock, nbf=now + 31), "not yet valid"),
        "wrong issuer": (claims(clock, iss="https://evil.test/"), "wrong issuer"),
        "wrong audience": (claims(clock, aud="other-service"), "wrong audience"),
        "audience list without ours": (claims(clock, aud=["a", "b"]), "wrong audience"),
        "unknown team": (claims(clock, team="finance"), "no configured team"),
        "no team": ({**claims(clock), "team": None}, "no configured team"),
        "team not a string": (claims(clock, team=["research"]), "no configured team"),
        "no exp": ({**claims(clock), "exp": None}, "no exp claim"),
        "exp not a number": (claims(clock, exp="tomorrow"), "exp is not a number"),
        "payload not an object": (["research"], "payload is not a JSON object"),
        "too long": (claims(clock, pad="x" * 9000), "token too long"),
    }
    bad = {why: (sign(rsa_key, "rsa-1", body), reason)  # type: ignore[arg-type]
           for why, (body, reason) in signed.items()}
    bad |= {
        "tampered payload": (f"{head}.{b64(json.dumps(claims(clock, team='marketing')).encode())}"
                             f".{signature}", "bad signature"),
        "tampered signature": (f"{head}.{payload}.{signature[:-4]}AAAA", "bad signature"),
        "signed by another key": (sign(other_rsa, "rsa-1", claims(clock)), "bad signature"),
        "alg none": (f"{none}.{payload}.", "algorithm refused"),
        "alg none, kept signature": (f"{none}.{payload}.{signature}", "algorithm refused"),
        "HS256 with the public key": (hs256, "algorithm refused"),
        "PS256": (sign(rsa_key, "rsa-1", claims(clock), alg="PS256"), "algorithm refused"),
        "ES256 header on an RSA key": (sign(ec_key, "rsa-1", claims(clock)), "not the key's"),
        "RS256 header on an EC key": (sign(rsa_key, "ec-1", claims(clock)), "not the key's"),
        "no kid": (sign(rsa_key, None, claims(clock)), "no usable kid"),
        "crit header": (sign(rsa_key, "rsa-1", claims(clock), crit=["exp"]), "critical header"),
        "jku to a key of our own": (sign(other_rsa, "mine", claims(clock),
                                         jku="http://127.0.0.1:1/jwks"), "unknown kid"),
        "not base64": ("a*b.c.d", "header is not base64url"),
        "not JSON": (f"{b64(b'nope')}.{payload}.{signature}", "header is not JSON"),
        "four parts": (good + ".x", None),  # not a JWT's shape: an unknown static key
    }
    for why, (token, reason) in bad.items():
        before = len(caplog.records)
        answer = call(gateway, token)
        assert answer.status_code == 401, why
        assert error_of(answer) == error_of(invalid_key), why
        logged = [r.getMessage() for r in caplog.records[before:]
                  if r.getMessage().startswith("jwt")]
        assert logged == ([] if reason is None else [logged[0]]), why
        assert reason is None or reason in logged[0], (why, logged)
    assert idp.fetches == 1  # tokens with known kids never made the gateway ask again

    # the leeway: expired 10 s ago, or valid in 10 s, with 30 s of leeway
    for why, token in {"exp": sign(rsa_key, "rsa-1", claims(clock, exp=now - 10)),
                       "nbf": sign(rsa_key, "rsa-1", claims(clock, nbf=now + 10))}.items():
        assert call(gateway, token, f"leeway {why}").status_code == 200, why
    # an audience list that holds ours; a key claim that is not a plain identifier -> `jwt`
    listed = sign(rsa_key, "rsa-1", claims(clock, aud=["x", AUDIENCE], sub="a b/c"))
    assert call(gateway, listed, "listed").status_code == 200
    assert wait_ledger(gateway, 4)[-1]["key_id"] == "jwt"

    logged = "\n".join(r.getMessage() for r in caplog.records)
    for token, _ in (good, None), *bad.values():
        assert token not in logged
        assert all(part not in logged for part in token.split(".") if len(part) >= 16)


def test_the_admin_api_takes_no_jwt(make_gateway: GatewayFactory, idp: IdP,
                                    rsa_key: rsa.RSAPrivateKey) -> None:
    clock = Clock()
    gateway = make_gateway(clock=clock, auth=jwt_section(idp.url))
    token = sign(rsa_key, "rsa-1", claims(clock))
    answer = gateway.client.get("/admin/v1/teams", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 401 and error_of(answer)["type"] == "authentication_error"
    assert idp.fetches == 0


def test_signing_key_rotation_and_the_refresh_rate_limit(
        make_gateway: GatewayFactory, store_url: str, idp: IdP, mock: Mock,
        rsa_key: rsa.RSAPrivateKey) -> None:
    clock = Clock()
    gateway = make_gateway(store_url, clock=clock, auth=jwt_section(idp.url))
    assert call(gateway, sign(rsa_key, "rsa-1", claims(clock)), "old").status_code == 200
    assert idp.fetches == 1

    # the IdP publishes a new signing key and starts using it
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    idp.keys = [jwk(new_key, "rsa-2"), *idp.keys]
    rotated = sign(new_key, "rsa-2", claims(clock))
    # within the cooldown of the last fetch, an unknown kid is refused without asking the IdP
    assert call(gateway, rotated, "too soon").status_code == 401
    assert idp.fetches == 1
    clock.now += 61
    assert call(gateway, rotated, "rotated").status_code == 200
    assert idp.fetches == 2
    assert call(gateway, sign(rsa_key, "rsa-1", claims(clock)), "old still").status_code == 200

    # a flood of made-up kids: at most one fetch per cooldown
    clock.now += 61
    for i in range(20):
        assert call(gateway, sign(new_key, f"random-{i}", claims(clock)), f"r{i}"
                    ).status_code == 401
    assert idp.fetches == 3
    assert call(gateway, rotated, "still served").status_code == 200


def test_an_idp_that_is_down_keeps_the_cached_keys(
        mock: Mock, idp: IdP, rsa_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    clock = Clock()
    raw = base_config(mock.api_url, auth=jwt_section(idp.url))
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw))
    server = ServerThread(create_app(cfg.load(str(path)), config_path=str(path), clock=clock))
    gateway = RunningGateway(server.start(), server.app)
    try:
        assert call(gateway, sign(rsa_key, "rsa-1", claims(clock)), "up").status_code == 200
        idp.server.stop()  # connection refused from now on

        clock.now += 3600  # far past jwks_refresh_s: a background refresh fails, keys stay
        token = sign(rsa_key, "rsa-1", claims(clock))
        assert call(gateway, token, "down 1").status_code == 200
        assert call(gateway, token, "down 2").status_code == 200
        unknown = sign(rsa_key, "rsa-9", claims(clock))
        for attempt in ("within the cooldown", "a fetch that fails"):
            answer = call(gateway, unknown, attempt)
            assert answer.status_code == 401, attempt
            assert error_of(answer)["type"] == "authentication_error"
            clock.now += 61

        # a reload with the same JWKS settings keeps what was fetched
        raw["teams"]["research"]["requests_per_minute"] = 100
        path.write_text(yaml.safe_dump(raw))
        reloaded = gateway.client.post("/admin/v1/reload",
                                       headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert reloaded.status_code == 200
        clock.now += 61
        assert call(gateway, token, "after reload").status_code == 200
    finally:
        gateway.close()


def test_an_idp_that_never_answers_costs_one_timeout(
        make_gateway: GatewayFactory, mock: Mock, rsa_key: rsa.RSAPrivateKey) -> None:
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/jwks"
        clock = Clock()
        gateway = make_gateway(clock=clock, auth=jwt_section(url, jwks_timeout_s=0.3))
        gateway.client.timeout = httpx.Timeout(20)  # far beyond jwks_timeout_s
        answer = call(gateway, sign(rsa_key, "rsa-1", claims(clock)))
        assert answer.status_code == 401 and error_of(answer)["type"] == "authentication_error"
        assert gateway.chat("static keys unaffected").status_code == 200


# -- the JWKS document ---------------------------------------------------------------------------


def test_jwks_parsing_keeps_only_usable_signing_keys(
        rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    p384 = ec.generate_private_key(ec.SECP384R1())
    off_curve = {**jwk(ec_key, "off"), "y": jwk(ec_key, "x")["x"]}
    document = {"keys": [
        jwk(rsa_key, "rsa"), jwk(ec_key, "ec"),
        jwk(rsa_key, "enc", use="enc"), jwk(rsa_key, "ops", key_ops=["encrypt"]),
        jwk(rsa_key, "ps", alg="PS256"), jwk(small, "small"),
        {**jwk(ec_key, "p384"), "crv": "P-384",
         "x": b64(p384.public_key().public_numbers().x.to_bytes(48, "big"))},
        off_curve, {"kty": "oct", "kid": "hmac", "k": b64(b"secret")},
        {"kty": "RSA", "n": "AQAB", "e": "AQAB"},  # no kid
        jwk(rsa_key, "twice"), jwk(ec_key, "twice"),
        jwk(rsa_key, "padded", n=jwk(rsa_key, "x")["n"] + "=="),
        "not an object",
    ]}
    keys = parse_jwks(orjson.dumps(document))
    assert set(keys) == {"rsa", "ec"}
    assert keys["rsa"].alg == "RS256" and keys["ec"].alg == "ES256"


@pytest.mark.parametrize("body", [b"<html>", b"[]", b'{"keys": {}}', b'{"nokeys": []}',
                                  orjson.dumps({"keys": [{}] * 65}), b"x" * (256 * 1024 + 1)])
def test_a_broken_jwks_document_is_refused(body: bytes) -> None:
    with pytest.raises(JwksError):
        parse_jwks(body)


def test_the_static_key_still_works_beside_jwt(make_gateway: GatewayFactory, idp: IdP,
                                               mock: Mock) -> None:
    gateway = make_gateway(auth=jwt_section(idp.url))
    assert gateway.chat("static").status_code == 200
    assert gateway.client.get("/api/v1/tasks/x", headers={
        "Authorization": f"Bearer {KEYS['research']}.x.y"}).status_code == 401
    assert idp.fetches == 0  # a static key never touches the IdP


def test_revoking_a_key_id_also_refuses_tokens_that_name_it(
        make_gateway: GatewayFactory, store_url: str, idp: IdP, mock: Mock,
        rsa_key: rsa.RSAPrivateKey) -> None:
    clock = Clock()
    gateway = make_gateway(store_url, clock=clock, auth=jwt_section(idp.url))
    named = sign(rsa_key, "rsa-1", claims(clock, sub="research-key"))
    other = sign(rsa_key, "rsa-1", claims(clock, sub="batch-job"))
    assert call(gateway, named, "before").status_code == 200
    assert gateway.admin("POST", "keys/research-key/revoke").status_code == 200
    for answer in (call(gateway, named, "after"), gateway.chat("static, after")):
        assert answer.status_code == 401 and error_of(answer)["type"] == "authentication_error"
    assert call(gateway, other, "another key id").status_code == 200
