from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from catflap.contract import errors, limits
from catflap.contract.names import (
    AGENT_NAME_PATTERN,
    ORG_NAME_PATTERN,
    AgentName,
    OrgName,
    ServiceHost,
    agent_name_problem,
    org_name_problem,
    parse_service_host,
)


def assert_invalid(text: str) -> errors.InvalidServiceHost:
    with pytest.raises(errors.InvalidServiceHost) as info:
        parse_service_host(text)
    exc = info.value
    assert type(exc) is errors.InvalidServiceHost
    assert exc.status == 400
    assert exc.code == "invalid_service_host"
    assert exc.to_body() == {"error": exc.message, "code": "invalid_service_host"}
    return exc


def test_patterns_are_pccs() -> None:
    assert AGENT_NAME_PATTERN == r"^[a-z0-9]([-a-z0-9]*[a-z0-9])$"
    assert ORG_NAME_PATTERN == r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


@pytest.mark.parametrize(
    ("text", "agent", "org"),
    [
        ("my-agent.my-org", "my-agent", "my-org"),
        ("ab.c", "ab", "c"),
        ("a1.three-random-words-12345", "a1", "three-random-words-12345"),
        ("00.0", "00", "0"),
        ("a--b.c--d", "a--b", "c--d"),
        ("a" * 54 + "." + "b" * 63, "a" * 54, "b" * 63),
    ],
)
def test_valid(text: str, agent: str, org: str) -> None:
    host = parse_service_host(text)
    assert host == ServiceHost(AgentName(agent), OrgName(org))
    assert host.agent == agent
    assert host.org == org
    assert str(host) == text


def test_service_host_is_frozen() -> None:
    host = parse_service_host("ab.c")
    with pytest.raises(AttributeError):
        host.agent = AgentName("xy")  # type: ignore[misc]


def test_agent_length_limit() -> None:
    assert limits.AGENT_NAME_MAX_LEN == 54
    assert agent_name_problem("a" * 54) is None
    problem = agent_name_problem("a" * 55)
    assert problem is not None
    assert "55 characters" in problem
    assert "at most 54 characters" in problem
    assert AGENT_NAME_PATTERN in problem
    parse_service_host("a" * 54 + ".org")
    assert_invalid("a" * 55 + ".org")


def test_org_length_limit() -> None:
    longest = limits.ORG_NAME_MAX_LEN
    assert org_name_problem("b" * longest) is None
    problem = org_name_problem("b" * (longest + 1))
    assert problem is not None
    assert f"at most {longest} characters" in problem
    assert_invalid("agent." + "b" * (longest + 1))


def test_single_char_agent_invalid_but_org_valid() -> None:
    assert agent_name_problem("a") is not None
    assert org_name_problem("a") is None
    exc = assert_invalid("a.org")
    assert "agent name" in exc.message
    parse_service_host("ab.o")


def test_over_200_chars_refused_first() -> None:
    exc = assert_invalid("a" * 201)
    assert "201 characters" in exc.message
    assert "200" in exc.message
    # Even one that would otherwise be judged for its dots is refused for its length.
    exc = assert_invalid("." * 201)
    assert "201 characters" in exc.message
    # 200 exactly is judged on its contents (and is invalid here because of the lengths).
    exc = assert_invalid("a" * 100 + "." + "b" * 99)
    assert "200" not in exc.message.split(":")[0]


@pytest.mark.parametrize(
    "text",
    [
        "my-agent.my-org\n",
        "my-agent\n.my-org",
        "\nmy-agent.my-org",
        "my-agent.my-org\r",
        " my-agent.my-org",
        "my-agent.my-org ",
        "my agent.my-org",
    ],
)
def test_whitespace_and_trailing_newline(text: str) -> None:
    assert_invalid(text)


@pytest.mark.parametrize(
    "text", ["myagent", "a.b.c", "my-agent.my-org.", ".my-agent.my-org", "my-agent..my-org", ""]
)
def test_dots(text: str) -> None:
    exc = assert_invalid(text)
    assert "exactly one '.'" in exc.message


@pytest.mark.parametrize("text", [".my-org", "my-agent.", "."])
def test_empty_part(text: str) -> None:
    exc = assert_invalid(text)
    assert "is empty" in exc.message


@pytest.mark.parametrize(
    "text",
    [
        "agént.org",
        "agent.orgé",
        "ag\uff10\uff11.org",  # fullwidth digits: str.isalnum() and str.isdigit() accept them
        "ab.\u0661\u0662",  # Arabic-Indic digits
        "a\u212a.org",  # Kelvin sign, which case-folds to 'k'
        "ab.org\u0131",  # dotless i
        "ab\u200b.org",  # zero-width space
    ],
)
def test_unicode_rejected(text: str) -> None:
    exc = assert_invalid(text)
    assert "non-ASCII" in exc.message


@pytest.mark.parametrize("text", ["My-Agent.my-org", "my-agent.MY-ORG", "AB.org"])
def test_upper_case_rejected_with_explanation(text: str) -> None:
    exc = assert_invalid(text)
    assert "lower-case" in exc.message


@pytest.mark.parametrize(
    "text",
    ["-agent.org", "agent-.org", "agent.-org", "agent.org-", "-.org", "ag_ent.org", "ag+nt.org"],
)
def test_bad_characters_and_hyphens(text: str) -> None:
    exc = assert_invalid(text)
    assert "must match" in exc.message


def test_messages_name_the_rule() -> None:
    problem = agent_name_problem("a")
    assert problem is not None
    assert f"must match {AGENT_NAME_PATTERN} and be at most 54 characters" in problem
    problem = org_name_problem("-")
    assert problem is not None
    assert f"must match {ORG_NAME_PATTERN} and be at most 63 characters" in problem


def test_long_names_are_elided_in_messages() -> None:
    problem = agent_name_problem("A" * 54)
    assert problem is not None
    assert "A" * 81 not in problem


_agent = st.from_regex(r"[a-z0-9]([-a-z0-9]*[a-z0-9])", fullmatch=True).filter(
    lambda s: len(s) <= 54
)
_org = st.from_regex(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", fullmatch=True).filter(
    lambda s: len(s) <= 63
)


@given(_agent, _org)
def test_generated_valid_names_parse(agent: str, org: str) -> None:
    assert agent_name_problem(agent) is None
    assert org_name_problem(org) is None
    host = parse_service_host(f"{agent}.{org}")
    assert (host.agent, host.org) == (agent, org)
    assert str(host) == f"{agent}.{org}"


@given(st.text())
def test_never_crashes_on_arbitrary_text(text: str) -> None:
    try:
        host = parse_service_host(text)
    except errors.InvalidServiceHost as exc:
        assert exc.message
    else:
        assert str(host) == text
        assert text.isascii()


@given(st.text(alphabet="aZ0-.\n_é", max_size=12))
def test_never_crashes_on_near_valid_text(text: str) -> None:
    try:
        host = parse_service_host(text)
    except errors.InvalidServiceHost:
        pass
    else:
        assert str(host) == text
