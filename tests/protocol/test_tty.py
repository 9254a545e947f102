"""exec with a pty: a terminal, its size, RESIZE, stdin through the terminal."""

from __future__ import annotations

import time

from microagent.vm.protocol import FrameType
from tests.protocol.driver import Session


def test_pty_is_a_terminal_with_the_requested_size(session: Session) -> None:
    state = session.run(["sh", "-c", "tty -s && echo is-a-tty; stty size; tty -s <&1 && "
                         "echo out-tty"], tty={"rows": 33, "cols": 101})
    assert state.exit is not None and state.exit["exit_code"] == 0
    text = bytes(state.stdout).replace(b"\r\n", b"\n")
    assert text == b"is-a-tty\n33 101\nout-tty\n", text
    assert not state.stderr  # everything comes as STDOUT with a pty
    assert not any(f.type == FrameType.STDERR for f in state.frames)


def test_resize_reaches_the_terminal(session: Session) -> None:
    state = session.exec(["sh", "-c", "trap 'stty size; exit 0' WINCH; echo ready; "
                          "while :; do sleep 0.05; done"], tty={"rows": 10, "cols": 20})
    session.pump_until(lambda: b"ready" in state.stdout, what="the shell to be ready")
    session.send_json(FrameType.RESIZE, state.id, {"rows": 50, "cols": 160})
    session.wait(state)
    assert state.exit is not None and state.exit["exit_code"] == 0
    assert b"50 160" in bytes(state.stdout), bytes(state.stdout)


def test_stdin_through_the_pty(session: Session) -> None:
    state = session.exec(["sh", "-c", "read line; echo got:$line"],
                         tty={"rows": 24, "cols": 80}, stdin=True)
    session.stdin(state, b"hello\n")
    session.wait(state)
    assert state.exit is not None and state.exit["exit_code"] == 0
    assert b"got:hello" in bytes(state.stdout)


def test_ctrl_c_through_the_pty_interrupts(session: Session) -> None:
    state = session.exec(["sh", "-c", "echo ready; exec sleep 60"], tty={"rows": 24, "cols": 80},
                         stdin=True)
    session.pump_until(lambda: b"ready" in state.stdout, what="ready")
    time.sleep(0.2)
    session.stdin(state, b"\x03")
    session.wait(state)
    assert state.exit is not None and state.exit["signal"] == 2
