"""The relay's transition table: every row moves the machine where it says, every other event is
refused, the lane's states refuse Python I/O on the sockets, and the docs table is the code's.

Pure unit tests: no sockets, no loop (a fake transport stands in where one is lent).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from catflap.contract.errors import CatflapMisuse
from catflap.gateway.fastlane import LentTransport
from catflap.gateway.relaystate import (
    ROWS,
    SOCKETS_LENT,
    TRANSITIONS,
    IllegalTransition,
    RelayEvent,
    RelayMachine,
    RelayState,
    SocketsLent,
    render_markdown,
)

ILLEGAL = [
    (state, event)
    for state in RelayState
    for event in RelayEvent
    if event not in TRANSITIONS[state]
]


#: A transition as the tests spell it: "STATE EVENT NEXT".
Step = str


@pytest.fixture(name="steps")
def steps_fixture(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Step]]:
    """Every event any relay fires in the test, self-loops included, as "STATE EVENT NEXT"."""
    seen: list[Step] = []
    fire = RelayMachine.fire

    def recording(self: RelayMachine, event: RelayEvent, detail: str = "") -> RelayState:
        before = self.state
        after = fire(self, event, detail)
        seen.append(f"{before.name} {event.name} {after.name}")
        return after

    monkeypatch.setattr(RelayMachine, "fire", recording)
    yield seen


def machine_in(state: RelayState, session_id: str | None = "s-1") -> RelayMachine:
    machine = RelayMachine(session_id)
    machine.state = state
    return machine


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.state.name}-{r.event.name}" for r in ROWS])
def test_every_row_moves_the_machine_to_its_next_state(row: Any) -> None:
    machine = machine_in(row.state)
    assert machine.fire(row.event) is row.next
    assert machine.state is row.next


@pytest.mark.parametrize(
    ("state", "event"), ILLEGAL, ids=[f"{s.name}-{e.name}" for s, e in ILLEGAL]
)
def test_an_event_without_a_row_is_refused_and_the_state_stays(
    state: RelayState, event: RelayEvent, strict_relay_states: list[IllegalTransition]
) -> None:
    machine = machine_in(state)
    with pytest.raises(IllegalTransition) as caught:
        machine.fire(event)
    strict_relay_states.clear()  # expected here
    assert machine.state is state
    assert (caught.value.state, caught.value.event) == (state, event)
    assert isinstance(caught.value, CatflapMisuse)


def test_an_illegal_transition_names_the_session_the_state_and_what_was_allowed(
    strict_relay_states: list[IllegalTransition],
) -> None:
    with pytest.raises(IllegalTransition) as caught:
        machine_in(RelayState.IN_LANE, "sess-42").fire(RelayEvent.CLOSE_FRAME)
    strict_relay_states.clear()  # expected here
    assert str(caught.value) == (
        "relay sess-42: CLOSE_FRAME is not allowed in state IN_LANE "
        "(allowed there: RECALL, HANDED_BACK, LANE_FAILED)"
    )


def test_outside_the_tests_an_illegal_transition_is_logged_and_the_state_stays(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(RelayMachine, "strict", False)
    machine = machine_in(RelayState.DONE)
    with caplog.at_level(logging.ERROR, "catflap.gateway"):
        assert machine.fire(RelayEvent.START) is RelayState.DONE
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    assert record.getMessage() == (
        "! relay s-1: START is not allowed in state DONE (allowed there: GATEWAY_CLOSE, ABORT); "
        "the state stays DONE"
    )
    assert record.session_id == "s-1"  # type: ignore[attr-defined]


def test_the_table_has_one_row_per_state_and_event() -> None:
    pairs = [(row.state, row.event) for row in ROWS]
    assert len(pairs) == len(set(pairs))
    assert sum(len(events) for events in TRANSITIONS.values()) == len(ROWS)


def reachable(start: RelayState, *, backwards: bool = False) -> set[RelayState]:
    edges: dict[RelayState, set[RelayState]] = {state: set() for state in RelayState}
    for row in ROWS:
        if backwards:
            edges[row.next].add(row.state)
        else:
            edges[row.state].add(row.next)
    seen = {start}
    todo = deque([start])
    while todo:
        for nxt in edges[todo.popleft()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_every_state_is_reachable_from_new_and_every_state_can_reach_done() -> None:
    assert reachable(RelayState.NEW) == set(RelayState)
    assert reachable(RelayState.DONE, backwards=True) == set(RelayState)


def test_done_is_final() -> None:
    assert set(TRANSITIONS[RelayState.DONE].values()) == {RelayState.DONE}


def test_the_lane_is_entered_only_from_relaying_and_left_only_by_a_hand_back() -> None:
    into = {
        (r.state, r.event) for r in ROWS if r.next in SOCKETS_LENT and r.state not in SOCKETS_LENT
    }
    out = {
        (r.state, r.event) for r in ROWS if r.state in SOCKETS_LENT and r.next not in SOCKETS_LENT
    }
    assert into == {(RelayState.RELAYING, RelayEvent.LANE_ENTERED)}
    assert out == {
        (lent, event)
        for lent in SOCKETS_LENT
        for event in (RelayEvent.HANDED_BACK, RelayEvent.LANE_FAILED)
    }


def test_in_the_lane_only_the_lane_and_a_recall_can_happen() -> None:
    # No leg can end, no frame can be scanned, the gateway cannot close a side: all of that
    # needs the sockets, which the lane's thread holds. The gateway can only ask for them back.
    for lent in SOCKETS_LENT:
        assert set(TRANSITIONS[lent]) == {
            RelayEvent.RECALL,
            RelayEvent.HANDED_BACK,
            RelayEvent.LANE_FAILED,
        }
    assert TRANSITIONS[RelayState.IN_LANE][RelayEvent.RECALL] is RelayState.RECALLING
    assert TRANSITIONS[RelayState.RECALLING][RelayEvent.RECALL] is RelayState.RECALLING


def test_once_ending_the_session_never_goes_back_to_relaying_or_the_lane() -> None:
    after = reachable(RelayState.ENDING)
    assert after == {RelayState.ENDING, RelayState.DONE}
    for closing in (RelayState.CLOSING, RelayState.HALF_CLOSED):
        assert RelayState.RELAYING not in reachable(closing)
        assert not reachable(closing) & SOCKETS_LENT


@pytest.mark.parametrize("state", [s for s in RelayState if s in SOCKETS_LENT])
def test_the_machine_refuses_socket_io_while_the_lane_holds_the_sockets(
    state: RelayState,
) -> None:
    with pytest.raises(SocketsLent) as caught:
        machine_in(state).refuse_socket_io("agent", "write")
    assert str(caught.value) == (
        f"write() on the agent leg's transport while its socket is lent to the fast lane "
        f"(relay state {state.name}): the lane's thread owns the socket until the relay's "
        "HANDED_BACK; defer the action with a RECALL (as close_both and abort do)"
    )
    assert isinstance(caught.value, CatflapMisuse)


def test_sockets_lent_follows_the_state() -> None:
    assert {s for s in RelayState if machine_in(s).sockets_lent} == SOCKETS_LENT


class FakeTransport(asyncio.Transport):
    """Records what is asked of it; a lent transport must pass none of the acting through."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, data: Any) -> None:
        self.calls.append("write")

    def close(self) -> None:
        self.calls.append("close")

    def abort(self) -> None:
        self.calls.append("abort")

    def pause_reading(self) -> None:
        self.calls.append("pause_reading")

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")

    def write_eof(self) -> None:
        self.calls.append("write_eof")

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 7

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"socket": "the socket"}.get(name, default)


def test_a_lent_transport_asks_the_machine_and_passes_no_action_through() -> None:
    real = FakeTransport()
    machine = machine_in(RelayState.IN_LANE)
    lent = LentTransport(real, "client", machine)
    assert lent.get_extra_info("socket") == "the socket"
    assert lent.get_write_buffer_size() == 7 and not lent.is_closing()
    actions: list[Callable[[], object]] = [
        lambda: lent.write(b"x"),
        lambda: lent.writelines([b"x"]),
        lent.write_eof,
        lent.close,
        lent.abort,
        lent.pause_reading,
        lent.resume_reading,
        lambda: lent.set_write_buffer_limits(1, 0),
    ]
    for act in actions:
        with pytest.raises(SocketsLent, match="client leg's transport while its socket is lent"):
            act()
    assert real.calls == []


def test_a_change_of_state_is_logged_at_debug_with_the_session_and_a_self_loop_is_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    machine = machine_in(RelayState.IN_LANE, "sess-7")
    with caplog.at_level(logging.DEBUG, "catflap.gateway"):
        machine.fire(RelayEvent.RECALL)
        machine.fire(RelayEvent.RECALL)  # a second action queued: same state, no line
        machine.fire(RelayEvent.HANDED_BACK, "RECALLED")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.DEBUG, "= relay IN_LANE --RECALL--> RECALLING"),
        (logging.DEBUG, "= relay RECALLING --HANDED_BACK (RECALLED)--> RELAYING"),
    ]
    assert {r.session_id for r in caplog.records} == {"sess-7"}  # type: ignore[attr-defined]


def test_without_a_session_id_the_line_has_none() -> None:
    machine = RelayMachine()
    assert machine.state is RelayState.NEW and machine.session_id is None
    assert machine.log is logging.getLogger("catflap.gateway")


def test_the_markdown_table_is_rendered_from_the_rows() -> None:
    text = render_markdown()
    lines = text.splitlines()
    assert lines[:2] == ["| state | event | next state | what happens |", "|---|---|---|---|"]
    body = lines[2 : 2 + len(ROWS)]
    for line, row in zip(body, ROWS, strict=True):
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        assert cells == [
            f"`{row.state.name}`",
            f"`{row.event.name}`",
            f"`{row.next.name}`",
            row.what,
        ]
    assert "|" not in "".join(row.what for row in ROWS)  # a pipe would split a cell
    assert lines[2 + len(ROWS)] == ""
    assert "`IN_LANE`, `RECALLING`" in lines[-1] and "SocketsLent" in lines[-1]
    assert text.endswith("\n")
