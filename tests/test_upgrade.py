"""The pure upgrade check: break one field of a template request, assert the exact refusal."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catflap.auth.tokens import mint_token
from catflap.config import AgentConfig, AgentSpec
from catflap.contract.errors import RequestRejected, TokenRejected
from catflap.contract.names import AgentName, OrgName, ServiceHost
from catflap.gateway.httphead import HeadParser, RequestHead
from catflap.gateway.upgrade import check_upgrade

from .conftest import ECHO, TEST_KEYRING

NOW = 1_800_000_000.0
AGENTS = {
    "open.org": AgentSpec(ServiceHost(AgentName("open"), OrgName("org")), AgentConfig(path=ECHO)),
    "tok.org": AgentSpec(
        ServiceHost(AgentName("tok"), OrgName("org")),
        AgentConfig(path=ECHO, websocket_auth="token"),
    ),
}


def directory(service_host: ServiceHost) -> AgentSpec | None:
    return AGENTS.get(str(service_host))


def head(
    target: str = "/ws/generic/open.org", *, method: str = "GET", drop: str = "", **replace: str
) -> RequestHead:
    headers = {
        "host": "x",
        "upgrade": "websocket",
        "connection": "Upgrade",
        "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
        "sec-websocket-version": "13",
    }
    headers.update({k.replace("_", "-"): v for k, v in replace.items()})
    headers.pop(drop, None)
    return RequestHead(
        method=method, target=target, http_version="1.1", headers=list(headers.items())
    )


def refusal(request: RequestHead) -> tuple[int, str]:
    with pytest.raises(RequestRejected) as info:
        check_upgrade(request, directory, TEST_KEYRING, now=NOW)
    return info.value.status, info.value.to_body()["code"]


def test_template_request_is_accepted() -> None:
    accepted = check_upgrade(head(), directory, TEST_KEYRING, now=NOW)
    assert accepted.agent is AGENTS["open.org"]
    assert accepted.claims is None and accepted.body is None


@pytest.mark.parametrize(
    ("request_head", "expected"),
    [
        (head(method="PUT"), (405, "method_not_allowed")),
        (head(drop="upgrade"), (426, "upgrade_required")),
        (head(connection="keep-alive"), (426, "upgrade_required")),
        (head(drop="sec-websocket-version"), (426, "upgrade_required")),
        (head(sec_websocket_version="12"), (426, "upgrade_required")),
        (head(drop="sec-websocket-key"), (400, "invalid_handshake")),
        (head(sec_websocket_key="not base64!"), (400, "invalid_handshake")),
        (head("/ws"), (404, "not_found")),
        (head("/ws/generic/open.org/tok/extra"), (404, "not_found")),
        (head("/ws/generic"), (400, "invalid_service_host")),
        (head("/ws/generic/open"), (400, "invalid_service_host")),
        (head("/ws/generic/.org"), (400, "invalid_service_host")),
        (head("/ws/generic/open.org?serviceHost=tok.org"), (400, "invalid_service_host")),
        (head("/ws/generic?serviceHost=open.org&serviceHost=open.org"), (400, "bad_request")),
        (head("/ws/generic/open.org?token=a&token=b"), (400, "bad_request")),
        (head("/ws/generic/op%C3%A9n.org"), (400, "invalid_service_host")),
        (head("/ws/generic/%FF.org"), (400, "bad_request")),
        (head("/ws/generic/gone.org"), (404, "404")),
        (head("/ws/generic/tok.org"), (403, "token_missing")),
        (head("/ws/generic/open.org?body=%%%"), (400, "invalid_body")),
    ],
)
def test_one_broken_field_gets_its_status(
    request_head: RequestHead, expected: tuple[int, str]
) -> None:
    assert refusal(request_head) == expected


def test_token_order_is_header_then_query_then_path() -> None:
    good, claims = mint_token(TEST_KEYRING, "tok.org", now=NOW)
    # The header wins, so a bad header fails even with a good query token and path token.
    with pytest.raises(TokenRejected):
        check_upgrade(
            head(f"/ws/generic/tok.org/{good}?token={good}", authorization="Bearer x.y"),
            directory,
            TEST_KEYRING,
            now=NOW,
        )
    with pytest.raises(TokenRejected):
        check_upgrade(
            head(f"/ws/generic/tok.org/{good}?token=x.y"), directory, TEST_KEYRING, now=NOW
        )
    accepted = check_upgrade(head(f"/ws/generic/tok.org/{good}"), directory, TEST_KEYRING, now=NOW)
    assert accepted.session_id == claims.jti


def test_a_non_bearer_authorization_header_is_not_a_token() -> None:
    good, _ = mint_token(TEST_KEYRING, "tok.org", now=NOW)
    accepted = check_upgrade(
        head(f"/ws/generic/tok.org?token={good}", authorization="Basic abc"),
        directory,
        TEST_KEYRING,
        now=NOW,
    )
    assert accepted.claims is not None


def test_query_service_host_may_repeat_the_path() -> None:
    accepted = check_upgrade(
        head("/ws/generic/open.org?serviceHost=open.org"), directory, TEST_KEYRING, now=NOW
    )
    assert accepted.agent is AGENTS["open.org"]


@settings(max_examples=400, deadline=None)
@given(path=st.text(max_size=80), query=st.text(max_size=80))
def test_arbitrary_urls_only_ever_raise_typed_refusals(path: str, query: str) -> None:
    target = "/ws/generic/" + path + ("?" + query if query else "")
    with contextlib.suppress(RequestRejected):
        check_upgrade(dataclasses.replace(head(), target=target), directory, TEST_KEYRING, now=NOW)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=400))
def test_head_parser_only_ever_raises_typed_refusals(data: bytes) -> None:
    with contextlib.suppress(RequestRejected):
        HeadParser().feed(b"GET /ws/generic/a.b HTTP/1.1\r\n" + data)


def test_head_parser_returns_bytes_after_the_head() -> None:
    raw = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x00"
    parser = HeadParser()
    assert parser.feed(raw[:10]) is None
    result = parser.feed(raw[10:])
    assert result is not None
    parsed, trailing = result
    assert parsed.path == "/ws" and parsed.header("upgrade") == "websocket"
    assert trailing == b"\x81\x00"


def test_unused_path_is_fine(tmp_path: Path) -> None:
    # A path token on a "none" agent is ignored, not an error.
    accepted = check_upgrade(
        head("/ws/generic/open.org/whatever"), directory, TEST_KEYRING, now=NOW
    )
    assert accepted.claims is None
