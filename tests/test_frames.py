"""FrameScanner follows boundaries however the stream is cut; close frames are well formed."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Close, Frame
from websockets.streams import StreamReader

from catflap.contract import limits
from catflap.gateway.frames import FrameScanner, close_frame


def encode(opcode: int, payload: bytes, *, masked: bool, fin: bool = True) -> bytes:
    head = bytes([(0x80 if fin else 0) | opcode])
    mask_bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 65536:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if masked:
        mask = os.urandom(4)
        return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + payload


_DATA_SIZES = [0, 1, 125, 126, 127, 300, 65535, 65536, 70000]
_CONTROL_SIZES = [0, 1, 124, 125]  # RFC 6455 5.5: control frames carry at most 125 bytes
frame_specs = st.lists(
    st.one_of(
        st.tuples(st.sampled_from([0x1, 0x2]), st.sampled_from(_DATA_SIZES)),
        st.tuples(st.sampled_from([0x9, 0xA]), st.sampled_from(_CONTROL_SIZES)),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(
    specs=frame_specs,
    masked=st.booleans(),
    cuts=st.lists(st.integers(0, 10**6), max_size=20),
    close_code=st.sampled_from([1000, 1001, 4001]),
)
def test_scanner_counts_frames_and_close_for_any_chunking(
    specs: list[tuple[int, int]], masked: bool, cuts: list[int], close_code: int
) -> None:
    stream = b"".join(encode(op, b"x" * size, masked=masked) for op, size in specs)
    stream += encode(0x8, struct.pack("!H", close_code) + "bye ✓".encode(), masked=masked)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    scanner = FrameScanner()
    for start, end in zip(points, points[1:], strict=False):
        assert scanner.feed(stream[start:end]) is None
        assert scanner.buffered <= limits.FRAME_SCANNER_PARTIAL_MAX_BYTES
        if end < len(stream):
            assert not scanner.close_seen
    assert scanner.frames == len(specs) + 1
    assert scanner.at_boundary
    assert scanner.close_seen and scanner.close_code == close_code
    assert scanner.close_reason == "bye ✓"


def test_scanner_knows_when_it_is_inside_a_frame() -> None:
    scanner = FrameScanner()
    data = encode(0x2, b"a" * 1000, masked=True)
    scanner.feed(data[:1])
    assert not scanner.at_boundary
    scanner.feed(data[1:500])
    assert not scanner.at_boundary
    scanner.feed(data[500:])
    assert scanner.at_boundary and scanner.frames == 1


def test_close_without_code_is_reported_as_1005() -> None:
    scanner = FrameScanner()
    scanner.feed(encode(0x8, b"", masked=False))
    assert scanner.close_seen and scanner.close_code == 1005


def _parse(data: bytes, *, mask: bool) -> Frame:
    reader = StreamReader()
    reader.feed_data(data)
    parser = Frame.parse(reader.read_exact, mask=mask, extensions=[])
    try:
        next(parser)
    except StopIteration as done:
        frame: Frame = done.value
        return frame
    raise AssertionError("incomplete frame")


@pytest.mark.parametrize("masked", [True, False])
def test_close_frame_parses_with_websockets_and_truncates_reason(masked: bool) -> None:
    data = close_frame(1011, "é" * 100, masked=masked)
    frame = _parse(data, mask=masked)
    close = Close.parse(frame.data)
    assert close.code == 1011
    assert len(close.reason.encode()) <= 123 and close.reason == "é" * 61


@pytest.mark.parametrize("code", [1005, 1006, 1015, 1003, 4000])
def test_close_frame_refuses_codes_catflap_must_not_send(code: int) -> None:
    with pytest.raises(AssertionError):
        close_frame(code, masked=False)


@settings(max_examples=200, deadline=None)
@given(
    specs=frame_specs,
    masked=st.booleans(),
    cuts=st.lists(st.integers(0, 10**6), max_size=20),
    bad_opcode=st.sampled_from([0x8, 0x9, 0xA]),
    bad_size=st.sampled_from([126, 300, 65535, 65536, 16 * 1024 * 1024]),
    fragmented=st.booleans(),
)
def test_oversized_or_fragmented_control_frame_is_a_protocol_error_for_any_chunking(
    specs: list[tuple[int, int]],
    masked: bool,
    cuts: list[int],
    bad_opcode: int,
    bad_size: int,
    fragmented: bool,
) -> None:
    """Whatever the chunking: the scanner never buffers more than its cap, reports the error
    exactly where the bad frame starts, and never waits for the bad frame's payload."""
    good = b"".join(encode(op, b"x" * size, masked=masked) for op, size in specs)
    if fragmented:
        bad_head = encode(bad_opcode, b"x" * 10, masked=masked, fin=False)
    else:
        # Only the header of the bad frame: a 16 MiB payload need never exist.
        bad_head = encode(bad_opcode, b"", masked=masked)[:1] + _length_bytes(bad_size, masked)
    stream = good + bad_head + b"y" * 200
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    scanner = FrameScanner()
    reported: int | None = None
    for start, end in zip(points, points[1:], strict=False):
        result = scanner.feed(stream[start:end])
        assert scanner.buffered <= limits.FRAME_SCANNER_PARTIAL_MAX_BYTES
        if result is not None:
            # Absolute position of the bad frame, when it starts in this chunk.
            reported = start + result if result >= 0 else -1
            break
    assert reported is not None, "the bad control frame was not noticed"
    assert scanner.protocol_error is not None
    if reported >= 0:
        assert reported == len(good)
    else:  # the chunk holding its first byte had ended before the second arrived
        assert any(len(good) < p < len(good) + 2 for p in points)
    assert scanner.frames == len(specs)
    assert scanner.feed(b"more") == 0  # a broken stream stays broken


def _length_bytes(size: int, masked: bool) -> bytes:
    bit = 0x80 if masked else 0
    if size < 65536:
        return bytes([bit | 126]) + struct.pack("!H", size)
    return bytes([bit | 127]) + struct.pack("!Q", size)


def test_scanner_holds_no_more_than_a_header_while_a_huge_close_frame_streams() -> None:
    """Issue 11 row 5: a close frame declaring 16 MiB is refused at its header, not gathered."""
    scanner = FrameScanner()
    head = bytes([0x88, 0x80 | 127]) + struct.pack("!Q", 16 * 1024 * 1024) + os.urandom(4)
    assert scanner.feed(head[:1]) is None
    assert scanner.buffered == 1
    # Its second byte settles it: the frame began in the earlier chunk (-1).
    assert scanner.feed(head[1:] + b"z" * 65536) == -1
    assert scanner.buffered == 0
    scanner2 = FrameScanner()
    assert scanner2.feed(b"\x82\x01a" + head) == 3
    assert scanner2.protocol_error == "control frame declares more than 125 bytes"
