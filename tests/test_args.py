"""Which session-arguments class ``bot(args)`` receives, and how it is filled in."""

from __future__ import annotations

import base64
import dataclasses
import importlib
import json
import logging
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.types import Message
from starlette.websockets import WebSocket

from catflap.runtime.args import (
    DailyRoom,
    DailySessionArguments,
    PipecatSessionArguments,
    WebSocketSessionArguments,
    decode_body_param,
    make_bot_session_args,
    make_session_args,
    session_args_class,
)


def optional_module(name: str) -> Any:
    """The module, or ``None`` when the optional ``[pipecat]`` extra is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


pipecat_types = optional_module("pipecat.runner.types")
pipecatcloud_agent = optional_module("pipecatcloud.agent")

#: The class-selection tests need pipecat and pipecatcloud installed (hidden where needed).
needs_pipecat = pytest.mark.skipif(pipecatcloud_agent is None, reason="needs catflap[pipecat]")


def real_websocket() -> WebSocket:
    """A Starlette WebSocket over a scope that never talks to anyone (it is only stored)."""

    async def receive() -> Message:
        raise AssertionError("not used")

    async def send(message: Message) -> None:
        raise AssertionError("not used")

    scope = {"type": "websocket", "path": "/ws", "headers": [], "query_string": b""}
    return WebSocket(scope, receive, send)


def hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make ``import`` of each module raise ImportError for this test."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def build(**overrides: Any) -> Any:
    kwargs: dict[str, Any] = {
        "session_id": "s-1",
        "websocket": real_websocket(),
        "body": {"k": [1, 2]},
        "transport_type": "websocket",
    }
    kwargs.update(overrides)
    return make_session_args(**kwargs)


@needs_pipecat
def test_pipecatcloud_class_is_preferred_and_passes_pipecat_checks() -> None:
    assert session_args_class() is pipecatcloud_agent.WebSocketSessionArguments
    made = build()
    assert isinstance(made, pipecatcloud_agent.WebSocketSessionArguments)
    assert isinstance(made, pipecat_types.WebSocketRunnerArguments)
    assert isinstance(made, pipecat_types.RunnerArguments)


@needs_pipecat
def test_pipecat_runner_class_without_the_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    hide(monkeypatch, "pipecatcloud", "pipecatcloud.agent")
    assert session_args_class() is pipecat_types.WebSocketRunnerArguments
    made = build()
    assert type(made) is pipecat_types.WebSocketRunnerArguments


@needs_pipecat
def test_own_class_without_pipecat(monkeypatch: pytest.MonkeyPatch) -> None:
    hide(monkeypatch, "pipecatcloud", "pipecatcloud.agent", "pipecat", "pipecat.runner")
    hide(monkeypatch, "pipecat.runner.types")
    assert session_args_class() is WebSocketSessionArguments
    made = build()
    assert type(made) is WebSocketSessionArguments


@needs_pipecat
@pytest.mark.parametrize("tier", ["sdk", "pipecat", "own"])
def test_every_tier_gets_the_same_values(monkeypatch: pytest.MonkeyPatch, tier: str) -> None:
    if tier != "sdk":
        hide(monkeypatch, "pipecatcloud", "pipecatcloud.agent")
    if tier == "own":
        hide(monkeypatch, "pipecat", "pipecat.runner", "pipecat.runner.types")
    websocket = real_websocket()
    made = build(websocket=websocket)
    assert made.session_id == "s-1"
    assert made.websocket is websocket
    assert made.body == {"k": [1, 2]}
    assert made.transport_type == "websocket"
    assert made.handle_sigint is False
    assert made.handle_sigterm is False
    assert made.call_data is None
    assert made.pipeline_idle_timeout_secs == 300
    # Absent values stay None: pipecat's own default body would be {}.
    bare = build(body=None, transport_type=None)
    assert (bare.body, bare.transport_type) == (None, None)


@needs_pipecat
def test_own_class_mirrors_pipecat_fields_and_is_keyword_only() -> None:
    own = {f.name for f in dataclasses.fields(WebSocketSessionArguments)}
    pipecat = {f.name for f in dataclasses.fields(pipecat_types.WebSocketRunnerArguments)}
    # cli_args and file_storage are dev-runner features no PCC bot relies on.
    assert own == pipecat - {"cli_args", "file_storage"}
    with pytest.raises(TypeError):
        WebSocketSessionArguments("s", real_websocket())  # type: ignore[call-arg]


# --- POST /bot sessions: PipecatSessionArguments and DailySessionArguments ---------------------

#: Per tier, the modules hidden and the class names expected for (no room, a Daily room).
BOT_TIERS = {
    "sdk": ((), ("PipecatSessionArguments", "DailySessionArguments")),
    "pipecat": (
        ("pipecatcloud", "pipecatcloud.agent"),
        ("RunnerArguments", "DailyRunnerArguments"),
    ),
    "own": (
        ("pipecatcloud", "pipecatcloud.agent", "pipecat", "pipecat.runner", "pipecat.runner.types"),
        ("PipecatSessionArguments", "DailySessionArguments"),
    ),
}


@needs_pipecat
@pytest.mark.parametrize("tier", list(BOT_TIERS))
def test_bot_sessions_get_the_best_class_of_each_tier_with_the_same_values(
    monkeypatch: pytest.MonkeyPatch, tier: str
) -> None:
    hidden, (plain_name, daily_name) = BOT_TIERS[tier]
    hide(monkeypatch, *hidden)
    plain = make_bot_session_args(session_id="s-1", body={"k": 1}, daily=None)
    daily = make_bot_session_args(
        session_id="s-2", body=None, daily=DailyRoom("https://x.daily.co/r", "tok")
    )
    assert (type(plain).__name__, type(daily).__name__) == (plain_name, daily_name)
    assert (plain.session_id, plain.body) == ("s-1", {"k": 1})
    assert (daily.session_id, daily.body, daily.room_url, daily.token) == (
        "s-2",
        None,
        "https://x.daily.co/r",
        "tok",
    )
    for made in (plain, daily):
        assert (made.handle_sigint, made.handle_sigterm, made.call_data) == (False, False, None)
        assert made.pipeline_idle_timeout_secs == 300
    if tier == "own":
        assert (type(plain), type(daily)) == (PipecatSessionArguments, DailySessionArguments)
    else:
        assert isinstance(daily, pipecat_types.DailyRunnerArguments)


@needs_pipecat
@pytest.mark.parametrize(
    ("own", "theirs"),
    [
        (PipecatSessionArguments, "RunnerArguments"),
        (DailySessionArguments, "DailyRunnerArguments"),
    ],
)
def test_own_bot_session_classes_mirror_pipecats_fields(own: type, theirs: str) -> None:
    mine = {f.name for f in dataclasses.fields(own)}
    pipecat = {f.name for f in dataclasses.fields(getattr(pipecat_types, theirs))}
    assert mine == pipecat - {"cli_args", "file_storage"}


def test_session_args_class_picks_per_kind() -> None:
    assert session_args_class("websocket") is session_args_class()
    names = {kind: session_args_class(kind).__name__ for kind in ("pipecat", "daily")}
    assert names["daily"] in {"DailySessionArguments", "DailyRunnerArguments"}
    assert names["pipecat"] in {"PipecatSessionArguments", "RunnerArguments"}


LOG = logging.LoggerAdapter(logging.getLogger("test"))
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=10,
)


@given(JSON)
def test_body_decodes_whether_or_not_plus_became_a_space(value: Any) -> None:
    b64 = base64.b64encode(json.dumps(value).encode()).decode()
    assert decode_body_param(b64, LOG) == value
    # Starlette turns an unencoded '+' into ' '.
    assert decode_body_param(b64.replace("+", " "), LOG) == value


@pytest.mark.parametrize("raw", [None, "", "not base64!", "bm90IGpzb24=", "/w=="])
def test_bad_or_absent_body_is_none(raw: str | None) -> None:
    assert decode_body_param(raw, LOG) is None
