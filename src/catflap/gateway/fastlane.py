"""The relay's fast lane: a session's steady-state bytes move on a native thread.

Theory of operation. On the event loop, each forwarded frame costs a GIL hand-off, a Python
call and uvloop's bookkeeping: about as much CPU as nginx spends on a frame in user space in
all. So while a session needs no decisions, :class:`~catflap.gateway.relay.Relay` pauses reading
on both transports and lends their sockets to the lane, whose thread (``_fastlane.c``) reads
each chunk, follows the frame headers and sends the chunk on, with no Python in the path.

The lane hands a session back, and the relay carries on exactly where it stopped, when Python
has to act:

============================  ======================================================
handed back because           what the relay does with it
============================  ======================================================
a close frame starts          scans and forwards that chunk itself (the session ends)
the peer's buffer is full     writes the rest through the transport (backpressure,
                              slow-peer bound), and re-enters once the buffers drain
a side reached EOF or error   resumes reading: the transport sees the end again
the gateway recalled it       drain, stop, abort: the gateway's close goes out
the lane stopped              gateway shutdown
============================  ======================================================

While a session is in the lane, Python never writes to, closes or reads its sockets. Where the
extension is missing (no C compiler at install time, not Linux) or ``[gateway] native_relay``
is false, sessions relay on the event loop, with the same behaviour.
"""

from __future__ import annotations

import asyncio
import logging
from typing import NamedTuple, Protocol

try:
    from catflap.gateway import _fastlane as native
except ImportError:  # pragma: no cover - the extension is optional
    native = None  # type: ignore[assignment]

__all__ = ["FastLane", "LegReturn", "available"]

log = logging.getLogger("catflap.gateway")


def available() -> bool:
    """True when the native extension was built."""
    return native is not None


class LegReturn(NamedTuple):
    """One direction of a handed-back session (the bytes its side sends)."""

    skip: int  # payload bytes of the current frame still to come
    partial: bytes  # an incomplete frame header
    frames: int  # counted in the lane
    relayed: int  # bytes relayed in the lane
    to_feed: bytes  # a chunk the lane left to Python, unscanned and unsent
    to_write: bytes  # a scanned chunk the peer could not take yet


class LaneUser(Protocol):
    def lane_returned(self, reason: int, client: LegReturn, agent: LegReturn) -> None: ...


class FastLane:
    """The gateway's one native relay thread, and the sessions lent to it."""

    def __init__(self) -> None:
        if native is None:
            raise RuntimeError("catflap.gateway._fastlane is not built; reinstall catflap")
        self._loop = asyncio.get_running_loop()
        self._native = native.Lane()
        self._users: dict[int, LaneUser] = {}
        self._loop.add_reader(self._native.fileno(), self._dispatch)
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def active(self) -> int:
        return int(self._native.active)

    def enter(
        self,
        user: LaneUser,
        fds: tuple[int, int],
        states: tuple[tuple[int, bytes], tuple[int, bytes]],
    ) -> int:
        """Lend the client and agent sockets ``fds`` to the thread; returns the session's handle.

        Raises:
            OSError: the sockets could not be watched (the session stays on the event loop).
            RuntimeError: the lane is closed.
        """
        if self._closed:
            raise RuntimeError("the fast lane is closed")
        handle = int(self._native.enter(fds[0], fds[1], states[0], states[1]))
        self._users[handle] = user
        return handle

    def recall(self, handle: int) -> None:
        """Ask for the session back; it arrives through ``lane_returned`` soon after."""
        self._native.recall(handle)

    def counters(self, handle: int) -> tuple[int, int, int, int]:
        """(client bytes, client frames, agent bytes, agent frames) relayed in the lane so far."""
        c_bytes, c_frames, a_bytes, a_frames = self._native.counters(handle)
        return int(c_bytes), int(c_frames), int(a_bytes), int(a_frames)

    def close(self) -> None:
        """Stop the thread; sessions still in the lane go back to their relays first."""
        if self._closed:
            return
        self._closed = True
        self._native.stop()
        self._dispatch()
        self._loop.remove_reader(self._native.fileno())

    def _dispatch(self) -> None:
        for handle, reason, client, agent in self._native.take():
            user = self._users.pop(handle)
            try:
                user.lane_returned(reason, LegReturn(*client), LegReturn(*agent))
            except Exception:  # one session's fault must not strand the others in this batch
                log.exception("a session handed back by the fast lane failed to resume")
