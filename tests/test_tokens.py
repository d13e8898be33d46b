"""Session tokens: wire format, every rejection reason, key rotation and robustness."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import string
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from catflap.auth import (
    TOKEN_MAX_CHARS,
    KeyRing,
    SigningKey,
    TokenClaims,
    TokenFailure,
    mint_token,
    rejection,
    verify_token,
)
from catflap.contract import limits
from catflap.contract.errors import CatflapMisuse, TokenRejected

HOST = "my-agent.my-org"
NOW = 1_700_000_000.0
K1 = SigningKey(kid="k1", secret=b"first-secret-32-bytes-long......")
K2 = SigningKey(kid="k2", secret=b"second-secret-32-bytes-long.....")
RING = KeyRing([K1])
B64URL_ALPHABET = string.ascii_letters + string.digits + "-_"


# --- helpers written independently of the implementation ----------------------------------


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def sign_raw(payload: bytes, secret: bytes = K1.secret) -> str:
    """A token over arbitrary payload bytes, correctly signed with ``secret``."""
    segment = b64(payload)
    mac = hmac.new(secret, segment.encode("ascii"), hashlib.sha256).digest()
    return f"{segment}.{b64(mac)}"


def sign(claims: dict[str, Any], secret: bytes = K1.secret) -> str:
    return sign_raw(json.dumps(claims, separators=(",", ":")).encode(), secret)


def good_claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "sh": HOST,
        "exp": int(NOW) + 300,
        "iat": int(NOW),
        "jti": "0b8f6a52-4c6e-4f8e-9d55-3f3f0f1d2e3c",
        "kid": "k1",
    }
    claims.update(overrides)
    return claims


def reason_of(call: Callable[[], object]) -> str:
    with pytest.raises(TokenRejected) as caught:
        call()
    return caught.value.reason


def verify(token: str, ring: KeyRing = RING, *, host: str = HOST, now: float = NOW) -> TokenClaims:
    return verify_token(token, ring, service_host=host, now=now)


# --- minting and the wire format ----------------------------------------------------------


def test_mint_then_verify_returns_the_minted_claims() -> None:
    token, claims = mint_token(RING, HOST, now=NOW, jti="session-1")
    assert verify(token) == claims
    assert claims == TokenClaims(
        sh=HOST, exp=int(NOW) + 300, iat=int(NOW), jti="session-1", kid="k1"
    )


def test_minted_token_has_the_exact_wire_shape() -> None:
    token, claims = mint_token(RING, HOST, now=NOW, jti="session-1")
    payload_segment, signature_segment = token.split(".")
    assert "=" not in token
    assert set(token) <= set(B64URL_ALPHABET + ".")
    payload = unb64(payload_segment)
    assert json.loads(payload) == {
        "sh": HOST,
        "exp": claims.exp,
        "iat": claims.iat,
        "jti": "session-1",
        "kid": "k1",
    }
    assert payload == json.dumps(json.loads(payload), separators=(",", ":")).encode()
    expected_mac = hmac.new(K1.secret, payload_segment.encode("ascii"), hashlib.sha256).digest()
    assert unb64(signature_segment) == expected_mac


def test_mint_defaults_to_a_uuid4_jti_and_the_contract_ttl() -> None:
    token, claims = mint_token(RING, HOST, now=NOW)
    assert uuid.UUID(claims.jti).version == 4
    assert claims.exp - claims.iat == limits.TOKEN_TTL_S == 300
    assert mint_token(RING, HOST, now=NOW)[1].jti != claims.jti


def test_mint_floors_a_fractional_clock_and_applies_the_ttl() -> None:
    _, claims = mint_token(RING, HOST, now=NOW + 0.99, ttl=60)
    assert (claims.iat, claims.exp) == (int(NOW), int(NOW) + 60)


def test_mint_signs_with_the_current_key_of_the_ring() -> None:
    _, claims = mint_token(KeyRing([K2, K1]), HOST, now=NOW)
    assert claims.kid == "k2"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"service_host": ""},
        {"ttl": 0},
        {"ttl": -5},
        {"jti": ""},
        {"service_host": "x" * TOKEN_MAX_CHARS},
    ],
)
def test_mint_refuses_caller_mistakes_as_misuse(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"service_host": HOST, "now": NOW} | kwargs
    with pytest.raises(CatflapMisuse):
        mint_token(RING, **args)


# --- every rejection reason ---------------------------------------------------------------


def test_verify_rejects_tampered_payload_as_bad_signature() -> None:
    token, _ = mint_token(RING, HOST, now=NOW)
    _, signature_segment = token.split(".")
    forged_payload = json.dumps(good_claims(sh="other-agent.my-org"), separators=(",", ":"))
    forged = f"{b64(forged_payload.encode())}.{signature_segment}"
    assert reason_of(lambda: verify(forged, host="other-agent.my-org")) == "bad_signature"


def test_verify_rejects_tampered_signature_as_bad_signature() -> None:
    token, _ = mint_token(RING, HOST, now=NOW)
    payload_segment, signature_segment = token.split(".")
    flipped = ("B" if signature_segment[0] == "A" else "A") + signature_segment[1:]
    assert reason_of(lambda: verify(f"{payload_segment}.{flipped}")) == "bad_signature"


def test_verify_rejects_token_signed_with_another_secret_under_a_known_kid() -> None:
    token = sign(good_claims(kid="k1"), secret=b"not-the-real-secret")
    assert reason_of(lambda: verify(token)) == TokenFailure.BAD_SIGNATURE


def test_verify_rejects_token_whose_kid_names_a_different_key_on_the_ring() -> None:
    token = sign(good_claims(kid="k2"), secret=K1.secret)
    assert reason_of(lambda: verify(token, KeyRing([K2, K1]))) == "bad_signature"


def test_verify_accepts_a_hand_built_token_in_the_contract_format() -> None:
    assert verify(sign(good_claims())) == TokenClaims(**good_claims())


def test_verify_treats_exactly_exp_as_expired_and_one_second_earlier_as_valid() -> None:
    token, claims = mint_token(RING, HOST, now=NOW)
    assert verify(token, now=claims.exp - 1) == claims
    assert verify(token, now=claims.exp - 0.001) == claims
    assert reason_of(lambda: verify(token, now=claims.exp)) == "expired"
    assert reason_of(lambda: verify(token, now=claims.exp + 3600)) == "expired"


def test_verify_allows_clock_skew_on_iat_but_rejects_tokens_from_further_in_the_future() -> None:
    skew = limits.TOKEN_CLOCK_SKEW_S
    token, claims = mint_token(RING, HOST, now=NOW + skew)
    assert verify(token, now=NOW) == claims
    late_token, _ = mint_token(RING, HOST, now=NOW + skew + 1)
    assert reason_of(lambda: verify(late_token, now=NOW)) == "not_yet_valid"


def test_verify_rejects_token_for_another_agent() -> None:
    token, _ = mint_token(RING, "other-agent.my-org", now=NOW)
    assert reason_of(lambda: verify(token)) == "wrong_agent"


def test_verify_rejects_token_for_the_same_agent_in_another_org() -> None:
    token, _ = mint_token(RING, "my-agent.other-org", now=NOW)
    assert reason_of(lambda: verify(token)) == "wrong_agent"


def test_previous_key_still_verifies_after_rotation_and_fails_once_rotated_out() -> None:
    old_token, _ = mint_token(KeyRing([K1]), HOST, now=NOW)
    rotating = KeyRing([K2, K1])
    assert verify(old_token, rotating).kid == "k1"
    new_token, new_claims = mint_token(rotating, HOST, now=NOW)
    assert new_claims.kid == "k2"
    rotated = KeyRing([K2])
    assert verify(new_token, rotated) == new_claims
    assert reason_of(lambda: verify(old_token, rotated)) == "unknown_key"


def test_verify_rejects_unknown_kid_before_checking_the_signature() -> None:
    token = sign(good_claims(kid="nobody"), secret=b"whatever")
    assert reason_of(lambda: verify(token)) == "unknown_key"


@pytest.mark.parametrize("claim", ["sh", "exp", "iat", "jti", "kid"])
def test_verify_rejects_token_missing_a_claim_and_names_it(claim: str) -> None:
    claims = good_claims()
    del claims[claim]
    with pytest.raises(TokenRejected) as caught:
        verify(sign(claims))
    assert caught.value.reason == "malformed"
    assert repr(claim) in caught.value.message


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        ("exp", True),
        ("exp", False),
        ("iat", True),
        ("exp", "1700000300"),
        ("exp", 1700000300.0),
        ("iat", None),
        ("iat", [1]),
        ("sh", ""),
        ("sh", 5),
        ("sh", None),
        ("jti", ""),
        ("jti", 42),
        ("kid", ""),
        ("kid", {"k": 1}),
    ],
)
def test_verify_rejects_claims_of_the_wrong_type_as_malformed(claim: str, value: object) -> None:
    with pytest.raises(TokenRejected) as caught:
        verify(sign(good_claims(**{claim: value})))
    assert caught.value.reason == "malformed"
    assert repr(claim) in caught.value.message


def test_verify_ignores_extra_claims() -> None:
    assert verify(sign(good_claims(extra="ignored"))).jti == good_claims()["jti"]


def _valid_token() -> str:
    return mint_token(RING, HOST, now=NOW, jti="session-1")[0]


def _valid_segments() -> tuple[str, str]:
    payload_segment, signature_segment = _valid_token().split(".")
    return payload_segment, signature_segment


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("abc", id="one-segment"),
        pytest.param("a.b.c", id="three-segments"),
        pytest.param(".", id="two-empty-segments"),
        pytest.param("eyJ9.", id="empty-signature"),
        pytest.param(".AAAA", id="empty-payload"),
        pytest.param("not a token", id="spaces"),
        pytest.param("Bearer xyz.abc", id="bearer-prefix"),
        pytest.param("====.====", id="only-padding"),
        pytest.param("\x00.\x00", id="nul-bytes"),
        pytest.param("é.é", id="non-ascii"),
        pytest.param("A.AAAA", id="impossible-base64-length"),
        pytest.param(_valid_token() + "=", id="padded-signature"),
        pytest.param(_valid_segments()[0] + "=." + _valid_segments()[1], id="padded-payload"),
        pytest.param(_valid_token() + "\n", id="trailing-newline"),
        pytest.param(" " + _valid_token(), id="leading-space"),
        pytest.param("+" + _valid_token()[1:], id="std-alphabet-plus"),
        pytest.param(_valid_token()[:-3] + "/" + _valid_token()[-2:], id="std-alphabet-slash"),
        pytest.param(_valid_token()[:-1] + "B", id="non-canonical-trailing-bits"),
        pytest.param(_valid_token()[:-2], id="signature-too-short"),
        pytest.param(_valid_token() + "AAAA", id="signature-too-long"),
        pytest.param(sign_raw(b"not json"), id="not-json"),
        pytest.param(sign_raw(b"\xff\xfe{}"), id="not-utf8"),
        pytest.param(sign_raw(b"[1,2,3]"), id="json-array"),
        pytest.param(sign_raw(b"42"), id="json-number"),
        pytest.param(sign_raw(b'"sh"'), id="json-string"),
        pytest.param(sign_raw(b"null"), id="json-null"),
        pytest.param(sign_raw(b"{}"), id="empty-object"),
        pytest.param(sign_raw(b'{"exp":NaN}'), id="json-nan"),
        pytest.param(sign_raw(b"[" * 1400), id="deeply-nested"),
        pytest.param(
            sign_raw(b'{"sh":"a.b","sh":"c.d","exp":1,"iat":1,"jti":"j","kid":"k1"}'),
            id="duplicate-claim",
        ),
        pytest.param(sign(good_claims()).split(".")[0] + "." + b64(b"short"), id="mac-5-bytes"),
    ],
)
def test_verify_rejects_garbage_as_malformed(token: str) -> None:
    assert reason_of(lambda: verify(token)) == "malformed"


def test_verify_rejects_empty_token_as_missing() -> None:
    assert reason_of(lambda: verify("")) == "missing"


def test_verify_rejects_over_long_token_before_decoding() -> None:
    too_long = sign(good_claims(jti="j" * TOKEN_MAX_CHARS))
    assert len(too_long) > TOKEN_MAX_CHARS
    with pytest.raises(TokenRejected) as caught:
        verify(too_long)
    assert caught.value.reason == "malformed"
    assert str(TOKEN_MAX_CHARS) in caught.value.message


def test_verify_accepts_a_token_of_exactly_the_maximum_length() -> None:
    base = len(sign(good_claims(jti="")))
    # Each 3 bytes of payload add 4 characters; find a jti length landing on the limit.
    jti = next(
        "j" * n
        for n in range(1, TOKEN_MAX_CHARS)
        if len(sign(good_claims(jti="j" * n))) == TOKEN_MAX_CHARS
    )
    assert base < TOKEN_MAX_CHARS
    assert verify(sign(good_claims(jti=jti))).jti == jti


@pytest.mark.parametrize(
    ("token_host_now", "expected"),
    [
        # malformed beats unknown key: a missing claim is reported even with an unknown kid
        ((sign({"kid": "nobody"}), HOST, NOW), "malformed"),
        # unknown key beats everything after it
        ((sign(good_claims(kid="nobody", exp=1, sh="x.y")), HOST, NOW), "unknown_key"),
        # a bad signature beats expiry and the wrong agent
        ((sign(good_claims(exp=1, sh="x.y"), secret=b"bad"), HOST, NOW), "bad_signature"),
        # expiry beats not-yet-valid and the wrong agent
        ((sign(good_claims(exp=int(NOW), iat=int(NOW) + 99, sh="x.y")), HOST, NOW), "expired"),
        # not-yet-valid beats the wrong agent
        (
            (sign(good_claims(iat=int(NOW) + 99, exp=int(NOW) + 999, sh="x.y")), HOST, NOW),
            "not_yet_valid",
        ),
    ],
)
def test_verify_reports_the_first_failing_check_in_contract_order(
    token_host_now: tuple[str, str, float], expected: str
) -> None:
    token, host, now = token_host_now
    assert reason_of(lambda: verify(token, host=host, now=now)) == expected


# --- rejection messages -------------------------------------------------------------------


@pytest.mark.parametrize("reason", list(TokenFailure))
def test_rejection_builds_a_403_with_token_reason_code_and_an_actionable_message(
    reason: TokenFailure,
) -> None:
    error = rejection(reason)
    assert isinstance(error, TokenRejected)
    assert error.status == 403
    assert error.reason == reason.value
    assert error.to_body()["code"] == f"token_{reason.value}"
    assert "/v1/public/{agent}/start" in error.message


def test_rejection_includes_the_detail() -> None:
    error = rejection(TokenFailure.MALFORMED, "claim 'exp' missing")
    assert "claim 'exp' missing" in error.message


def test_expired_message_tells_the_client_to_start_a_new_session() -> None:
    assert rejection(TokenFailure.EXPIRED).message == (
        "session token expired: call POST /v1/public/{agent}/start for a new one"
    )


def test_token_failure_values_are_the_contract_reasons() -> None:
    assert {failure.value for failure in TokenFailure} == {
        "missing",
        "malformed",
        "unknown_key",
        "bad_signature",
        "expired",
        "not_yet_valid",
        "wrong_agent",
        "replayed",
    }
    assert TokenFailure("expired") is TokenFailure.EXPIRED
    assert json.dumps(TokenFailure.EXPIRED) == '"expired"'


# --- keys and key rings -------------------------------------------------------------------


def test_signing_key_repr_hides_the_secret() -> None:
    key = SigningKey(kid="k1", secret=b"super-secret-value")
    assert "super-secret-value" not in repr(key)
    assert "k1" in repr(key)
    ring = KeyRing([key])
    assert "super-secret-value" not in repr(ring)
    assert "k1" in repr(ring)


@pytest.mark.parametrize(("kid", "secret"), [("", b"secret"), ("k1", b"")])
def test_signing_key_refuses_empty_kid_or_secret(kid: str, secret: bytes) -> None:
    with pytest.raises(ValueError):
        SigningKey(kid=kid, secret=secret)


def test_key_ring_exposes_current_key_kids_and_lookup() -> None:
    ring = KeyRing([K2, K1])
    assert ring.current is K2
    assert ring.kids == ("k2", "k1")
    assert ring.get("k1") is K1
    assert ring.get("k0") is None


def test_key_ring_refuses_no_keys_and_duplicate_kids() -> None:
    with pytest.raises(ValueError, match="at least one"):
        KeyRing([])
    with pytest.raises(ValueError, match="unique"):
        KeyRing([K1, SigningKey(kid="k1", secret=b"other")])


def test_from_env_makes_the_first_key_current_and_keeps_the_rest_for_verifying() -> None:
    ring = KeyRing.from_env("k2:new-secret,k1:old-secret")
    assert ring.kids == ("k2", "k1")
    assert ring.current == SigningKey(kid="k2", secret=b"new-secret")
    assert ring.get("k1") == SigningKey(kid="k1", secret=b"old-secret")


def test_from_env_keeps_everything_after_the_first_colon_as_utf8_secret() -> None:
    ring = KeyRing.from_env("k1:pa:ss:wörd")
    assert ring.current.secret == "pa:ss:wörd".encode()


def test_from_env_ignores_whitespace_around_the_value_and_kids() -> None:
    ring = KeyRing.from_env("  k2:s2, k1:s1\n")
    assert ring.kids == ("k2", "k1")
    assert ring.current.secret == b"s2"
    assert ring.get("k1") == SigningKey(kid="k1", secret=b"s1")


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "no-colon-here",
        ":secret-without-kid",
        "  :secret",
        "kid-without-secret:",
        "k1:s1,k1:s2",
        "k1:s1,",
        ",k1:s1",
        "k1:s1,,k0:s0",
        "k1:s1,k0",
    ],
)
def test_from_env_refuses_bad_values_and_shows_the_expected_format(value: str) -> None:
    with pytest.raises(ValueError) as caught:
        KeyRing.from_env(value)
    message = str(caught.value)
    assert "kid:secret" in message
    assert "s1" not in message.split("e.g.")[0]  # never echoes a secret


def test_generate_makes_one_random_key_that_round_trips() -> None:
    ring = KeyRing.generate()
    assert len(ring.kids) == 1
    assert len(ring.current.secret) == 32
    int(ring.current.kid, 16)  # hex
    assert KeyRing.generate().current != ring.current
    token, claims = mint_token(ring, HOST, now=NOW)
    assert verify(token, ring) == claims
    assert reason_of(lambda: verify(token, KeyRing.generate())) == "unknown_key"


# --- properties ---------------------------------------------------------------------------


@given(st.text(max_size=3000))
def test_verify_never_raises_anything_but_token_rejected_for_arbitrary_text(token: str) -> None:
    with pytest.raises(TokenRejected):
        verify(token)


@given(st.text(alphabet=B64URL_ALPHABET + ".=+/", max_size=300))
def test_verify_never_raises_anything_but_token_rejected_for_token_like_text(token: str) -> None:
    with pytest.raises(TokenRejected):
        verify(token)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=10,
)


def _mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` about four times in five, otherwise any JSON value."""
    return st.integers(0, 4).flatmap(lambda n: json_values if n == 4 else valid)


def _drop(claims: dict[str, Any], name: str | None) -> dict[str, Any]:
    return {key: value for key, value in claims.items() if key != name}


# Claim sets that are often fully valid, so every check (not only parsing) gets exercised.
claim_like = st.builds(
    _drop,
    st.fixed_dictionaries(
        {
            "sh": _mostly(st.sampled_from([HOST, HOST, "other.org"])),
            "exp": _mostly(st.integers(int(NOW) - 10, int(NOW) + 30)),
            "iat": _mostly(st.integers(int(NOW) - 10, int(NOW) + 10)),
            "jti": _mostly(st.text(min_size=1, max_size=5)),
            "kid": _mostly(st.sampled_from(["k1", "k1", "k2", "k0"])),
        },
        optional={"extra": json_values},
    ),
    st.sampled_from([None, None, None, None, None, "sh", "exp", "iat", "jti", "kid"]),
)


@settings(max_examples=400)
@given(payload=_mostly(claim_like), now=st.floats(NOW - 10, NOW + 10))
def test_verify_on_any_correctly_signed_json_returns_claims_or_raises_token_rejected(
    payload: object, now: float
) -> None:
    token = sign_raw(json.dumps(payload, separators=(",", ":")).encode())
    try:
        claims = verify(token, KeyRing([K1, K2]), now=now)
    except TokenRejected as error:
        assert error.reason in {failure.value for failure in TokenFailure}
        event(error.reason)
    else:
        assert isinstance(payload, dict)
        assert claims == TokenClaims(**{name: payload[name] for name in good_claims()})
        assert claims.sh == HOST
        assert claims.iat <= now + limits.TOKEN_CLOCK_SKEW_S
        assert now < claims.exp
        event("verified")


service_hosts = st.text(min_size=1, max_size=limits.SERVICE_HOST_MAX_LEN)
dns_hosts = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,52}[a-z0-9])?\.[a-z0-9][-a-z0-9]{0,61}\Z")


@given(
    host=service_hosts | dns_hosts,
    now=st.floats(min_value=0, max_value=2**40, allow_nan=False),
    ttl=st.integers(min_value=1, max_value=10**7),
    jti=st.none() | st.text(min_size=1, max_size=64),
)
def test_mint_and_verify_round_trip_for_any_service_host_time_and_ttl(
    host: str, now: float, ttl: int, jti: str | None
) -> None:
    token, claims = mint_token(RING, host, now=now, jti=jti, ttl=ttl)
    assert len(token) <= TOKEN_MAX_CHARS
    assert verify_token(token, RING, service_host=host, now=now) == claims
    assert claims.exp - claims.iat == ttl
    if jti is not None:
        assert claims.jti == jti
    expired_at = float(claims.exp)
    assert reason_of(lambda: verify_token(token, RING, service_host=host, now=expired_at)) == (
        "expired"
    )


@given(data=st.data())
def test_verify_rejects_every_single_character_change_to_a_valid_token(data: st.DataObject) -> None:
    token = _valid_token()
    position = data.draw(st.integers(0, len(token) - 1))
    replacement = data.draw(
        st.sampled_from(B64URL_ALPHABET + ".=").filter(lambda c: c != token[position])
    )
    mutated = token[:position] + replacement + token[position + 1 :]
    assert reason_of(lambda: verify(mutated)) in {"malformed", "bad_signature", "unknown_key"}
