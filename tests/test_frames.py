"""FrameScanner follows boundaries however the stream is cut; close frames are well formed."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Close, Frame
from websockets.streams import StreamReader

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


frame_specs = st.lists(
    st.tuples(
        st.sampled_from([0x1, 0x2, 0x9, 0xA]),
        st.sampled_from([0, 1, 125, 126, 127, 300, 65535, 65536, 70000]),
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
        scanner.feed(stream[start:end])
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
