"""The relay's fast lane: a session's steady-state bytes move on a native thread.

Theory of operation. On the event loop, each forwarded frame costs a GIL hand-off, a Python
call and uvloop's bookkeeping: about as much CPU as nginx spends on a frame in user space in
all. So while a session needs no decisions, :class:`~catflap.gateway.relay.Relay` pauses reading
on both transports and lends their sockets to the lane, whose thread (``_fastlane.c``) reads
each chunk, follows the frame headers and sends the chunk on, with no Python in the path.

The lane hands a session back, and the relay carries on exactly where it stopped, when Python
has to act:

================================  ======================================================
handed back because               what the relay does with it
================================  ======================================================
a close frame starts              scans and forwards that chunk itself (the session ends)
a control frame over 125 bytes    scans that chunk itself: FrameScanner reports the
or without FIN (RFC 6455 5.5)     protocol error, and the session ends with 1002
the peer's buffer is full         writes the rest through the transport (backpressure,
                                  slow-peer bound), and re-enters once the buffers drain
a side reached EOF or error       resumes reading: the transport sees the end again
the gateway recalled it           drain, stop, abort: the gateway's close goes out
the lane stopped                  gateway shutdown
an allocation failed              closes both sides with 1011 (aborts a side that got part
                                  of a chunk); the record's status is ``error``
================================  ======================================================

While a session is in the lane, Python never writes to, closes or reads its sockets: the relay
lends each leg a :class:`LentTransport` in place of its transport meanwhile, whose acting methods
ask the relay's state machine, which refuses them
(:class:`~catflap.gateway.relaystate.SocketsLent`) instead of letting them corrupt the stream. TLS
sessions never enter (the lane relays raw socket bytes). Where the extension is missing (no C
compiler at install time, not Linux) or ``[gateway] native_relay`` is false, sessions relay on
the event loop, with the same behaviour.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
from typing import Any, NamedTuple, NoReturn, Protocol

from catflap.gateway.relaystate import RelayMachine

try:
    from catflap.gateway import _fastlane as native
except ImportError:  # pragma: no cover - the extension is optional
    native = None  # type: ignore[assignment]

__all__ = ["FastLane", "HandBack", "LegReturn", "LentTransport", "available"]

log = logging.getLogger("catflap.gateway")


def available() -> bool:
    """True when the native extension was built."""
    return native is not None


class HandBack(enum.IntEnum):
    """Why the lane handed a session back (the extension's reason codes)."""

    CLOSE_FRAME = 1
    WRITE_BLOCKED = 2
    EOF = 3
    RECALLED = 4
    STOPPED = 5
    #: An allocation failed in the lane: the session must end (see ``LegReturn.dropped``).
    FAILED = 6
    #: A control frame declares more than 125 bytes or lacks FIN: Python's scanner judges it.
    CONTROL_FRAME = 7


class LegReturn(NamedTuple):
    """One direction of a handed-back session (the bytes its side sends)."""

    skip: int  # payload bytes of the current frame still to come
    partial: bytes  # an incomplete frame header
    frames: int  # counted in the lane
    relayed: int  # bytes relayed in the lane
    to_feed: bytes  # a chunk the lane left to Python, unscanned and unsent
    to_write: bytes  # a scanned chunk the peer could not take yet
    dropped: int = 0  # bytes an allocation failure lost (only with HandBack.FAILED)
    cut: bool = False  # the peer got part of a chunk the scanner has passed: abort it


class LentTransport(asyncio.Transport):
    """Stands in for a relay leg's transport while its socket is lent to the lane.

    The lane's thread alone reads and writes the socket then, so anything that would act on the
    transport is refused by ``machine`` (:meth:`RelayMachine.refuse_socket_io` raises
    :class:`~catflap.gateway.relaystate.SocketsLent`); what only looks at it passes through.
    The relay puts the real transport back in ``lane_returned``. No cost on the lane's path:
    Python does not run there.
    """

    __slots__ = ("lent", "machine", "side")

    def __init__(self, lent: asyncio.Transport, side: str, machine: RelayMachine) -> None:
        super().__init__()
        self.lent = lent
        self.side = side
        self.machine = machine

    # Looking is fine.

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.lent.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self.lent.is_closing()

    def is_reading(self) -> bool:
        return self.lent.is_reading()

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.lent.get_protocol()

    def get_write_buffer_size(self) -> int:
        return self.lent.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.lent.get_write_buffer_limits()

    # Acting is a bug.

    def _misuse(self, method: str) -> NoReturn:
        self.machine.refuse_socket_io(self.side, method)

    def write(self, data: Any) -> NoReturn:
        self._misuse("write")

    def writelines(self, list_of_data: Any) -> NoReturn:
        self._misuse("writelines")

    def write_eof(self) -> NoReturn:
        self._misuse("write_eof")

    def close(self) -> NoReturn:
        self._misuse("close")

    def abort(self) -> NoReturn:
        self._misuse("abort")

    def pause_reading(self) -> NoReturn:
        self._misuse("pause_reading")

    def resume_reading(self) -> NoReturn:
        self._misuse("resume_reading")

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> NoReturn:
        self._misuse("set_protocol")

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> NoReturn:
        self._misuse("set_write_buffer_limits")


class LaneUser(Protocol):
    def lane_returned(self, reason: int, client: LegReturn, agent: LegReturn) -> None: ...


class FastLane:
    """The gateway's one native relay thread, and the sessions lent to it."""

    def __init__(self, *, nice: int = 0, slice_us: int = 0) -> None:
        """
        Args:
            nice: the lane thread's nice value (``[gateway] relay_thread_nice``);
            slice_us: the time slice it asks the kernel for (``relay_thread_slice_us``, 0 for
                the kernel's default); see :meth:`_prioritise`.
        """
        if native is None:
            raise RuntimeError("catflap.gateway._fastlane is not built; reinstall catflap")
        self._loop = asyncio.get_running_loop()
        self._native = native.Lane()
        #: The nice value the lane thread runs at (the process's when it could not be
        #: lowered), and the slice it asked the kernel for in µs (0 when it asked for none or
        #: could not ask).
        self.nice, self.slice_us = self._prioritise(nice, slice_us)
        self._users: dict[int, LaneUser] = {}
        self._loop.add_reader(self._native.fileno(), self._dispatch)
        self._closed = False
        self._reading = True

    def _prioritise(self, nice: int, slice_us: int) -> tuple[int, int]:
        """Run the lane thread at ``nice``, asking for slices of ``slice_us`` (Linux schedules
        threads one by one); returns the nice value it runs at and the slice it asked for (0
        when it could not ask; kernels before 6.12 take the request and ignore it).

        Why: the event loop thread does everything that is not a steady relay, including
        answering every hostile connection. On a saturated core the scheduler shares time
        evenly, so a flood of refusals delays each relayed frame by a time slice (measured:
        p99 echo latency 1.1 ms quiet, 6.1 ms under the hostile benchmark). A lower nice value
        gives the thread a larger share; a short slice (Linux 6.12+, EEVDF) gives it an early
        deadline, so it preempts the event loop as soon as a frame arrives (measured under the
        hostile benchmark: the thread's mean wait per wake-up 15.6 µs at the kernel's default
        slice, 7.9 µs at 100 µs). Lowering a nice value needs ``CAP_SYS_NICE`` or
        ``RLIMIT_NICE`` (systemd's ``LimitNICE=``); without them the thread keeps the
        process's nice value, still takes the slice (that needs no privilege), and this says
        so once. A gateway run under a real-time or idle policy (``chrt``) keeps it.
        """
        tid = self._native.thread_id
        keep = os.getpriority(os.PRIO_PROCESS, tid)
        if nice == 0 and slice_us == 0:
            return keep, 0
        policy = os.sched_getscheduler(tid)
        if policy not in (os.SCHED_OTHER, os.SCHED_BATCH):
            log.info("the fast lane thread keeps the gateway's scheduling policy %d", policy)
            return keep, 0
        want = keep if nice == 0 else nice  # 0: leave the nice value as it is
        try:
            self._native.prioritise(policy, want, slice_us * 1000)
            return want, slice_us
        except OSError as error:
            refused = error
        try:
            # The slice alone needs no privilege.
            self._native.prioritise(policy, keep, slice_us * 1000)
            got = (keep, slice_us)
        except OSError:
            # sched_setattr itself is refused (a seccomp filter): the nice value alone.
            got = (self._renice(want, keep), 0)
        if got[0] != want:
            log.warning(
                "! the fast lane thread could not take nice %d (%s), so under load relayed "
                "frames wait behind the event loop; run catflap with CAP_SYS_NICE or "
                "LimitNICE=%d, or set [gateway] relay_thread_nice = 0 to silence this",
                want,
                refused.strerror,
                20 - want,
            )
        if got[1] != slice_us:
            log.warning(
                "! the fast lane thread could not ask for %d µs time slices (%s: sched_setattr "
                "refused), so under load a relayed frame may wait a whole slice of the event "
                "loop; allow sched_setattr in the seccomp profile, or set [gateway] "
                "relay_thread_slice_us = 0 to silence this",
                slice_us,
                refused.strerror,
            )
        return got

    def _renice(self, want: int, keep: int) -> int:
        try:
            os.setpriority(os.PRIO_PROCESS, self._native.thread_id, want)
        except OSError:
            return keep
        return want

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

    def _dispatch(self) -> None:
        try:
            batch = self._native.take()
        except MemoryError:
            # The lane kept every session and made its fd readable again: the loop retries.
            log.error("! out of memory handing sessions back from the fast lane; retrying")
            return
        for handle, reason, client, agent in batch:
            user = self._users.pop(handle)
            try:
                user.lane_returned(reason, LegReturn(*client), LegReturn(*agent))
            except Exception:  # one session's fault must not strand the others in this batch
                log.exception("a session handed back by the fast lane failed to resume")
        if self._closed and self._reading:  # all of them are back: the thread is gone
            self._reading = False
            self._loop.remove_reader(self._native.fileno())
