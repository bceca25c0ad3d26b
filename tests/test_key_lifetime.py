"""Key lifetime: `not_before` / `expires_at` on the gateway's clock, the keys that expire soon in
the admin API and in `gateway_keys_expiring`, and the strict config that allows them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml

from gateway import config as cfg
from gateway.auth import hash_key

from .conftest import ADMIN_KEY, KEYS, GatewayFactory, Mock, team_config
from .test_jwt import Clock
from .test_openapi import conforms
from .test_proxy import error_of

START = datetime(2031, 5, 1, 12, 0, tzinfo=UTC)
DAY = 86400.0


def at(days: float) -> str:
    return (START + timedelta(days=days)).isoformat().replace("+00:00", "Z")


def extra_key(key_id: str, **lifetime: Any) -> dict[str, Any]:
    return {"id": key_id, "sha256": hash_key(f"aiogw_{key_id}_secret"), **lifetime}


def bearer(key_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer aiogw_{key_id}_secret"}


def test_a_key_answers_only_inside_its_window(make_gateway: GatewayFactory, store_url: str,
                                              mock: Mock) -> None:
    clock = Clock()
    clock.now = START.timestamp()
    research = team_config("research")
    research["keys"].append(extra_key("window", not_before=at(1), expires_at=at(3)))
    gateway = make_gateway(store_url, clock=clock,
                           teams={"research": research, "marketing": team_config("marketing")})
    invalid = gateway.call("GET", "tasks/task_x", headers={"Authorization": "Bearer aiogw_nope"})

    def status(days: float) -> int:
        clock.now = START.timestamp() + days * DAY
        answer = gateway.chat(f"at {days}", headers=bearer("window"))
        if answer.status_code == 401:
            assert error_of(answer) == error_of(invalid)  # like any invalid key
        return answer.status_code

    assert [status(d) for d in (0, 1 - 1 / DAY, 1, 2, 3 - 1 / DAY, 3, 30)] == [
        401, 401, 200, 200, 200, 401, 401]
    assert gateway.chat("the team's other key").status_code == 200  # unaffected


def test_an_admin_key_can_expire(make_gateway: GatewayFactory) -> None:
    clock = Clock()
    clock.now = START.timestamp()
    gateway = make_gateway(clock=clock, admin={"keys": [
        {"id": "ops", "sha256": hash_key(ADMIN_KEY), "expires_at": at(1)}]})
    assert gateway.admin("GET", "keys").status_code == 200
    clock.now += DAY
    answer = gateway.admin("GET", "keys")
    assert answer.status_code == 401 and error_of(answer)["type"] == "authentication_error"


def test_keys_expiring_soon_in_the_admin_api_and_the_metric(
        make_gateway: GatewayFactory, store_url: str) -> None:
    clock = Clock()
    clock.now = START.timestamp()
    research = team_config("research")
    research["keys"] += [extra_key("in-3d", expires_at=at(3)),
                         extra_key("in-20d", expires_at=at(20), not_before=at(-5)),
                         extra_key("gone", expires_at=at(-1)),
                         extra_key("later", not_before=at(2), expires_at=at(6))]
    marketing = team_config("marketing")
    marketing["keys"][0]["expires_at"] = at(7)
    marketing["keys"][0]["previous"] = [{"sha256": hash_key("aiogw_old"), "expires_at": at(1)}]
    gateway = make_gateway(store_url, clock=clock,
                           teams={"research": research, "marketing": marketing})

    every = {k["id"]: k for k in conforms(gateway.admin("GET", "keys")).json()["keys"]}
    assert list(every) == ["research-key", "in-3d", "in-20d", "gone", "later", "marketing-key"]
    assert every["research-key"] == {"id": "research-key", "team": "research", "revoked": False,
                                     "not_before": None, "expires_at": None, "valid": True,
                                     "previous": [],
                                     "requests_per_minute": None, "requests_per_day": None,
                                     "budget": None}
    assert every["in-20d"]["not_before"] == "2031-04-26T12:00:00Z"
    assert every["in-20d"]["expires_at"] == "2031-05-21T12:00:00Z"
    assert not every["gone"]["valid"] and not every["later"]["valid"]
    assert every["marketing-key"]["previous"] == [{"expires_at": "2031-05-02T12:00:00Z",
                                                   "valid": True}]

    def expiring(within: str) -> list[str]:
        answer = conforms(gateway.admin("GET", "keys", params={"expiring_within": within}))
        assert answer.status_code == 200, answer.text
        return [k["id"] for k in answer.json()["keys"]]

    assert expiring("7d") == ["in-3d", "later", "marketing-key"]
    assert expiring("30d") == ["in-3d", "in-20d", "later", "marketing-key"]
    assert expiring("1d") == []
    assert 'gateway_keys_expiring{within="7d"} 3.0' in gateway.metrics()
    assert 'gateway_keys_expiring{within="30d"} 4.0' in gateway.metrics()

    gateway.admin("POST", "keys/in-3d/revoke")
    revoked = gateway.admin("GET", "keys", params={"expiring_within": "7d"}).json()["keys"]
    assert revoked[0]["id"] == "in-3d" and revoked[0]["revoked"] is True

    clock.now += 6 * DAY + 13 * 3600  # in-3d and `later` expired; marketing's key in 11 hours
    assert expiring("7d") == ["marketing-key"]
    assert 'gateway_keys_expiring{within="7d"} 1.0' in gateway.metrics()
    assert 'gateway_keys_expiring{within="30d"} 2.0' in gateway.metrics()


@pytest.mark.parametrize("within", ["7", "0d", "7days", "-1d", "3651d", "1.5d", "7D", "7d ", ""])
def test_expiring_within_is_validated(make_gateway: GatewayFactory, within: str) -> None:
    answer = conforms(make_gateway().admin("GET", "keys", params={"expiring_within": within}))
    assert answer.status_code == 400 and "expiring_within" in error_of(answer)["message"]


# -- the config ----------------------------------------------------------------------------------


def key_config(**fields: Any) -> str:
    entry = {"id": "k", "sha256": "a" * 64, **fields}
    return yaml.safe_dump({"teams": {"t": {"keys": [entry]}}})


def test_times_in_the_config() -> None:
    text = ("upstream: {api_key: aio_k}\nteams: {t: {keys: [{id: k, sha256: '" + "a" * 64 + "', "
            "not_before: 2027-03-01T00:00:00+02:00, expires_at: '2027-03-02T00:00:00.5Z'}]}}")
    key = cfg.parse(text, {}).teams["t"].keys[0]
    assert key.not_before == datetime(2027, 2, 28, 22, 0, tzinfo=UTC)
    assert key.expires_at == datetime(2027, 3, 2, 0, 0, 0, 500000, tzinfo=UTC)


@pytest.mark.parametrize(("fields", "message"), [
    ({"expires_at": "2027-03-01"}, "teams.t.keys[0].expires_at: expected a time with a timezone"),
    ({"expires_at": "2027-03-01T00:00:00"},
     "teams.t.keys[0].expires_at: expected a time with a timezone"),
    ({"expires_at": "2027-03-01 00:00:00Z"},
     "teams.t.keys[0].expires_at: expected a time with a timezone"),
    ({"expires_at": "2027-03-01T00:00:00z"},
     "teams.t.keys[0].expires_at: expected a time with a timezone"),
    ({"expires_at": "2027-02-30T00:00:00Z"},
     "teams.t.keys[0].expires_at: '2027-02-30T00:00:00Z' is not a valid time"),
    ({"expires_at": "2027-03-01T00:00:00+25:00"},
     "teams.t.keys[0].expires_at: '2027-03-01T00:00:00+25:00' is not a valid time"),
    ({"expires_at": "2027-03-01T00:00:00Z\n"},
     "teams.t.keys[0].expires_at: expected a time with a timezone"),
    ({"expires_at": 1800000000}, "teams.t.keys[0].expires_at: expected a time with a timezone, "
                                 "like 2027-03-01T00:00:00Z, got int"),
    ({"not_before": "2027-03-01T00:00:00Z", "expires_at": "2027-03-01T00:00:00Z"},
     "teams.t.keys[0].expires_at: must be later than not_before"),
    ({"previous": [{"sha256": "b" * 64}]},
     "teams.t.keys[0].previous[0].expires_at: required field is missing"),
    ({"previous": [{"sha256": "a" * 64, "expires_at": "2027-03-01T00:00:00Z"}]},
     "teams.t.keys[0].previous[0].sha256: duplicate key hash (also teams.t.keys[0])"),
    ({"expires_at": "2027-03-01T00:00:00Z",
      "previous": [{"sha256": "b" * 64, "expires_at": "2027-03-02T00:00:00Z"}]},
     "teams.t.keys[0].previous[0].expires_at: must not be later than the key's expires_at"),
    ({"previous": [{"sha256": "not hex", "expires_at": "2027-03-02T00:00:00Z"}]},
     "teams.t.keys[0].previous[0].sha256: must be 64 lowercase hex characters"),
])
def test_key_lifetime_config_is_strict(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(cfg.ConfigError) as error:
        cfg.parse(key_config(**fields), {})
    assert str(error.value).startswith(message), str(error.value)


def test_a_naive_yaml_time_is_refused() -> None:
    text = ("teams: {t: {keys: [{id: k, sha256: '" + "a" * 64 + "', "
            "expires_at: 2027-03-01 10:00:00}]}}")
    with pytest.raises(cfg.ConfigError, match=r"expires_at: the time needs a timezone"):
        cfg.parse(text, {})


def test_a_previous_hash_is_unique_across_teams() -> None:
    raw = {"teams": {
        "a": {"keys": [{"id": "a1", "sha256": "a" * 64}]},
        "b": {"keys": [{"id": "b1", "sha256": "b" * 64, "previous": [
            {"sha256": "a" * 64, "expires_at": "2027-03-01T00:00:00Z"}]}]},
    }}
    with pytest.raises(cfg.ConfigError) as error:
        cfg.from_dict(raw)
    assert str(error.value) == ("teams.b.keys[0].previous[0].sha256: duplicate key hash "
                                "(also teams.a.keys[0])")


def test_the_static_key_path_is_unchanged_without_lifetimes(make_gateway: GatewayFactory,
                                                            mock: Mock) -> None:
    gateway = make_gateway()
    assert gateway.chat("plain").status_code == 200
    assert gateway.call("GET", "tasks/x", headers={"Authorization": f"Bearer {KEYS['research']}x"}
                        ).status_code == 401
