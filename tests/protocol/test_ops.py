"""put, get, info and shutdown."""

from __future__ import annotations

import os
import socket
import stat
import time
from pathlib import Path

import pytest

from microagent.vm.protocol import FLAG_END, FrameType, encode
from tests.protocol.driver import AgentProcess, Session


def put(session: Session, path: Path, data: bytes, **options: object) -> dict[str, object]:
    state = session.open({"op": "put", "path": str(path), **options})
    view = memoryview(data)
    while view:
        session.pump_until(lambda: state.file_credit > 0 or state.done, what="FILE credit")
        assert not state.done, state.error
        n = min(len(view), state.file_credit, 65536)
        state.file_credit -= n
        session.send(encode(FrameType.FILE, state.id, bytes(view[:n])))
        view = view[n:]
    session.send(encode(FrameType.FILE, state.id, b"", FLAG_END))
    session.wait(state)
    return state.exit or {"error": state.error}


def test_put_writes_atomically_with_mode_and_owner(session: Session, tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    assert put(session, target, data, mode=0o640, uid=1234, gid=5678)["exit_code"] == 0
    assert target.read_bytes() == data
    st = target.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]  # no temporary left


def test_put_errors(session: Session, tmp_path: Path) -> None:
    result = put(session, tmp_path / "missing-dir" / "f", b"x")
    assert result["error"]["code"] == "ENOENT"  # type: ignore[index]
    result = put(session, tmp_path, b"x")
    assert result["error"]["code"] == "EISDIR"  # type: ignore[index]
    state = session.wait(session.open({"op": "put", "path": "relative"}))
    assert state.error is not None and state.error["code"] == "EINVAL"


def test_put_cancelled_leaves_no_temporary(session: Session, tmp_path: Path) -> None:
    state = session.open({"op": "put", "path": str(tmp_path / "f")})
    session.send(encode(FrameType.FILE, state.id, b"partial"))
    session.send_json(FrameType.CANCEL, state.id, {})
    session.wait(state)
    assert state.error is not None and state.error["code"] == "ECANCELED"
    assert list(tmp_path.iterdir()) == []


def test_get_streams_a_file_within_credit(agent: AgentProcess, tmp_path: Path) -> None:
    session = Session(agent.sock)
    session.hello()
    data = os.urandom(5 << 20)
    source = tmp_path / "source"
    source.write_bytes(data)
    source.chmod(0o604)
    state = session.wait(session.open({"op": "get", "path": str(source)}))
    assert state.started is not None
    assert state.started["size"] == len(data) and state.started["mode"] == 0o604
    assert bytes(state.file) == data
    assert FrameType.FILE in state.ends and state.exit is not None


def test_get_errors(session: Session, tmp_path: Path) -> None:
    for path, code in ((tmp_path / "missing", "ENOENT"), (tmp_path, "EISDIR"),
                       (Path("/dev/null"), "EINVAL")):
        state = session.wait(session.open({"op": "get", "path": str(path)}))
        assert state.error is not None and state.error["code"] == code, state.error


def test_info(session: Session) -> None:
    state = session.wait(session.open({"op": "info"}))
    assert state.exit is not None and state.exit["exit_code"] == 0
    info = state.exit["info"]
    assert info["kernel"] == os.uname().release
    assert info["hostname"] == os.uname().nodename
    assert info["uptime_ms"] > 0 and info["pid1"] is False
    assert info["network"]["configured"] is False
    assert "test mode" in info["network"]["detail"]


@pytest.mark.parametrize("grace_ms", [0, 100])
def test_shutdown_in_test_mode_exits(agent: AgentProcess, grace_ms: int) -> None:
    session = Session(agent.sock)
    session.hello()
    running = session.exec(["sleep", "60"])
    session.pump_until(lambda: running.started is not None, what="STARTED")
    state = session.open({"op": "shutdown", "grace_ms": grace_ms})
    session.pump_until(lambda: state.started is not None, what="STARTED of shutdown")
    assert agent.proc.wait(timeout=10) == 0


def test_shutdown_bad_arguments(session: Session) -> None:
    state = session.wait(session.open({"op": "shutdown", "mode": "reboot"}))
    assert state.error is not None and state.error["code"] == "EINVAL"
    state = session.wait(session.open({"op": "shutdown", "grace_ms": -1}))
    assert state.error is not None and state.error["code"] == "EINVAL"


def test_console_size_arguments_and_no_console(session: Session) -> None:
    """In the host test mode the agent has no console device: ENODEV, after the
    arguments are checked (the VM side is tests/vm/test_console.py)."""
    for bad in ({}, {"rows": 0, "cols": 80}, {"rows": 24, "cols": 70000},
                {"rows": "24", "cols": 80}):
        state = session.wait(session.open({"op": "console_size", **bad}))
        assert state.error is not None and state.error["code"] == "EINVAL", bad
    state = session.wait(session.open({"op": "console_size", "rows": 24, "cols": 80}))
    assert state.error is not None and state.error["code"] == "ENODEV"


def test_resumed_is_checked_and_never_touches_the_host(session: Session) -> None:
    """The resumed operation's arguments; in the host test mode it answers without
    stepping the host's clock or reseeding its RNG (the VM side is tests/vm/test_pause.py)."""
    good = {"op": "resumed", "time_ns": 1_700_000_000_000_000_000, "entropy": "ab" * 32,
            "generation": 3}
    for bad in ({"time_ns": 0}, {"entropy": "ab" * 8 + "a"}, {"entropy": "AB" * 32},
                {"entropy": "zz" * 32}, {"entropy": "ab" * 4}, {"generation": -1},
                {"time_ns": "1"}):
        state = session.wait(session.open({**good, **bad}))
        assert state.error is not None and state.error["code"] == "EINVAL", bad
    before = time.time()
    state = session.wait(session.open(good))
    assert state.error is None and state.exit is not None
    assert (state.exit["applied"], state.exit["generation"]) == (False, 3)
    assert abs(time.time() - before) < 60, "the host's clock was left alone"


def test_resumed_identity_is_checked_and_never_touches_the_host(session: Session) -> None:
    """A fork's identity (hostname, machine ID): checked, and in the host test mode never
    applied (the VM side is tests/vm/test_agent.py)."""
    assert "resumed_identity" in session.peer["features"]
    good = {"op": "resumed", "time_ns": 1_700_000_000_000_000_000, "entropy": "ab" * 32,
            "generation": 4}
    hostname = socket.gethostname()
    for bad in ({}, None, "ws-b", {"hostname": ""}, {"hostname": "a" * 64},
                {"hostname": "-ws"}, {"hostname": "ws-"}, {"hostname": "ws_b"},
                {"hostname": "ws.b"}, {"hostname": "ws b"}, {"hostname": 7},
                {"hostname": "ws-b", "machine_id": 1}, {"machine_id": True}):
        state = session.wait(session.open({**good, "identity": bad}))
        assert state.error is not None and state.error["code"] == "EINVAL", bad
    for identity in ({"hostname": "ws-b", "machine_id": True}, {"hostname": "a" * 63},
                     {"hostname": "0", "machine_id": False}):
        state = session.wait(session.open({**good, "identity": identity}))
        assert state.error is None and state.exit is not None, identity
        assert (state.exit["applied"], state.exit["generation"]) == (False, 4)
        assert "hostname" not in state.exit
    assert socket.gethostname() == hostname, "the host's hostname was left alone"
