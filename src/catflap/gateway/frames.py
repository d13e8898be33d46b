"""Just enough of RFC 6455 framing for a byte relay.

The relay never decodes or re-encodes frames: it forwards bytes as they arrive. It still has to
know three things about each direction of the stream, and :class:`FrameScanner` tracks them by
reading frame headers only (payloads are skipped, never copied or unmasked):

- where the frame boundaries are, so that catflap can inject a close frame of its own (agent
  crash, drain, stop) without corrupting a frame in flight;
- whether the peer has sent a close frame, and with which code, for the session record and to
  tell a clean close from a vanished peer;
- how many frames passed, for the session record and metrics.

Cost per chunk is a handful of integer operations; in the common case (one whole frame per
read) the loop runs once.
"""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Callable
from typing import NamedTuple

from catflap.contract import limits
from catflap.contract.closecodes import assert_sendable

__all__ = ["ControlFrameError", "FrameReader", "FrameScanner", "ReadFrame", "close_frame"]

_OP_CLOSE = 0x8
_CONTROL = 0x08  # opcodes 0x8-0xF are control frames
_FIN = 0x80
#: A length no chunk can have: sends the fast path's single comparison to the general path.
_NO_MATCH = -(1 << 62)
#: Orders close frames across all scanners, to tell which peer closed first.
_CLOSE_SEQUENCE = itertools.count(1)


class FrameScanner:
    """Follows frame boundaries in one direction of a WebSocket byte stream."""

    __slots__ = (
        "_failed",
        "_partial",
        "_skip",
        "close_code",
        "close_reason",
        "close_seen",
        "close_seq",
        "frames",
        "on_close",
        "protocol_error",
    )

    def __init__(self, on_close: Callable[[], None] | None = None) -> None:
        self._skip = 0  # payload bytes of the current frame still to come
        self._partial = b""  # an incomplete frame header (or close frame) waiting for more
        self.frames = 0
        self.close_seen = False
        self.close_code: int | None = None
        self.close_reason = ""
        #: Increases with every close frame seen by any scanner; 0 until this one sees one.
        self.close_seq = 0
        #: Why the stream broke RFC 6455, once it has (the session then ends with 1002).
        self.protocol_error: str | None = None
        self._failed = False
        #: Called once, when the first close frame has been read (never on the per-frame path).
        self.on_close = on_close

    @property
    def at_boundary(self) -> bool:
        """True when the bytes seen so far end exactly at a frame boundary."""
        return self._skip == 0 and not self._partial

    def lane_state(self) -> tuple[int, bytes] | None:
        """Where the fast lane (:mod:`catflap.gateway.fastlane`) can take over this stream:
        (payload bytes to skip, incomplete header). None once a close frame has begun, since
        the lane leaves close frames to Python."""
        partial = self._partial
        if self.close_seen or (partial and partial[0] & 0x0F == _OP_CLOSE):
            return None
        return self._skip, partial

    def resume(self, skip: int, partial: bytes, frames: int) -> None:
        """Continue where the fast lane stopped; ``frames`` were counted there."""
        self._skip = skip
        self._partial = partial
        self.frames += frames

    def feed(self, data: bytes) -> int | None:
        """Scan the next chunk of this direction.

        Returns:
            None while the stream is valid. When a frame breaks RFC 6455 (a control frame over
            125 bytes or fragmented: :attr:`protocol_error` says which), the offset in ``data``
            where that frame starts (the bytes before it are good), or -1 when it started in
            an earlier chunk. The stream must not be relayed further; later feeds return 0.
        """
        if self._failed:
            return 0
        n = len(data)
        skip = self._skip
        if skip >= n:  # still inside a payload: the common case for large frames
            self._skip = skip - n
            return None
        if not skip and n > 1 and not self._partial and not data[0] & _CONTROL:
            # Fast path: the chunk is exactly one whole data frame (telephony audio, echoes).
            b1 = data[1]
            length = b1 & 0x7F
            head = 6 if b1 & 0x80 else 2
            if length == 126:
                length = (data[2] << 8) | data[3] if n > 3 else _NO_MATCH
                head += 2
            elif length == 127:  # 64-bit lengths take the general path
                length = _NO_MATCH
            if head + length == n:
                self.frames += 1
                return None
        carried = len(self._partial)
        if carried:
            data = self._partial + data[skip:]
            self._partial = b""
            pos = 0
            n = len(data)
        else:
            pos = skip
        while pos < n:
            if n - pos < 2:
                break
            b1 = data[pos + 1]
            length = b1 & 0x7F
            b0 = data[pos]
            if b0 & _CONTROL and (length > limits.CONTROL_FRAME_MAX_PAYLOAD_BYTES or not b0 & _FIN):
                # RFC 6455 5.5: a control frame is at most 125 bytes and never fragmented.
                # Checked from the first two bytes, so nothing of it is ever waited for.
                self.protocol_error = (
                    "fragmented control frame"
                    if not b0 & _FIN
                    else f"control frame declares more than "
                    f"{limits.CONTROL_FRAME_MAX_PAYLOAD_BYTES} bytes"
                )
                self._skip = 0
                self._partial = b""
                self._failed = True
                return pos - carried if pos >= carried else -1
            head = 2
            if length == 126:
                head = 4
                if n - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
            elif length == 127:
                head = 10
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
            masked = b1 & 0x80
            if masked:
                head += 4
            end = pos + head + length
            if data[pos] & 0x0F == _OP_CLOSE:
                if end > n:  # wait for the whole close frame: it is at most 131 bytes
                    break
                self._read_close(
                    data[pos + head - 4 : pos + head] if masked else b"", data[pos + head : end]
                )
            elif n - pos < head:
                break
            self.frames += 1
            if end >= n:
                self._skip = end - n
                return None
            pos = end
        self._skip = 0
        self._partial = bytes(data[pos:])
        # Bounded by construction: a header is at most 14 bytes and a close frame is gathered
        # only once its declared length (checked above to be at most 125) is known.
        assert len(self._partial) <= limits.FRAME_SCANNER_PARTIAL_MAX_BYTES
        return None

    @property
    def buffered(self) -> int:
        """Bytes held between chunks (at most ``FRAME_SCANNER_PARTIAL_MAX_BYTES``)."""
        return len(self._partial)

    def _read_close(self, mask: bytes, payload: bytes) -> None:
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        if self.close_seen:
            return
        self.close_seen = True
        self.close_seq = next(_CLOSE_SEQUENCE)
        if len(payload) >= 2:
            self.close_code = struct.unpack("!H", payload[:2])[0]
            self.close_reason = payload[2:].decode("utf-8", "replace")
        else:
            self.close_code = 1005  # "no status received", as RFC 6455 reports it locally
        if self.on_close is not None:
            self.on_close()


class ControlFrameError(ValueError):
    """A control frame breaks RFC 6455 5.5 (over 125 bytes, or fragmented): close 1002."""


class ReadFrame(NamedTuple):
    opcode: int
    fin: bool
    payload: bytes  # unmasked
    raw: bytes  # exactly as received, mask included


class FrameReader:
    """Decode whole frames from a byte stream, for the few frames catflap must read itself.

    Used only while a provider's opening messages are read; the relay never decodes frames.
    Raw bytes are kept so the frames can be replayed to the bot exactly as received.
    """

    def __init__(self, *, max_frame: int) -> None:
        self._buffer = bytearray()
        self._max_frame = max_frame

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as frames."""
        return len(self._buffer)

    def take_remaining(self) -> bytes:
        """Bytes received after the last frame returned by :meth:`next_frame`."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest

    def next_frame(self) -> ReadFrame | None:
        """The next complete frame, or None until more bytes arrive.

        Raises:
            ControlFrameError: a control frame declares more than 125 bytes, or is fragmented.
            ValueError: the frame is larger than ``max_frame``.
        """
        buf = self._buffer
        if len(buf) < 2:
            return None
        length = buf[1] & 0x7F
        head = 2
        if length == 126:
            head = 4
            if len(buf) < head:
                return None
            length = int.from_bytes(buf[2:4], "big")
        elif length == 127:
            head = 10
            if len(buf) < head:
                return None
            length = int.from_bytes(buf[2:10], "big")
        if buf[0] & _CONTROL and (
            length > limits.CONTROL_FRAME_MAX_PAYLOAD_BYTES or not buf[0] & _FIN
        ):
            # Known from the first two bytes: never wait for such a frame's payload.
            raise ControlFrameError("control frame over 125 bytes or fragmented (RFC 6455 5.5)")
        if length > self._max_frame:
            raise ValueError(f"frame of {length} bytes exceeds {self._max_frame}")
        masked = bool(buf[1] & 0x80)
        mask = bytes(buf[head : head + 4]) if masked else b""
        head += len(mask)
        end = head + length
        if len(buf) < end:
            return None
        payload = bytes(buf[head:end])
        if masked:
            payload = _unmask(payload, mask)
        frame = ReadFrame(buf[0] & 0x0F, bool(buf[0] & 0x80), payload, bytes(buf[:end]))
        del buf[:end]
        return frame


def _unmask(payload: bytes, mask: bytes) -> bytes:
    # XOR four bytes at a time through int arithmetic: fast enough for opening messages.
    repeated = (mask * (len(payload) // 4 + 1))[: len(payload)]
    n = int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")
    return n.to_bytes(len(payload), "big")


def close_frame(code: int, reason: str = "", *, masked: bool) -> bytes:
    """Build a close frame that catflap originates.

    Args:
        code: must be in :data:`catflap.contract.closecodes.SENDABLE`.
        reason: truncated to 123 bytes of UTF-8 (never splitting a character).
        masked: True toward a server (the agent), False toward a client.

    Raises:
        AssertionError: ``code`` is not one catflap may send.
    """
    assert_sendable(code)
    encoded = (
        reason.encode("utf-8")[: limits.CLOSE_REASON_MAX_BYTES]
        .decode("utf-8", "ignore")
        .encode("utf-8")
    )
    payload = struct.pack("!H", code) + encoded
    if not masked:
        return bytes((0x80 | _OP_CLOSE, len(payload))) + payload
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | _OP_CLOSE, 0x80 | len(payload))) + mask + body
