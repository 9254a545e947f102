"""The agent channel's framing (``docs/protocol.md``): pure encoding and decoding, no I/O.

A frame is a 12-byte big-endian header (length, type, flags, reserved, stream) and up to
:data:`MAX_PAYLOAD` bytes of payload. :class:`FrameDecoder` turns arbitrary chunks of the
byte stream into frames and reports a malformed header as :class:`ProtocolError`.
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


class FrameDecoder:
    """Incremental decoder: feed bytes, collect complete frames."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        """Add ``data``; return every frame now complete. Raises ProtocolError."""
        self.buffer += data
        buffer = self.buffer
        frames = []
        offset = 0
        # Walk with an offset and trim once: deleting each frame from the front of a
        # large buffer would move the rest every time.
        while len(buffer) - offset >= HEADER.size:
            length, type_, flags, reserved, stream = HEADER.unpack_from(buffer, offset)
            if length > self.max_payload:
                raise ProtocolError(f"frame of {length} bytes exceeds the maximum "
                                    f"of {self.max_payload}")
            if reserved or flags & ~FLAG_END:
                raise ProtocolError(f"frame header has reserved bits set "
                                    f"(flags={flags:#x}, reserved={reserved:#x})")
            end = offset + HEADER.size + length
            if len(buffer) < end:
                break
            frames.append(Frame(type_, stream, bytes(buffer[offset + HEADER.size:end]), flags))
            offset = end
        if offset:
            del buffer[:offset]
        return frames
