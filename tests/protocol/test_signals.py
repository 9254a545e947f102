"""SIGNAL forwarding and CANCEL."""

from __future__ import annotations

import signal

from microagent.vm.agent import AgentClient, ExecRequest
from microagent.vm.protocol import FrameType
from tests.protocol.driver import Session


def test_sigterm_forwarded_to_sleep_is_143(client: AgentClient) -> None:
    sent: list[bool] = []

    def poll() -> list[bytes]:
        if not sent:
            sent.append(True)
            return [client.signal_frame(signal.SIGTERM)]
        return []

    result = client.exec(ExecRequest(argv=("sleep", "60"), env=("PATH=/bin:/usr/bin",)),
                         stdout=lambda b: None, stderr=lambda b: None, poll=poll)
    assert (result.signal, result.host_exit_code) == (signal.SIGTERM, 143)


def test_signal_reaches_the_whole_process_group(session: Session) -> None:
    state = session.exec(["sh", "-c", "sleep 60 & sleep 60 & echo started; wait"])
    session.pump_until(lambda: b"started" in state.stdout, what="started")
    session.send_json(FrameType.SIGNAL, state.id, {"signal": signal.SIGKILL})
    session.wait(state, timeout=10)  # EOF needs the background sleeps dead too
    assert state.exit is not None and state.exit["signal"] == signal.SIGKILL


def test_signal_handled_by_the_process(session: Session) -> None:
    state = session.exec(["sh", "-c", "trap 'echo got-usr1; exit 7' USR1; echo ready; "
                          "while :; do sleep 0.05; done"])
    session.pump_until(lambda: b"ready" in state.stdout, what="ready")
    session.send_json(FrameType.SIGNAL, state.id, {"signal": signal.SIGUSR1})
    session.wait(state)
    assert state.exit is not None and state.exit["exit_code"] == 7
    assert b"got-usr1" in bytes(state.stdout)


def test_bad_signal_numbers_end_the_stream(session: Session) -> None:
    state = session.exec(["sleep", "60"])
    session.pump_until(lambda: state.started is not None, what="STARTED")
    session.send_json(FrameType.SIGNAL, state.id, {"signal": 0})
    session.wait(state)
    assert state.error is not None and state.error["code"] == "EPROTO"


def test_cancel_kills_and_ends_with_exit(session: Session) -> None:
    state = session.exec(["sh", "-c", "sleep 60 & sleep 60"])
    session.pump_until(lambda: state.started is not None, what="STARTED")
    session.send_json(FrameType.CANCEL, state.id, {})
    session.wait(state, timeout=10)
    assert state.exit == {"exit_code": None, "signal": 9, "timed_out": False}
