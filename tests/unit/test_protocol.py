"""Framing of the agent channel: round trips, split input, malformed headers."""

from __future__ import annotations

import struct

import pytest

from microagent.vm.protocol import (
    FLAG_END,
    MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    FrameType,
    ProtocolError,
    decode_credit,
    encode,
    encode_credit,
    encode_json,
)


def test_round_trip_byte_by_byte() -> None:
    wire = (encode_json(FrameType.HELLO, 0, {"version": 1})
            + encode(FrameType.STDOUT, 3, b"\x00\xffbinary", FLAG_END)
            + encode_credit(3, FrameType.STDIN, 4096))
    decoder = FrameDecoder()
    frames = [f for byte in wire for f in decoder.feed(bytes([byte]))]
    assert frames[0].json() == {"version": 1}
    assert frames[1] == Frame(FrameType.STDOUT, 3, b"\x00\xffbinary", FLAG_END)
    assert frames[1].end
    assert decode_credit(frames[2]) == (FrameType.STDIN, 4096)
    assert decoder.filled == 0


def test_largest_payload_passes_and_larger_is_refused() -> None:
    frame = encode(FrameType.STDOUT, 1, b"x" * MAX_PAYLOAD)
    assert FrameDecoder().feed(frame)[0].payload == b"x" * MAX_PAYLOAD
    with pytest.raises(ValueError):
        encode(FrameType.STDOUT, 1, b"x" * (MAX_PAYLOAD + 1))
    oversized = struct.pack(">IBBHI", MAX_PAYLOAD + 1, FrameType.STDOUT, 0, 0, 1)
    with pytest.raises(ProtocolError, match="exceeds"):
        FrameDecoder().feed(oversized)


@pytest.mark.parametrize(("flags", "reserved"), [(0x02, 0), (0x80, 0), (0, 1)])
def test_reserved_bits_are_refused(flags: int, reserved: int) -> None:
    with pytest.raises(ProtocolError, match="reserved"):
        FrameDecoder().feed(struct.pack(">IBBHI", 0, FrameType.PING, flags, reserved, 0))


def test_malformed_json_and_credit() -> None:
    with pytest.raises(ProtocolError, match="malformed JSON"):
        Frame(FrameType.OPEN, 1, b"{nope").json()
    with pytest.raises(ProtocolError, match="not an object"):
        Frame(FrameType.OPEN, 1, b"[1]").json()
    with pytest.raises(ProtocolError, match="CREDIT"):
        decode_credit(Frame(FrameType.CREDIT, 1, b"\x20"))
