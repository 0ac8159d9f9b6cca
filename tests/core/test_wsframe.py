"""
Tests for bungate.core.wsframe: frame boundaries over random frame sequences cut into
random chunks, violations, and close frames, with autobahn's own frame encoder as the
reference for the bytes on the wire.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import List, Optional, Sequence, Tuple

import pytest
from autobahn.websocket.protocol import WebSocketProtocol
from hypothesis import given, settings
from hypothesis import strategies as st

from bungate.core.wsframe import (
    BINARY,
    CLOSE,
    CLOSE_GOING_AWAY,
    CONTINUATION,
    PING,
    PONG,
    TEXT,
    FrameError,
    FrameTracker,
    close_frame,
    valid_close_code,
)

#: (opcode, fin, payload)
Frame = Tuple[int, bool, bytes]


class AutobahnEncoder:
    """Just enough of an autobahn protocol for ``WebSocketProtocol.sendFrame`` to run."""

    def __init__(self, masked: bool) -> None:
        # A client masks its frames; a server does not.
        self.factory = SimpleNamespace(isServer=not masked)
        self.maskClientFrames = True
        self.maskServerFrames = False
        self.applyMask = True
        self.logFrames = False
        self.trafficStats = SimpleNamespace(outgoingWebSocketFrames=0)
        self.out: List[bytes] = []

    def sendData(self, data: bytes, sync: bool = False, chopsize: Optional[int] = None) -> None:
        self.out.append(data)

    def frame(self, opcode: int, payload: bytes, fin: bool = True) -> bytes:
        WebSocketProtocol.sendFrame(self, opcode, payload, fin)  # type: ignore[arg-type]
        return self.out.pop()


def reference_frame(opcode: int, payload: bytes, fin: bool, mask_key: Optional[bytes]) -> bytes:
    """Our own encoder (RFC 6455, 5.2), checked against autobahn's below."""
    head = bytearray([(0x80 if fin else 0) | opcode])
    mask_bit = 0x80 if mask_key is not None else 0
    n = len(payload)
    if n <= 125:
        head.append(mask_bit | n)
    elif n <= 0xFFFF:
        head.append(mask_bit | 126)
        head += n.to_bytes(2, "big")
    else:
        head.append(mask_bit | 127)
        head += n.to_bytes(8, "big")
    if mask_key is None:
        return bytes(head) + payload
    return bytes(head) + mask_key + bytes(b ^ mask_key[i % 4] for i, b in enumerate(payload))


def mask_key_of(frame: bytes) -> Optional[bytes]:
    """The masking key in an encoded frame's header, if it is masked."""
    if not frame[1] & 0x80:
        return None
    short = frame[1] & 0x7F
    start = 2 + (2 if short == 126 else 8 if short == 127 else 0)
    return frame[start : start + 4]


def payload_of(length: int) -> bytes:
    return bytes(i % 251 for i in range(length)) if length < 4096 else b"\xa5" * length


# --- strategies ---------------------------------------------------------------------------

EDGE_LENGTHS = [0, 1, 124, 125, 126, 127, 65535, 65536]
lengths = st.one_of(st.sampled_from(EDGE_LENGTHS), st.integers(0, 300))
control_lengths = st.one_of(st.sampled_from([0, 1, 124, 125]), st.integers(0, 125))


@st.composite
def control_frame(draw: st.DrawFn) -> Frame:
    opcode = draw(st.sampled_from([PING, PONG, CLOSE]))
    return opcode, True, payload_of(draw(control_lengths))


@st.composite
def message(draw: st.DrawFn) -> List[Frame]:
    """One message: a single frame, or fragments with control frames between them."""
    opcode = draw(st.sampled_from([TEXT, BINARY]))
    pieces = draw(st.lists(lengths, min_size=1, max_size=4))
    frames: List[Frame] = []
    for i, length in enumerate(pieces):
        last = i == len(pieces) - 1
        frames.append((opcode if i == 0 else CONTINUATION, last, payload_of(length)))
        if not last and draw(st.booleans()):
            frames.append(draw(control_frame()))
    return frames


@st.composite
def frame_sequence(draw: st.DrawFn) -> List[Frame]:
    frames: List[Frame] = []
    for item in draw(st.lists(st.one_of(message(), control_frame()), min_size=1, max_size=6)):
        if isinstance(item, list):
            frames.extend(item)
        else:
            frames.append(item)
    return frames


def encode_all(frames: Sequence[Frame], masked: bool) -> Tuple[bytes, List[int]]:
    """The wire bytes (by autobahn) and the offset at which each frame ends."""
    encoder = AutobahnEncoder(masked)
    wire: List[bytes] = []
    ends: List[int] = []
    total = 0
    for opcode, fin, payload in frames:
        raw = encoder.frame(opcode, payload, fin)
        wire.append(raw)
        total += len(raw)
        ends.append(total)
    return b"".join(wire), ends


def cut(data: bytes, points: Sequence[int]) -> List[bytes]:
    edges = [0, *sorted({p for p in points if 0 < p < len(data)}), len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


# --- the reference encoder agrees with autobahn -------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    opcode=st.sampled_from([TEXT, BINARY, CONTINUATION, PING, PONG, CLOSE]),
    length=lengths,
    fin=st.booleans(),
    masked=st.booleans(),
)
def test_reference_encoder_matches_autobahn(
    opcode: int, length: int, fin: bool, masked: bool
) -> None:
    payload = payload_of(length)
    theirs = AutobahnEncoder(masked).frame(opcode, payload, fin)
    key = mask_key_of(theirs)
    assert (key is not None) == masked
    assert reference_frame(opcode, payload, fin, key) == theirs


# --- boundaries ---------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(frames=frame_sequence(), masked=st.booleans(), data=st.data())
def test_at_boundary_exactly_at_frame_ends(
    frames: List[Frame], masked: bool, data: st.DataObject
) -> None:
    wire, ends = encode_all(frames, masked)
    points = data.draw(st.lists(st.integers(0, len(wire)), max_size=40))
    # Every frame end and every byte of the first frame header are cut points too, some of
    # the time, so headers split in every possible place get exercised.
    if data.draw(st.booleans()):
        points = [*points, *ends, *(ends[0] - k for k in range(1, 14))]
    tracker = FrameTracker(masked=masked)
    assert tracker.at_boundary
    frame_ends = set(ends)
    offset = 0
    for chunk in cut(wire, points):
        tracker.feed(chunk)
        offset += len(chunk)
        assert tracker.at_boundary == (offset in frame_ends), offset
    assert offset == len(wire)
    assert tracker.at_boundary
    assert tracker.frames == len(frames)
    assert tracker.close_seen == any(op == CLOSE for op, _, _ in frames)


@settings(max_examples=200, deadline=None)
@given(frames=frame_sequence(), masked=st.booleans(), data=st.data())
def test_feed_to_boundary_stops_at_each_frame_end(
    frames: List[Frame], masked: bool, data: st.DataObject
) -> None:
    wire, ends = encode_all(frames, masked)
    points = data.draw(st.lists(st.integers(0, len(wire)), max_size=20))
    tracker = FrameTracker(masked=masked)
    seen: List[int] = []
    offset = 0
    for chunk in cut(wire, points):
        pos = 0
        while pos < len(chunk):
            if tracker.at_boundary:
                assert tracker.feed_to_boundary(chunk[pos:]) == 0
                tracker.feed(chunk[pos : pos + 1])  # step into the next frame
                pos += 1
                if tracker.at_boundary:  # (cannot happen: a header is 2+ bytes)
                    seen.append(offset + pos)
                continue
            n = tracker.feed_to_boundary(chunk[pos:])
            assert 0 < n <= len(chunk) - pos
            pos += n
            if tracker.at_boundary:
                seen.append(offset + pos)
            else:
                assert pos == len(chunk)
        offset += len(chunk)
    assert seen == ends


def test_byte_by_byte_over_every_header_shape() -> None:
    frames: List[Frame] = [
        (TEXT, True, b""),
        (BINARY, False, payload_of(126)),
        (PING, True, payload_of(125)),
        (CONTINUATION, True, payload_of(65536)),
        (PONG, True, b""),
    ]
    for masked in (False, True):
        wire, ends = encode_all(frames, masked)
        tracker = FrameTracker(masked=masked)
        boundaries = []
        for i in range(len(wire)):
            tracker.feed(wire[i : i + 1])
            if tracker.at_boundary:
                boundaries.append(i + 1)
        assert boundaries == ends


def test_empty_feed_changes_nothing() -> None:
    tracker = FrameTracker(masked=False)
    tracker.feed(b"\x82")
    tracker.feed(b"")
    assert not tracker.at_boundary
    assert tracker.feed_to_boundary(b"") == 0
    tracker.feed(b"\x00")
    assert tracker.at_boundary and tracker.frames == 1


def test_only_header_bytes_are_kept() -> None:
    wire, _ = encode_all([(BINARY, True, payload_of(70000))], masked=True)
    tracker = FrameTracker(masked=True)
    tracker.feed(wire[:5])  # 2 + 8 + 4 header bytes: 5 of them
    assert len(tracker._head) == 5
    tracker.feed(wire[5:20])
    assert tracker._head == b"" and tracker._remaining == 70000 - 6


# --- violations ---------------------------------------------------------------------------


def server(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    return reference_frame(opcode, payload, fin, None)


def client(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    return reference_frame(opcode, payload, fin, b"\x01\x02\x03\x04")


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_reserved_opcode(opcode: int) -> None:
    with pytest.raises(FrameError, match="reserved opcode"):
        FrameTracker(masked=False).feed(server(opcode, b"x"))


@pytest.mark.parametrize(
    "bad, match",
    [
        (server(PING, payload_of(126)), "longer than 125"),
        (server(CLOSE, payload_of(200)), "longer than 125"),
        (server(PONG, b"x", fin=False), "fragmented control"),
        (server(CONTINUATION, b"x"), "continuation frame outside"),
        (server(BINARY, b"a", fin=False) + server(TEXT, b"b"), "inside a fragmented"),
        (client(TEXT, b"hi"), "masked frame from a server"),
        (b"\x82\x7f\x80" + bytes(7), "most significant bit"),
    ],
)
def test_violations_from_a_server(bad: bytes, match: str) -> None:
    with pytest.raises(FrameError, match=match):
        FrameTracker(masked=False).feed(bad)


def test_unmasked_frame_from_a_client() -> None:
    with pytest.raises(FrameError, match="unmasked frame from a client"):
        FrameTracker(masked=True).feed(server(TEXT, b"hi"))


def test_violation_offset_points_at_the_bad_frame_and_the_tracker_stays_broken() -> None:
    good = server(TEXT, b"hello") + server(PING, b"") + server(BINARY, payload_of(300))
    tracker = FrameTracker(masked=False)
    with pytest.raises(FrameError) as caught:
        tracker.feed(good + server(0x3, b"boom") + server(TEXT, b"later"))
    assert caught.value.offset == len(good)
    with pytest.raises(FrameError) as again:
        tracker.feed(server(TEXT, b"fine"))
    assert again.value.offset == 0


def test_violation_in_a_header_split_across_reads_has_offset_zero() -> None:
    tracker = FrameTracker(masked=False)
    tracker.feed(server(TEXT, b"ok") + b"\x89")  # a ping's first byte
    with pytest.raises(FrameError) as caught:
        tracker.feed(b"\x7e\x00\x80")  # ... 126: too long for a control frame
    assert caught.value.offset == 0


def test_control_frames_between_fragments_are_fine() -> None:
    tracker = FrameTracker(masked=True)
    tracker.feed(
        client(TEXT, b"a", fin=False)
        + client(PING, b"p")
        + client(CONTINUATION, b"b", fin=False)
        + client(CLOSE, b"\x03\xe8")
        + client(CONTINUATION, b"c")
        + client(BINARY, b"d")
    )
    assert tracker.at_boundary and tracker.frames == 6 and tracker.close_seen


def test_rsv_bits_are_left_to_extensions() -> None:
    compressed = bytes([0xC1]) + server(TEXT, b"zz")[1:]  # RSV1: permessage-deflate
    tracker = FrameTracker(masked=False)
    tracker.feed(compressed)
    assert tracker.at_boundary


# --- close frames -------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    code=st.one_of(st.sampled_from([1000, 1001, 1002, 1011, 3000, 4999]), st.integers(1000, 4999)),
    reason=st.text(max_size=40).map(lambda t: t.encode("utf-8")[:123]),
    masked=st.booleans(),
)
def test_close_frame_matches_autobahn_and_tracks_as_one_close(
    code: int, reason: bytes, masked: bool
) -> None:
    try:
        reason.decode("utf-8")
    except UnicodeDecodeError:
        reason = b""  # the cut at 123 bytes split a character
    if not valid_close_code(code):
        with pytest.raises(ValueError):
            close_frame(code, reason)
        return
    payload = code.to_bytes(2, "big") + reason
    theirs = AutobahnEncoder(masked).frame(CLOSE, payload)
    ours = close_frame(code, reason, mask_key_of(theirs))
    assert ours == theirs
    tracker = FrameTracker(masked=masked)
    tracker.feed(ours)
    assert tracker.at_boundary and tracker.close_seen and tracker.frames == 1


def test_going_away_frames() -> None:
    assert close_frame(CLOSE_GOING_AWAY, b"") == b"\x88\x02\x03\xe9"
    masked = close_frame(CLOSE_GOING_AWAY, b"bye", b"\x00\x00\x00\x00")
    assert masked == b"\x88\x85\x00\x00\x00\x00\x03\xe9bye"
    key = b"\x37\xfa\x21\x3d"
    frame = close_frame(CLOSE_GOING_AWAY, b"bye", key)
    assert frame[:6] == b"\x88\x85" + key
    assert bytes(b ^ key[i % 4] for i, b in enumerate(frame[6:])) == b"\x03\xe9bye"


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000])
def test_close_codes_that_may_not_be_sent(code: int) -> None:
    with pytest.raises(ValueError, match="may not be sent"):
        close_frame(code)


def test_close_frame_checks_reason_and_key() -> None:
    close_frame(1000, b"r" * 123)
    with pytest.raises(ValueError, match="at most 123"):
        close_frame(1000, b"r" * 124)
    with pytest.raises(ValueError):
        close_frame(1000, b"\xff\xfe")
    with pytest.raises(ValueError, match="must be 4"):
        close_frame(1000, b"", b"abc")
