"""Population keys and device credentials (fedfleet.service.enrollment): pure logic."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest

from fedfleet.service.enrollment import (
    CLOCK_SKEW_S,
    DEFAULT_TTL_S,
    MAX_CREDENTIAL_CHARS,
    PopulationKeys,
    enroll_token,
    new_device_id,
)

SECRET = bytes(range(32))
NOW = 1_800_000_000.0
POP = "phones"


def _keys(secret: bytes = SECRET, population: str = POP) -> PopulationKeys:
    return PopulationKeys.from_secret(secret, population)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signed(keys: PopulationKeys, payload: str) -> str:
    """A token over ``payload`` with a *valid* signature: only the payload is wrong."""
    sig = hmac.new(keys.credential_key, f"v1.{payload}".encode(), hashlib.sha256).digest()
    return f"v1.{payload}.{_b64(sig)}"


def test_round_trip_gives_back_the_claims() -> None:
    keys = _keys()
    device = new_device_id()
    cred = keys.issue(device, NOW)
    claims = keys.verify(cred.token, device, NOW + 10)
    assert claims == cred.claims
    assert claims.device_id == device and claims.population == POP
    assert claims.issued_at == int(NOW) and claims.expires_at == int(NOW) + DEFAULT_TTL_S
    assert claims.renew_after == NOW + DEFAULT_TTL_S / 2
    assert len(cred.token) <= MAX_CREDENTIAL_CHARS


def test_the_wire_format_is_the_documented_one() -> None:
    keys = _keys()
    cred = keys.issue("d-0123456789abcdef01234567", NOW, 100, jti="00112233aabbccdd")
    version, payload, sig = cred.token.split(".")
    assert version == "v1"
    body = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    assert body == (
        b'{"exp":1800000100,"iat":1800000000,"jti":"00112233aabbccdd",'
        b'"pop":"phones","sub":"d-0123456789abcdef01234567"}'
    )
    key = hmac.new(SECRET, b"fedfleet/population/credential", hashlib.sha256).digest()
    assert sig == _b64(hmac.new(key, f"v1.{payload}".encode(), hashlib.sha256).digest())
    assert "=" not in cred.token
    assert keys.enroll_token == (
        hmac.new(SECRET, b"fedfleet/population/enroll", hashlib.sha256).hexdigest()
    )
    assert cred.enrollment() == {
        "device_id": "d-0123456789abcdef01234567",
        "population": "phones",
        "credential": cred.token,
        "issued_at": 1_800_000_000.0,
        "expires_at": 1_800_000_100.0,
        "renew_after": 1_800_000_050.0,
    }


def test_device_ids_are_random_and_well_formed() -> None:
    ids = {new_device_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 26 and i.startswith("d-") and int(i[2:], 16) >= 0 for i in ids)


def test_a_forged_signature_is_refused() -> None:
    keys = _keys()
    cred = keys.issue("d-1", NOW)
    head, payload, sig = cred.token.split(".")
    flipped = ("A" if sig[0] != "A" else "B") + sig[1:]
    assert keys.verify(f"{head}.{payload}.{flipped}", "d-1", NOW) is None
    other = _keys(secret=b"another secret of 32 bytes......")
    assert other.verify(cred.token, "d-1", NOW) is None
    # a payload naming another device, with the original signature
    forged = json.dumps({**cred.claims.to_json(), "sub": "d-2"}, sort_keys=True)
    assert keys.verify(f"v1.{_b64(forged.encode())}.{sig}", "d-2", NOW) is None


def test_a_credential_is_bound_to_its_device() -> None:
    keys = _keys()
    cred = keys.issue("d-1", NOW)
    assert keys.verify(cred.token, "d-2", NOW) is None
    assert keys.verify(cred.token, "d-1", NOW) is not None


def test_a_credential_is_bound_to_its_population() -> None:
    cred = _keys(population="phones").issue("d-1", NOW)
    assert _keys(population="tablets").verify(cred.token, "d-1", NOW) is None
    # same secret, other population: the signature is valid, the population is not
    assert _keys().claims_of(cred.token) is not None


def test_expiry_and_not_yet_valid() -> None:
    keys = _keys()
    cred = keys.issue("d-1", NOW, 100)
    assert keys.verify(cred.token, "d-1", NOW + 99.9) is not None
    assert keys.verify(cred.token, "d-1", NOW + 100) is None
    assert keys.verify(cred.token, "d-1", NOW - CLOCK_SKEW_S) is not None
    assert keys.verify(cred.token, "d-1", NOW - CLOCK_SKEW_S - 0.5) is None


def test_revocation_refuses_credentials_issued_at_or_before_it() -> None:
    keys = _keys()
    cred = keys.issue("d-1", NOW)
    assert keys.verify(cred.token, "d-1", NOW + 5, revoked_at=NOW - 1) is not None
    assert keys.verify(cred.token, "d-1", NOW + 5, revoked_at=NOW) is None
    assert keys.verify(cred.token, "d-1", NOW + 5, revoked_at=NOW + 1) is None
    later = keys.issue("d-1", NOW + 10)
    assert keys.verify(later.token, "d-1", NOW + 11, revoked_at=NOW + 1) is not None


@pytest.mark.parametrize(
    "token",
    [
        "",
        "v1",
        "v1..",
        "v1.a.b.c",
        "v2.e30.AAAA",
        "v1.e30=.AAAA",
        "v1.e3$0.AAAA",
        "v1.ëe30.AAAA",
        "x" * (MAX_CREDENTIAL_CHARS + 1),
    ],
)
def test_malformed_strings_are_refused(token: str) -> None:
    assert _keys().verify(token, "d-1", NOW) is None
    assert _keys().claims_of(token) is None


def test_a_too_long_token_is_refused_before_any_work() -> None:
    keys = _keys()
    cred = keys.issue("d-1", NOW)
    assert keys.verify(cred.token + "A" * MAX_CREDENTIAL_CHARS, "d-1", NOW) is None
    with pytest.raises(ValueError, match="512"):
        keys.issue("d-" + "x" * 400, NOW)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff\xfe",
        b"[1,2]",
        b'{"sub":"d-1","pop":"phones","iat":1800000000,"exp":1800000100}',
        b'{"sub":"d-1","pop":"phones","iat":1800000000,"exp":1800000100,"jti":"00112233aabbccdd",'
        b'"admin":true}',
        b'{"sub":"d-1","pop":"phones","iat":"1800000000","exp":1800000100,"jti":"00112233aabbccdd"}',
        b'{"sub":"d-1","pop":"phones","iat":true,"exp":1800000100,"jti":"00112233aabbccdd"}',
        b'{"sub":"d-1","pop":"phones","iat":1800000000,"exp":1800000000,"jti":"00112233aabbccdd"}',
        b'{"sub":"d-1","pop":"phones","iat":1800000000,"exp":1800000100,"jti":"XYZ"}',
        b'{"sub":"","pop":"phones","iat":1800000000,"exp":1800000100,"jti":"00112233aabbccdd"}',
    ],
)
def test_signed_but_malformed_payloads_are_refused(body: bytes) -> None:
    keys = _keys()
    assert keys.verify(_signed(keys, _b64(body)), "d-1", NOW + 1) is None


def test_a_signed_well_formed_payload_is_accepted() -> None:
    """The control for the test above: the same construction with a good body passes."""
    keys = _keys()
    body = (
        b'{"exp":1800000100,"iat":1800000000,"jti":"00112233aabbccdd","pop":"phones","sub":"d-1"}'
    )
    assert keys.verify(_signed(keys, _b64(body)), "d-1", NOW + 1) is not None


def test_a_non_canonical_base64_payload_is_refused() -> None:
    keys = _keys()
    body = (
        b'{"exp":1800000100,"iat":1800000000,"jti":"00112233aabbccdd","pop":"phones","sub":"d-12"}'
    )
    payload = _b64(body)
    # flip the unused low bits of the last character: decodes to the same bytes
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(payload[-1])
    assert len(payload) % 4 in (2, 3)
    twin = payload[:-1] + alphabet[last | 1]
    assert twin != payload
    assert keys.verify(_signed(keys, twin), "d-12", NOW + 1) is None


def test_the_enroll_token_check_is_constant_time_and_exact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keys = _keys()
    calls: list[tuple[object, object]] = []
    real = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert keys.enroll_ok(keys.enroll_token)
    assert calls == [(keys.enroll_token, keys.enroll_token)]
    wrong = keys.enroll_token[:-1] + ("1" if keys.enroll_token[-1] == "0" else "0")
    assert not keys.enroll_ok(wrong)
    assert len(calls) == 2
    assert not keys.enroll_ok(None)
    assert not keys.enroll_ok("")
    assert not keys.enroll_ok("ë" * 64)


def test_the_enroll_token_is_not_a_credential() -> None:
    keys = _keys()
    assert keys.verify(keys.enroll_token, "d-1", NOW) is None


def test_short_secrets_and_bad_lifetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        PopulationKeys.from_secret(b"short", POP)
    with pytest.raises(ValueError, match="empty"):
        PopulationKeys.from_secret(SECRET, "")
    with pytest.raises(ValueError, match="positive"):
        _keys().issue("d-1", NOW, 0)


# -- docs/vectors/credentials.json: the format, for any other implementation -----------------------

VECTORS = json.loads(
    (Path(__file__).resolve().parents[2] / "docs" / "vectors" / "credentials.json").read_text()
)


def test_the_vector_keys_are_derived_as_documented() -> None:
    secret = bytes.fromhex(VECTORS["secret_hex"])
    keys = PopulationKeys.from_secret(secret, VECTORS["population"])
    assert keys.enroll_token == VECTORS["enroll_token"]
    assert keys.credential_key.hex() == VECTORS["credential_key_hex"]
    assert enroll_token(secret) == VECTORS["enroll_token"]


@pytest.mark.parametrize("case", VECTORS["valid"], ids=lambda c: c["name"])
def test_vector_credentials_are_what_the_server_issues(case: dict[str, Any]) -> None:
    keys = PopulationKeys.from_secret(bytes.fromhex(VECTORS["secret_hex"]), case["pop"])
    issued = keys.issue(case["sub"], case["iat"], case["exp"] - case["iat"], jti=case["jti"])
    assert issued.token == case["token"]
    # ... and what the documented recipe gives, written out here without the module
    key = bytes.fromhex(VECTORS["credential_key_hex"])
    payload = _b64(case["payload_json"].encode())
    sig = _b64(hmac.new(key, f"v1.{payload}".encode(), hashlib.sha256).digest())
    assert case["token"] == f"v1.{payload}.{sig}"
    assert json.loads(case["payload_json"]) == {
        k: case[k] for k in ("sub", "pop", "iat", "exp", "jti")
    }
    claims = keys.verify(case["token"], case["sub"], case["accepted_at"])
    assert claims is not None and claims.jti == case["jti"]


@pytest.mark.parametrize(
    ("case", "accepted"),
    [(c, True) for c in VECTORS["accepted"]] + [(c, False) for c in VECTORS["refused"]],
    ids=lambda c: c["name"] if isinstance(c, dict) else str(c),
)
def test_vector_checks(case: dict[str, Any], accepted: bool) -> None:
    keys = PopulationKeys.from_secret(bytes.fromhex(VECTORS["secret_hex"]), VECTORS["population"])
    claims = keys.verify(
        case["token"], case["device_id"], case["now"], revoked_at=case.get("revoked_at")
    )
    assert (claims is not None) == accepted
