"""The connection: HELLO, versions, PING, and a second HELLO resetting the streams."""

from __future__ import annotations

import os
import time

import pytest

from microagent.vm.agent import AgentClient
from microagent.vm.protocol import FrameType, ProtocolError, encode
from tests.protocol.driver import AgentProcess, Session


def test_hello_answers_with_the_agents_hello(agent: AgentProcess) -> None:
    peer = AgentClient(agent.sock).hello()
    assert peer["version"] == 1
    assert peer["max_payload"] == 65536 and peer["window"] == 262144
    assert {"exec", "put", "get", "info", "shutdown", "console_size"} <= set(peer["features"])
    assert peer["software"].startswith("microagent-init ")


def test_version_mismatch_is_refused_clearly(agent: AgentProcess) -> None:
    session = Session(agent.sock)
    session.send_json(FrameType.HELLO, 0, {"version": 2, "features": []})
    error = session.expect_control(FrameType.ERROR).json()
    assert error["code"] == "EVERSION"
    assert "version 1" in error["message"] and "version 2" in error["message"]
    # the connection is not used further: an exec is ignored until the next HELLO
    session.exec(["true"])
    assert session.read_frames(0.3) == []
    session.hello()
    assert session.run(["true"]).exit is not None


def test_agent_client_reports_the_refusal(agent: AgentProcess, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    monkeypatch.setattr("microagent.vm.agent.VERSION", 7)
    with pytest.raises(ProtocolError, match="protocol version 1"):
        AgentClient(agent.sock).hello()


def test_frames_before_hello_are_errors(agent: AgentProcess) -> None:
    session = Session(agent.sock)
    session.send_json(FrameType.OPEN, 1, {"op": "exec", "argv": ["true"]})
    error = session.expect_control(FrameType.ERROR).json()
    assert error["code"] == "EPROTO" and "HELLO" in error["message"]
    session.hello()
    assert session.run(["true"]).exit is not None


def test_bad_hello_parameters(agent: AgentProcess) -> None:
    session = Session(agent.sock)
    docs: list[dict[str, object]] = [{"features": []}, {"version": "1"}]
    for doc in docs:
        session.send_json(FrameType.HELLO, 0, doc)
        assert session.expect_control(FrameType.ERROR).json()["code"] == "EPROTO"
    session.send_json(FrameType.HELLO, 0, {"version": 1, "max_payload": 100})
    assert "max_payload" in session.expect_control(FrameType.ERROR).json()["message"]
    session.send(encode(FrameType.HELLO, 0, b"{not json"))
    assert session.expect_control(FrameType.ERROR).json()["code"] == "EPROTO"
    session.hello()
    assert session.run(["true"]).exit is not None


def test_ping_pong_echoes_the_payload(session: Session) -> None:
    for payload in (b"{}", b"", bytes(range(256)) * 100):
        session.send(encode(FrameType.PING, 0, payload))
        assert session.expect_control(FrameType.PONG).payload == payload


def test_smaller_max_payload_and_window_of_the_host_are_honoured(agent: AgentProcess) -> None:
    session = Session(agent.sock, window=5000)
    session.hello(max_payload=2048)
    state = session.run(["head", "-c", "100000", "/dev/zero"])
    assert state.exit is not None and len(state.stdout) == 100000
    sizes = [len(f.payload) for f in state.frames if f.type == FrameType.STDOUT]
    assert max(sizes) <= 2048


def test_second_hello_ends_every_stream(session: Session, agent: AgentProcess) -> None:
    state = session.exec(["sleep", "60"])
    session.pump_until(lambda: state.started is not None, what="STARTED")
    pid = state.started["pid"] if state.started else 0
    session.hello()
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, "the old stream's process survived the HELLO"
        time.sleep(0.05)
    # no EXIT for the old stream: it belongs to the old connection
    session.read_frames(0.3)
    assert state.exit is None and state.error is None
    # the new connection starts its ids over
    session.next_id = 1
    assert session.run(["echo", "again"]).stdout == b"again\n"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone while being read
        return False


def test_eof_ends_the_agent_and_its_commands(agent: AgentProcess) -> None:
    session = Session(agent.sock)
    session.hello()
    state = session.exec(["sleep", "60"])
    session.pump_until(lambda: state.started is not None, what="STARTED")
    pid = state.started["pid"] if state.started else 0
    agent.sock.shutdown(2)
    assert agent.proc.wait(timeout=10) == 0
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert os.path.exists(f"/proc/{agent.pid}") is False or agent.proc.returncode == 0
