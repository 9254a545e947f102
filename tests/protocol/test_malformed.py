"""Malformed input: the agent answers as docs/protocol.md says and goes on serving."""

from __future__ import annotations

import struct

from microagent.vm.protocol import FrameType, encode
from tests.protocol.driver import Session


def header(length: int, type_: int, flags: int = 0, reserved: int = 0, stream: int = 0) -> bytes:
    return struct.pack(">IBBHI", length, type_, flags, reserved, stream)


def assert_serves(session: Session) -> None:
    state = session.run(["echo", "still", "here"])
    assert state.exit is not None and bytes(state.stdout) == b"still here\n"


def resync(session: Session) -> None:
    """After EPROTO on stream 0 the agent waits for HELLO; ids start over."""
    session.hello()
    session.next_id = 1
    session.streams.clear()


def test_oversized_frame_resynchronises(session: Session) -> None:
    running = session.exec(["sleep", "60"])
    session.pump_until(lambda: running.started is not None, what="STARTED")
    session.send(header(65537, FrameType.STDIN, stream=running.id))
    error = session.expect_control(FrameType.ERROR).json()
    assert error["code"] == "EPROTO" and "65537" in error["message"]
    # until the next HELLO nothing is served (and no second error is sent)
    session.send(encode(FrameType.PING, 0, b"{}"))
    assert session.read_frames(0.3) == []
    resync(session)
    assert_serves(session)


def test_reserved_bits_resynchronise(session: Session) -> None:
    for flags, reserved in ((0x02, 0), (0x80, 0), (0, 1), (0, 0x8000)):
        session.send(header(0, FrameType.PING, flags, reserved))
        error = session.expect_control(FrameType.ERROR).json()
        assert error["code"] == "EPROTO" and "reserved" in error["message"], error
        resync(session)
    assert_serves(session)


def test_unknown_type_on_stream_0(session: Session) -> None:
    session.send(encode(0x7F, 0, b"x"))
    error = session.expect_control(FrameType.ERROR).json()
    assert error["code"] == "EPROTO" and "0x7f" in error["message"]
    assert_serves(session)


def test_unknown_type_on_an_open_stream_ends_it(session: Session) -> None:
    state = session.exec(["sleep", "60"])
    session.pump_until(lambda: state.started is not None, what="STARTED")
    session.send(encode(0x7E, state.id, b""))
    session.wait(state)
    assert state.error is not None and state.error["code"] == "EPROTO"
    assert_serves(session)


def test_bad_json_in_open(session: Session) -> None:
    for payload in (b"{", b"[]", b"{\"op\": 1}", b"\xff\xfe", b"{\"op\":\"exec\",}",
                    b"[" * 100 + b"]" * 100, b"{\"op\":\"exec\"} x", b"\"\\u12\"",
                    b"{\"op\":\"exec\",\"argv\":[\"\\ud800\"]}"):
        stream = session.next_id
        session.next_id += 2
        session.send(encode(FrameType.OPEN, stream, payload))
        error = session.expect_control(FrameType.ERROR, stream).json()
        assert error["code"] in ("EPROTO", "EINVAL"), (payload, error)
    assert_serves(session)


def test_bad_json_in_signal_ends_the_stream(session: Session) -> None:
    state = session.exec(["sleep", "60"])
    session.pump_until(lambda: state.started is not None, what="STARTED")
    session.send(encode(FrameType.SIGNAL, state.id, b"{\"signal\":"))
    session.wait(state)
    assert state.error is not None and state.error["code"] == "EPROTO"
    assert_serves(session)


def test_frame_for_a_stream_never_opened(session: Session) -> None:
    session.send(encode(FrameType.STDIN, 99, b"data"))
    error = session.expect_control(FrameType.ERROR, 99).json()
    assert error["code"] == "EPROTO" and "99" in error["message"]
    session.next_id = 101
    assert_serves(session)


def test_frames_racing_with_the_end_of_a_stream_are_ignored(session: Session) -> None:
    state = session.run(["true"])
    assert state.exit is not None
    session.credit(state, FrameType.STDOUT, 100)
    session.send(encode(FrameType.SIGNAL, state.id, b"{\"signal\": 15}"))
    assert session.read_frames(0.3) == []
    assert_serves(session)


def test_open_on_stream_0_and_reused_ids(session: Session) -> None:
    session.send(encode(FrameType.OPEN, 0, b"{\"op\":\"info\"}"))
    assert session.expect_control(FrameType.ERROR).json()["code"] == "EPROTO"
    state = session.exec(["sleep", "60"])
    session.pump_until(lambda: state.started is not None, what="STARTED")
    session.send(encode(FrameType.OPEN, state.id, b"{\"op\":\"info\"}"))
    session.wait(state)
    assert state.error is not None and "already open" in state.error["message"]
    assert_serves(session)


def test_bad_credit_frames(session: Session) -> None:
    state = session.exec(["sleep", "60"])
    session.pump_until(lambda: state.started is not None, what="STARTED")
    session.send(encode(FrameType.CREDIT, state.id, b"\x21\x00"))
    session.wait(state)
    assert state.error is not None and state.error["code"] == "EPROTO"
    assert_serves(session)


def test_garbage_split_across_reads(session: Session) -> None:
    # A valid frame delivered one byte at a time still parses.
    frame = encode(FrameType.PING, 0, b"slow")
    for byte in frame:
        session.send(bytes([byte]))
    assert session.expect_control(FrameType.PONG).payload == b"slow"
    assert_serves(session)
