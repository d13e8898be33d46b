from __future__ import annotations

import base64
import contextlib
import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catflap.contract import errors, limits
from catflap.contract.body import DecodedBody, decode_body, encode_body

# A value whose padded standard base64 contains '+', '/' and '=' (checked below).
VALUE = {"k": "ÿÿþ"}
VALUE_BYTES = json.dumps(VALUE, separators=(",", ":"), ensure_ascii=False).encode()
STANDARD = "eyJrIjoiw7/Dv8O+In0="


def compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def assert_invalid(raw: str) -> errors.InvalidBody:
    with pytest.raises(errors.InvalidBody) as info:
        decode_body(raw)
    exc = info.value
    assert type(exc) is errors.InvalidBody
    assert exc.status == 400
    assert exc.code == "invalid_body"
    return exc


def assert_too_large(raw: str) -> errors.BodyTooLarge:
    with pytest.raises(errors.BodyTooLarge) as info:
        decode_body(raw)
    exc = info.value
    assert type(exc) is errors.BodyTooLarge
    assert exc.status == 413
    assert exc.code == "body_too_large"
    return exc


def test_fixture_has_plus_slash_and_padding() -> None:
    assert base64.b64encode(VALUE_BYTES).decode() == STANDARD
    assert "+" in STANDARD
    assert "/" in STANDARD
    assert STANDARD.endswith("=")


def _pct_all(text: str) -> str:
    return "".join(f"%{ord(c):02X}" for c in text)


URLSAFE = STANDARD.replace("+", "-").replace("/", "_")
VARIANTS = {
    "raw standard padded": STANDARD,
    "raw standard padded, '+' as space": STANDARD.replace("+", " "),
    "percent-encoded standard padded": quote(STANDARD, safe=""),
    "percent-encoded, lower-case escapes": re.sub(
        "%[0-9A-F]{2}", lambda m: m.group().lower(), quote(STANDARD, safe="")
    ),
    "percent-encoded space for '+'": STANDARD.replace("+", "%20"),
    "every character percent-encoded": _pct_all(STANDARD),
    "url-safe padded": URLSAFE,
    "standard unpadded": STANDARD.rstrip("="),
    "url-safe unpadded": URLSAFE.rstrip("="),
    "url-safe unpadded percent-encoded": quote(URLSAFE.rstrip("="), safe=""),
    "url-safe padded percent-encoded": quote(URLSAFE, safe=""),
    "extra padding": STANDARD + "==",
}


@pytest.mark.parametrize("raw", VARIANTS.values(), ids=list(VARIANTS))
def test_every_variant_decodes_to_the_same_value(raw: str) -> None:
    body = decode_body(raw)
    assert isinstance(body, DecodedBody)
    assert body.value == VALUE
    assert body.json_bytes == VALUE_BYTES
    assert body.forward == quote(STANDARD, safe="")
    assert body.forward == "eyJrIjoiw7%2FDv8O%2BIn0%3D"


def test_url_safe_variants_really_differ() -> None:
    assert "-" in URLSAFE
    assert "_" in URLSAFE
    assert " " in VARIANTS["raw standard padded, '+' as space"]


def test_forward_keeps_original_bytes() -> None:
    # Whitespace and key order of the client's JSON are forwarded unchanged.
    original = b'{ "b" : 1,\n "a": [1, 2] }'
    body = decode_body(base64.urlsafe_b64encode(original).decode().rstrip("="))
    assert body.json_bytes == original
    assert body.value == {"b": 1, "a": [1, 2]}
    assert body.forward == quote(base64.b64encode(original).decode(), safe="")


@pytest.mark.parametrize("value", [None, True, 0, -1.5, "text", [], {}, [1, {"a": None}]])
def test_any_json_value_is_accepted(value: Any) -> None:
    raw = base64.b64encode(json.dumps(value).encode()).decode()
    assert decode_body(raw).value == value


def _json_of_size(size: int) -> bytes:
    data = json.dumps({"x": "a" * (size - 8)}, separators=(",", ":")).encode()
    assert len(data) == size
    return data


def test_4096_bytes_ok_4097_too_large() -> None:
    assert limits.BODY_MAX_BYTES == 4096
    ok = _json_of_size(4096)
    body = decode_body(quote(base64.b64encode(ok).decode(), safe=""))
    assert body.json_bytes == ok
    exc = assert_too_large(base64.b64encode(_json_of_size(4097)).decode())
    assert "4097" in exc.message
    assert "4096" in exc.message


def test_4096_bytes_of_multibyte_utf8() -> None:
    # The limit is on bytes, not characters.
    data = json.dumps(["é" * 2046], ensure_ascii=False).encode()
    assert len(data) == 4096
    decode_body(base64.b64encode(data).decode())
    data = json.dumps(["é" * 2046 + "x"], ensure_ascii=False).encode()
    assert_too_large(base64.b64encode(data).decode())


def test_worst_case_percent_encoded_4096_bytes_fits_the_char_limit() -> None:
    raw = _pct_all(base64.b64encode(_json_of_size(4096)).decode())
    assert len(raw) == limits.BODY_MAX_ENCODED_CHARS
    decode_body(raw)


def test_over_encoded_char_limit_refused_without_decoding() -> None:
    exc = assert_too_large("!" * (limits.BODY_MAX_ENCODED_CHARS + 1))
    assert str(limits.BODY_MAX_ENCODED_CHARS) in exc.message


def test_valid_base64_not_utf8() -> None:
    exc = assert_invalid(base64.b64encode(b'"\xff\xfe"').decode())
    assert "not UTF-8" in exc.message


def test_utf8_bom_is_invalid() -> None:
    assert_invalid(base64.b64encode(b"\xef\xbb\xbf{}").decode())


def test_deeply_nested_10000_is_too_large() -> None:
    data = b"[" * 10_000 + b"]" * 10_000
    assert_too_large(base64.b64encode(data).decode())


def test_deeply_nested_2000_within_limit_is_400_not_recursion_error() -> None:
    data = b"[" * 2_000 + b"]" * 2_000
    assert len(data) <= limits.BODY_MAX_BYTES
    raw = base64.b64encode(data).decode()
    try:
        body = decode_body(raw)
    except errors.InvalidBody as exc:
        assert exc.code == "invalid_body"
    else:
        assert body.json_bytes == data


def test_deep_objects_within_limit() -> None:
    data = b'{"a":' * 600 + b"1" + b"}" * 600
    assert len(data) <= limits.BODY_MAX_BYTES
    with contextlib.suppress(errors.InvalidBody):
        decode_body(base64.b64encode(data).decode())


@pytest.mark.parametrize("text", ["NaN", "[Infinity]", '{"a":-Infinity}', "[1,NaN]"])
def test_non_json_constants(text: str) -> None:
    exc = assert_invalid(base64.b64encode(text.encode()).decode())
    assert "not valid JSON" in exc.message


def test_empty() -> None:
    exc = assert_invalid("")
    assert exc.message == "empty ?body=: omit the parameter or pass base64-encoded JSON"


@pytest.mark.parametrize(
    "raw",
    [
        "!!!!",
        "not base64 at all",  # spaces become '+': valid alphabet, but not JSON
        "e",  # length % 4 == 1
        "eyJ4IjoxfQ==x",  # data after padding
        "ey=J4IjoxfQ",  # padding in the middle
        "eyJ4IjoxfQ==\n",  # trailing newline
        "eyJ4Ijox\nfQ==",
        "eyJ4IjoxfQ==%0A",  # percent-encoded newline
        "\teyJ4IjoxfQ==",
        "eyJ4IjoxfQ%3D%3",  # truncated escape
        "%ff%fe",  # percent-escape that is not UTF-8
        "eyJé",  # non-ASCII
        "eyJ\uff14",  # fullwidth digit
        "====",  # only padding
        base64.b64encode(b"{").decode(),  # not JSON
        base64.b64encode(b"{}x").decode(),  # trailing garbage
        "=",
    ],
)
def test_garbage(raw: str) -> None:
    exc = assert_invalid(raw)
    assert exc.message.startswith(("?body= must be base64-encoded UTF-8 JSON", "empty ?body="))


def test_mixed_alphabets_rejected() -> None:
    # '+' and '_' in one value: neither standard nor URL-safe base64.
    mixed = STANDARD.replace("/", "_")
    assert "+" in mixed
    assert "_" in mixed
    exc = assert_invalid(mixed)
    assert "mixes" in exc.message


def test_error_messages_say_what_to_do() -> None:
    exc = assert_invalid("!!!!")
    assert "base64.b64encode(json.dumps(body).encode())" in exc.message


# --- encode_body --------------------------------------------------------------------------


def test_encode_body_is_compact_padded_standard_base64() -> None:
    encoded = encode_body({"k": "ÿÿþ"})
    assert encoded == STANDARD
    assert base64.b64decode(encoded) == b'{"k":"\xc3\xbf\xc3\xbf\xc3\xbe"}'
    assert encode_body({"a": 1, "b": [1, 2]}) == base64.b64encode(b'{"a":1,"b":[1,2]}').decode()
    assert len(encode_body("ab")) % 4 == 0


def test_encode_body_limit() -> None:
    encode_body({"x": "a" * (4096 - 8)})
    with pytest.raises(errors.BodyTooLarge) as info:
        encode_body({"x": "a" * (4097 - 8)})
    assert info.value.status == 413
    assert "4097" in info.value.message


@pytest.mark.parametrize("value", [float("nan"), [float("inf")], {1j: 1}, object(), "\ud800"])
def test_encode_body_rejects_non_json(value: Any) -> None:
    with pytest.raises(errors.InvalidBody):
        encode_body(value)


def test_encode_then_decode() -> None:
    encoded = encode_body(VALUE)
    body = decode_body(encoded)
    assert body.value == VALUE
    assert body.forward == quote(encoded, safe="")


# --- properties ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def _standard(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _urlsafe(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode()


ENCODERS: dict[str, Callable[[bytes], str]] = {
    "standard": _standard,
    "standard, '+' as space": lambda b: _standard(b).replace("+", " "),
    "standard percent-encoded": lambda b: quote(_standard(b), safe=""),
    "standard unpadded": lambda b: _standard(b).rstrip("="),
    "standard unpadded, '+' as space": lambda b: _standard(b).rstrip("=").replace("+", " "),
    "standard all percent-encoded": lambda b: _pct_all(_standard(b)),
    "url-safe": _urlsafe,
    "url-safe unpadded": lambda b: _urlsafe(b).rstrip("="),
    "url-safe unpadded percent-encoded": lambda b: quote(_urlsafe(b).rstrip("="), safe=""),
    "url-safe percent-encoded": lambda b: quote(_urlsafe(b), safe=""),
}


@given(json_values, st.sampled_from(sorted(ENCODERS)), st.booleans())
def test_round_trip_in_every_variant(value: Any, encoder: str, ascii_only: bool) -> None:
    data = json.dumps(value, ensure_ascii=ascii_only).encode()
    body = decode_body(ENCODERS[encoder](data))
    assert body.value == value
    assert body.json_bytes == data
    assert body.forward == quote(_standard(data), safe="")


@given(json_values)
def test_encode_body_round_trip(value: Any) -> None:
    encoded = encode_body(value)
    assert encoded == _standard(compact(value))
    body = decode_body(encoded)
    assert body.value == value
    assert body.forward == quote(encoded, safe="")


def _no_crash(raw: str) -> None:
    try:
        body = decode_body(raw)
    except (errors.InvalidBody, errors.BodyTooLarge) as exc:
        assert exc.message
        assert exc.status in (400, 413)
    else:
        assert len(body.json_bytes) <= limits.BODY_MAX_BYTES
        assert body.forward == quote(_standard(body.json_bytes), safe="")


@given(st.text())
def test_never_crashes_on_arbitrary_text(raw: str) -> None:
    _no_crash(raw)


@given(st.text(alphabet="eyJ0IjoxfQABCabc+/-_= %0123456789\n", max_size=40))
def test_never_crashes_on_base64_like_text(raw: str) -> None:
    _no_crash(raw)


@settings(max_examples=50)
@given(st.binary(max_size=64))
def test_never_crashes_on_arbitrary_decoded_bytes(data: bytes) -> None:
    _no_crash(_standard(data))
    _no_crash(_urlsafe(data).rstrip("="))
