"""
WebSocket framing (RFC 6455, section 5), just enough for a gateway that splices bytes.

A tunnel relays a WebSocket connection without decoding it, but it still has to know where
the frames of each direction begin and end: a close frame of its own (when the worker
drains) may only be put between two frames, never inside one. :class:`FrameTracker` follows
one direction's byte stream and knows at every byte whether it sits on a frame boundary.

It reads the frame headers only (2 to 14 bytes each) and skips payloads by counting, so
the payload bytes are never copied, unmasked or inspected: the tunnel forwards the very
``bytes`` objects it received. Only a header split across two reads is buffered, and it is
at most 13 bytes long.

What the headers alone reveal is checked, since a peer that breaks framing makes every later
boundary meaningless: a reserved opcode, a control frame that is fragmented or longer than
125 bytes, a mask bit that is wrong for the direction, a 64-bit length with its top bit
set, and continuation frames out of order. Anything needing the payload (UTF-8 of text
messages, the close code inside a close frame) is left to the endpoints. The reserved
(RSV) bits are not checked: extensions such as ``permessage-deflate`` set them, and the
tunnel does not take part in that negotiation.

:func:`close_frame` builds the one frame the gateway ever writes itself.

Pure and sans-IO: no reactor, no clock.
"""

from __future__ import annotations

from typing import Optional, Tuple

__all__ = [
    "BINARY",
    "CLOSE",
    "CLOSE_GOING_AWAY",
    "CLOSE_NORMAL",
    "CLOSE_PROTOCOL_ERROR",
    "CONTINUATION",
    "PING",
    "PONG",
    "TEXT",
    "FrameError",
    "FrameTracker",
    "close_frame",
    "valid_close_code",
]

#: Opcodes (RFC 6455, 5.2).
CONTINUATION = 0x0
TEXT = 0x1
BINARY = 0x2
CLOSE = 0x8
PING = 0x9
PONG = 0xA

_KNOWN_OPCODES = frozenset((CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG))

#: Close codes (RFC 6455, 7.4.1).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002

#: Longest header: 2 bytes, an 8-byte extended length, a 4-byte masking key.
_MAX_HEADER = 14
#: Payload limit of a control frame (RFC 6455, 5.5).
_MAX_CONTROL_PAYLOAD = 125


class FrameError(ValueError):
    """
    The byte stream broke WebSocket framing.

    :ivar offset: where, in the bytes given to the :meth:`FrameTracker.feed` call that
        raised, the offending frame's header starts (0 when it started in an earlier
        call). Everything before it is whole, valid frames and may be forwarded.
    """

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


class FrameTracker:
    """
    Follows the frame boundaries of one direction of a WebSocket connection.

    Feed it every byte of the direction, in order, with :meth:`feed` (or
    :meth:`feed_to_boundary` to stop right after the frame in progress ends). Once it has
    raised :class:`FrameError`, it raises again for any further bytes.

    :param masked: whether frames in this direction must be masked (client to server);
        frames from a server must not be.
    :ivar frames: how many frames have ended so far.
    :ivar close_seen: whether a whole close frame has gone by.
    """

    __slots__ = (
        "_broken",
        "_head",
        "_in_message",
        "_opcode",
        "_remaining",
        "close_seen",
        "frames",
        "masked",
    )

    def __init__(self, masked: bool) -> None:
        self.masked = masked
        self.frames = 0
        self.close_seen = False
        self._head = b""  # a header split across reads (never a whole one)
        self._remaining = 0  # payload bytes left in the current frame
        self._opcode = 0  # of the current frame
        self._in_message = False  # a fragmented data message has begun and not ended
        self._broken: Optional[str] = None

    @property
    def at_boundary(self) -> bool:
        """Whether the bytes fed so far end exactly where a frame ends (or nothing yet)."""
        return self._remaining == 0 and not self._head

    def feed(self, data: bytes) -> None:
        """
        Follow ``data``, the next bytes of the direction.

        :raises FrameError: the bytes break framing (see the module docstring).
        """
        self._advance(data, stop=False)

    def feed_to_boundary(self, data: bytes) -> int:
        """
        Follow ``data`` up to the next frame boundary and stop there.

        :returns: how many bytes of ``data`` were followed: up to and including the end
            of the frame in progress (0 when already at a boundary), or ``len(data)``
            if that frame does not end within ``data``. :attr:`at_boundary` tells which.
        :raises FrameError: the bytes break framing.
        """
        return self._advance(data, stop=True)

    # --- the walk ---------------------------------------------------------------------

    def _advance(self, data: bytes, stop: bool) -> int:
        if self._broken is not None:
            raise FrameError(self._broken, 0)
        n = len(data)
        pos = 0
        if stop and self.at_boundary:
            return 0
        while pos < n:
            remaining = self._remaining
            if remaining:
                take = n - pos
                if take < remaining:
                    self._remaining = remaining - take
                    return n
                pos += remaining
                self._remaining = 0
                self._end_frame()
                if stop:
                    return pos
                continue
            # A header: usually whole within ``data``; otherwise joined with the part kept.
            held = self._head
            if held:
                window = held + data[pos : pos + _MAX_HEADER - len(held)]
            else:
                window = data[pos : pos + _MAX_HEADER]
            try:
                parsed = self._parse_header(window)
            except FrameError as e:
                self._broken = str(e)
                raise FrameError(self._broken, 0 if held else pos) from None
            if parsed is None:  # not whole yet: keep it (fewer than 14 bytes)
                self._head = window
                return n
            header_length, length = parsed
            self._head = b""
            pos += header_length - len(held)
            if length:
                self._remaining = length
            else:
                self._end_frame()
                if stop:
                    return pos
        return n

    def _parse_header(self, window: bytes) -> Optional[Tuple[int, int]]:
        """
        Check a frame header and take note of it once it is whole.

        :returns: ``(header length, payload length)``, or ``None`` if ``window`` holds
            only the start of the header.
        """
        b0 = window[0]
        fin = bool(b0 & 0x80)
        opcode = b0 & 0x0F
        if opcode not in _KNOWN_OPCODES:
            raise FrameError(f"reserved opcode 0x{opcode:x}", 0)
        control = opcode >= CLOSE
        if control and not fin:
            raise FrameError(f"fragmented control frame (opcode 0x{opcode:x})", 0)
        if opcode == CONTINUATION and not self._in_message:
            raise FrameError("continuation frame outside a fragmented message", 0)
        if opcode in (TEXT, BINARY) and self._in_message:
            raise FrameError("new data frame inside a fragmented message", 0)
        if len(window) < 2:
            return None
        b1 = window[1]
        mask = bool(b1 & 0x80)
        if mask != self.masked:
            raise FrameError(
                "unmasked frame from a client" if self.masked else "masked frame from a server",
                0,
            )
        short = b1 & 0x7F
        if control and short > _MAX_CONTROL_PAYLOAD:
            raise FrameError(f"control frame longer than 125 bytes (opcode 0x{opcode:x})", 0)
        extended = 2 if short == 126 else 8 if short == 127 else 0
        header_length = 2 + extended + (4 if mask else 0)
        if len(window) < header_length:
            return None
        if extended:
            length = int.from_bytes(window[2 : 2 + extended], "big")
            if length >> 63:
                raise FrameError("64-bit payload length with its most significant bit set", 0)
        else:
            length = short
        # The header is whole: from here on, state changes (this runs once per frame).
        self._opcode = opcode
        if not control:
            self._in_message = not fin
        return header_length, length

    def _end_frame(self) -> None:
        self.frames += 1
        if self._opcode == CLOSE:
            self.close_seen = True


def valid_close_code(code: int) -> bool:
    """
    Whether ``code`` may be sent in a close frame (RFC 6455, 7.4, and the IANA registry).

    1004 is reserved; 1005, 1006 and 1015 only ever describe a closure locally; 3000-4999
    belong to libraries and applications.
    """
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def close_frame(code: int, reason: bytes = b"", mask_key: Optional[bytes] = None) -> bytes:
    """
    A whole close frame.

    :param code: the close code (see :func:`valid_close_code`).
    :param reason: UTF-8 text, at most 123 bytes (a control frame's payload is at most
        125 bytes, two of them the code).
    :param mask_key: four bytes to mask the payload with (a frame to a server must be
        masked; its key should be unpredictable, e.g. ``os.urandom(4)``), or ``None``
        for an unmasked frame (to a client).
    :raises ValueError: a code that may not be sent, a reason too long or not UTF-8, a
        key that is not four bytes.
    """
    if not valid_close_code(code):
        raise ValueError(f"close code {code} may not be sent")
    if len(reason) > _MAX_CONTROL_PAYLOAD - 2:
        raise ValueError(f"close reason of {len(reason)} bytes (at most 123)")
    reason.decode("utf-8")  # raises UnicodeDecodeError, a ValueError
    payload = code.to_bytes(2, "big") + reason
    if mask_key is None:
        return bytes((0x80 | CLOSE, len(payload))) + payload
    if len(mask_key) != 4:
        raise ValueError(f"masking key of {len(mask_key)} bytes (must be 4)")
    masked = bytes(byte ^ mask_key[i & 3] for i, byte in enumerate(payload))
    return bytes((0x80 | CLOSE, 0x80 | len(payload))) + mask_key + masked
