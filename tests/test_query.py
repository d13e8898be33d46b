from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from catflap.contract import errors
from catflap.contract.query import QueryParams, parse_query


def assert_bad_request(exc: errors.RequestRejected) -> None:
    assert type(exc) is errors.BadRequest
    assert exc.status == 400
    assert exc.code == "bad_request"


def test_basic() -> None:
    q = parse_query("serviceHost=my-agent.my-org&token=abc&body=eyJ4IjoxfQ%3D%3D")
    assert q.raw == {
        "serviceHost": ["my-agent.my-org"],
        "token": ["abc"],
        "body": ["eyJ4IjoxfQ%3D%3D"],
    }
    assert q.get_one("body") == "eyJ4IjoxfQ%3D%3D"
    assert q.get_one_decoded("body") == "eyJ4IjoxfQ=="
    assert q.get_one("missing") is None
    assert q.get_one_decoded("missing") is None


def test_empty_query() -> None:
    assert parse_query("").raw == {}
    assert parse_query("&&&").raw == {}
    assert parse_query("").get_one("x") is None


def test_empty_pieces_skipped_and_missing_equals() -> None:
    q = parse_query("&a&&b=&c=1&")
    assert q.raw == {"a": [""], "b": [""], "c": ["1"]}
    assert q.get_one("a") == ""
    assert q.get_one_decoded("b") == ""


def test_only_first_equals_splits() -> None:
    q = parse_query("body=abc==&x=a=b")
    assert q.get_one("body") == "abc=="
    assert q.get_one("x") == "a=b"


def test_semicolon_is_not_a_separator() -> None:
    q = parse_query("a=1;b=2")
    assert q.raw == {"a": ["1;b=2"]}


def test_duplicates() -> None:
    q = parse_query("token=a&token=b&x=1")
    assert q.raw["token"] == ["a", "b"]
    assert q.get_one("x") == "1"
    with pytest.raises(errors.BadRequest) as info:
        q.get_one("token")
    assert_bad_request(info.value)
    assert info.value.message == "duplicate query parameter 'token': give it once"
    with pytest.raises(errors.BadRequest) as info:
        q.get_one_decoded("token")
    assert_bad_request(info.value)


def test_duplicates_after_key_decoding() -> None:
    q = parse_query("body=a&%62ody=b")
    assert q.raw == {"body": ["a", "b"]}
    with pytest.raises(errors.BadRequest):
        q.get_one("body")


def test_duplicate_with_same_value_still_refused() -> None:
    with pytest.raises(errors.BadRequest):
        parse_query("a=1&a=1").get_one("a")


def test_plus_preserved() -> None:
    q = parse_query("body=ab+cd&k+ey=1")
    assert q.get_one("body") == "ab+cd"
    assert q.get_one_decoded("body") == "ab+cd"
    assert q.get_one("k+ey") == "1"
    assert q.get_one("k ey") is None


def test_keys_decoded_values_raw() -> None:
    q = parse_query("service%48ost=a%2Eb&caf%C3%A9=%C3%A9&%20=x")
    assert q.raw == {"serviceHost": ["a%2Eb"], "café": ["%C3%A9"], " ": ["x"]}
    assert q.get_one_decoded("serviceHost") == "a.b"
    assert q.get_one_decoded("café") == "é"
    assert q.get_one("café") == "%C3%A9"


def test_percent_encoded_separators_in_values_stay() -> None:
    q = parse_query("a=1%262%3D3")
    assert q.raw == {"a": ["1%262%3D3"]}
    assert q.get_one_decoded("a") == "1&2=3"


def test_bad_utf8_escape_in_key() -> None:
    for query in ("%ff=1", "a%C3=1", "%ED%A0%80=1"):  # last: an encoded surrogate
        with pytest.raises(errors.BadRequest) as info:
            parse_query(query)
        assert_bad_request(info.value)
        assert "UTF-8" in info.value.message


def test_bad_utf8_escape_in_value_only_fails_when_decoded() -> None:
    q = parse_query("a=%ff&b=%C3%28")
    assert q.get_one("a") == "%ff"
    for name in ("a", "b"):
        with pytest.raises(errors.BadRequest) as info:
            q.get_one_decoded(name)
        assert_bad_request(info.value)
        assert "UTF-8" in info.value.message


def test_malformed_escapes_are_kept_literally() -> None:
    q = parse_query("%zz=%&b=%4")
    assert q.raw == {"%zz": ["%"], "b": ["%4"]}
    assert q.get_one_decoded("%zz") == "%"
    assert q.get_one_decoded("b") == "%4"


def test_query_params_is_frozen() -> None:
    q = parse_query("a=1")
    assert isinstance(q, QueryParams)
    with pytest.raises(AttributeError):
        q.raw = {}  # type: ignore[misc]


def _exercise(query: str) -> None:
    try:
        q = parse_query(query)
    except errors.BadRequest as exc:
        assert_bad_request(exc)
        return
    for name, values in q.raw.items():
        assert values
        assert isinstance(name, str)
        try:
            assert q.get_one(name) == values[0]
            q.get_one_decoded(name)
        except errors.BadRequest as exc:
            assert_bad_request(exc)


@given(st.text())
def test_never_crashes_on_arbitrary_text(query: str) -> None:
    _exercise(query)


@given(st.text(alphabet="ab=&%+ 0123456789cdefABCDEF\u00e9", max_size=30))
def test_never_crashes_on_escape_heavy_text(query: str) -> None:
    _exercise(query)


@given(st.dictionaries(st.text(min_size=1), st.text(), max_size=5))
def test_round_trip_of_urlencoded_pairs(pairs: dict[str, str]) -> None:
    from urllib.parse import quote

    query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs.items())
    q = parse_query(query)
    assert set(q.raw) == set(pairs)
    for key, value in pairs.items():
        assert q.get_one_decoded(key) == value
