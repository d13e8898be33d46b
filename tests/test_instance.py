"""The instance state machine: every transition the table allows, every one it refuses."""

from __future__ import annotations

import itertools
import logging

import pytest

from catflap.contract.errors import CatflapMisuse
from catflap.pool.instance import (
    _TRANSITIONS,
    STATE_MEANINGS,
    Instance,
    InstanceState,
    SessionEnd,
    render_transitions_markdown,
)

S = InstanceState

ALLOWED = {
    (S.STARTING, S.READY),
    (S.STARTING, S.STOPPING),
    (S.STARTING, S.DEAD),
    (S.READY, S.STOPPING),
    (S.READY, S.DEAD),
    (S.STOPPING, S.DEAD),
}
PAIRS = [(a, b) for a, b in itertools.product(S, S) if a is not b]

#: The shortest way to reach each state from STARTING.
_PATH = {
    S.STARTING: [],
    S.READY: [S.READY],
    S.STOPPING: [S.READY, S.STOPPING],
    S.DEAD: [S.DEAD],
}


def _instance_in(state: InstanceState) -> Instance:
    instance = Instance(instance_id=7, agent_key="echo.my-org", capacity=2, started_at=0.0)
    for step in _PATH[state]:
        instance.set_state(step)
    assert instance.state is state
    return instance


def test_the_table_is_the_one_these_tests_spell_out() -> None:
    assert {(a, b) for a, targets in _TRANSITIONS.items() for b in targets} == ALLOWED


@pytest.mark.parametrize(("old", "new"), sorted(ALLOWED, key=str), ids=str)
async def test_an_allowed_transition_changes_the_state_and_is_logged(
    old: InstanceState, new: InstanceState, caplog: pytest.LogCaptureFixture
) -> None:
    instance = _instance_in(old)
    caplog.set_level(logging.INFO, logger="catflap.pool")
    instance.set_state(new)
    assert instance.state is new
    assert f"= echo.my-org instance 7 pid None: {old.value} -> {new.value}" in caplog.text


@pytest.mark.parametrize(("old", "new"), sorted(set(PAIRS) - ALLOWED, key=str), ids=str)
async def test_a_refused_transition_raises_misuse_and_keeps_the_state(
    old: InstanceState, new: InstanceState
) -> None:
    instance = _instance_in(old)
    with pytest.raises(CatflapMisuse, match=f"{old.value} -> {new.value}"):
        instance.set_state(new)
    assert instance.state is old


@pytest.mark.parametrize("state", list(S), ids=str)
async def test_setting_the_same_state_again_is_a_quiet_no_op(
    state: InstanceState, caplog: pytest.LogCaptureFixture
) -> None:
    instance = _instance_in(state)
    caplog.set_level(logging.INFO, logger="catflap.pool")
    instance.set_state(state)
    assert instance.state is state and caplog.records == []


def test_dead_is_final() -> None:
    assert _TRANSITIONS[S.DEAD] == frozenset()


@pytest.mark.parametrize("state", list(S), ids=str)
async def test_free_slots_exist_only_while_starting_or_ready(state: InstanceState) -> None:
    instance = _instance_in(state)
    expected = 2 if state in (S.STARTING, S.READY) else 0
    assert instance.free_slots == expected


async def test_reserve_refuses_a_full_instance_and_a_duplicate_session() -> None:
    instance = _instance_in(S.READY)
    first = instance.reserve("s1")
    with pytest.raises(CatflapMisuse, match="already holds session s1"):
        instance.reserve("s1")
    instance.reserve("s2")
    with pytest.raises(CatflapMisuse, match="no free slot"):
        instance.reserve("s3")
    instance.release("s1", SessionEnd(status="completed"), now=42.0)
    assert first.ended.result() == SessionEnd(status="completed")
    assert instance.idle_since == 0.0  # s2 still holds a slot
    instance.release("s2", SessionEnd(status="completed"), now=43.0)
    assert instance.idle_since == 43.0


def test_every_state_has_a_meaning_and_a_row_in_the_rendered_table() -> None:
    assert set(STATE_MEANINGS) == set(S)
    table = render_transitions_markdown()
    lines = table.splitlines()
    assert lines[0] == "| state | may become | what it means |"
    assert len(lines) == 2 + len(S)
    assert "| `STARTING` | `READY`, `STOPPING`, `DEAD` |" in table
    assert f"| `DEAD` | (final) | {STATE_MEANINGS[S.DEAD]} |" in table
