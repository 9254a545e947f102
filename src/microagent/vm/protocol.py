"""The agent channel's framing (``docs/protocol.md``): pure encoding and decoding, no I/O.

A frame is a 12-byte big-endian header (length, type, flags, reserved, stream) and up to
:data:`MAX_PAYLOAD` bytes of payload. :class:`FrameDecoder` turns arbitrary chunks of the
byte stream into frames and reports a malformed header as :class:`ProtocolError`;
:class:`FrameBuffer`, under it, lets a relay receive into one buffer and forward frames
from it without copying them out.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

from microagent.errors import MicroagentError

VERSION = 1
MAX_PAYLOAD = 65536
DEFAULT_WINDOW = 4 * 1024 * 1024
HEADER = struct.Struct(">IBBHI")
FLAG_END = 0x01


class FrameType(enum.IntEnum):
    """Frame types of protocol version 1."""

    HELLO = 0x01
    PING = 0x02
    PONG = 0x03
    OPEN = 0x10
    STARTED = 0x11
    EXIT = 0x12
    ERROR = 0x13
    STDIN = 0x20
    STDOUT = 0x21
    STDERR = 0x22
    FILE = 0x23
    CREDIT = 0x30
    SIGNAL = 0x31
    RESIZE = 0x32
    CANCEL = 0x33


DATA_TYPES = frozenset({FrameType.STDIN, FrameType.STDOUT, FrameType.STDERR, FrameType.FILE})


class ProtocolError(MicroagentError):
    """The peer sent something the protocol does not allow."""

    kind = "protocol"


@dataclass(frozen=True)
class Frame:
    """One decoded frame."""

    type: int
    stream: int
    payload: bytes = b""
    flags: int = 0

    @property
    def end(self) -> bool:
        """True when this is the last frame of its data channel."""
        return bool(self.flags & FLAG_END)

    def json(self) -> dict[str, Any]:
        """The payload of a control frame, parsed."""
        try:
            value = json.loads(self.payload)
        except ValueError as e:
            raise ProtocolError(f"frame type {self.type:#x} carries malformed JSON") from e
        if not isinstance(value, dict):
            raise ProtocolError(f"frame type {self.type:#x} carries JSON that is not an object")
        return value


def encode(type_: int, stream: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """One frame's bytes."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(len(payload), type_, flags, 0, stream) + payload


def encode_json(type_: int, stream: int, document: dict[str, Any]) -> bytes:
    """A control frame whose payload is ``document`` as compact JSON."""
    return encode(type_, stream, json.dumps(document, separators=(",", ":")).encode())


def encode_credit(stream: int, data_type: int, increment: int) -> bytes:
    """A CREDIT frame returning ``increment`` bytes of window for one data channel."""
    return encode(FrameType.CREDIT, stream, struct.pack(">BI", data_type, increment))


def decode_credit(frame: Frame) -> tuple[int, int]:
    """``(data_type, increment)`` of a CREDIT frame."""
    if len(frame.payload) != 5:
        raise ProtocolError(f"CREDIT frame with a {len(frame.payload)}-byte payload")
    data_type, increment = struct.unpack(">BI", frame.payload)
    return int(data_type), int(increment)


class FrameBuffer:
    """Bytes of the stream received but not yet consumed, in one reusable buffer that
    the socket reads straight into (``recv_into``): no copy on the way in.

    :meth:`room` is where the next read goes, :meth:`received` records it, :meth:`scan`
    walks the complete frames, :meth:`consume` drops what was used and moves the partial
    frame left over to the front. There is always room for a maximal frame and a
    ``read_size`` read besides.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD, read_size: int = 1 << 20) -> None:
        self.max_payload = max_payload
        self.data = bytearray(read_size + 2 * (HEADER.size + max_payload))
        self.view = memoryview(self.data)
        self.filled = 0

    def room(self) -> memoryview:
        """Where the next read goes."""
        return self.view[self.filled:]

    def received(self, count: int) -> None:
        """``count`` bytes were read into :meth:`room`."""
        self.filled += count

    def append(self, data: bytes) -> None:
        """Add ``data`` read elsewhere, growing if need be."""
        end = self.filled + len(data)
        if end > len(self.data):
            self.view.release()
            self.data.extend(bytes(end - len(self.data)))
            self.view = memoryview(self.data)
        self.view[self.filled:end] = data
        self.filled = end

    def scan(self) -> list[tuple[int, int, int, int, int]]:
        """``(offset, end, type, flags, stream)`` of each complete frame, in order; the
        payload is ``view[offset + HEADER.size:end]``. Raises ProtocolError on a
        malformed header (and keeps the frames before it out of the answer)."""
        data, filled = self.data, self.filled
        frames = []
        offset = 0
        while filled - offset >= HEADER.size:
            length, type_, flags, reserved, stream = HEADER.unpack_from(data, offset)
            if length > self.max_payload:
                raise ProtocolError(f"frame of {length} bytes exceeds the maximum "
                                    f"of {self.max_payload}")
            if reserved or flags & ~FLAG_END:
                raise ProtocolError(f"frame header has reserved bits set "
                                    f"(flags={flags:#x}, reserved={reserved:#x})")
            end = offset + HEADER.size + length
            if filled < end:
                break
            frames.append((offset, end, type_, flags, stream))
            offset = end
        return frames

    def consume(self, offset: int) -> None:
        """Drop the first ``offset`` bytes (whole frames); the rest moves to the front."""
        if offset:
            left = self.filled - offset
            if left:
                self.view[:left] = bytes(self.view[offset:self.filled])
            self.filled = left

    def frame(self, offset: int, end: int, type_: int, flags: int, stream: int) -> Frame:
        """One scanned frame as a :class:`Frame` (its payload copied out)."""
        return Frame(type_, stream, bytes(self.view[offset + HEADER.size:end]), flags)


class FrameDecoder(FrameBuffer):
    """Incremental decoder: feed bytes (or receive into :meth:`room`), collect frames."""

    def feed(self, data: bytes) -> list[Frame]:
        """Add ``data``; return every frame now complete. Raises ProtocolError."""
        self.append(data)
        return self.frames()

    def frames(self) -> list[Frame]:
        """Every complete frame, consumed. Raises ProtocolError."""
        scanned = self.scan()
        if not scanned:
            return []
        frames = [self.frame(*entry) for entry in scanned]
        self.consume(scanned[-1][1])
        return frames
