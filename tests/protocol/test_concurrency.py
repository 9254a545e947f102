"""Many streams on one connection; a stuck stream never blocks the others."""

from __future__ import annotations

import time

import pytest

from microagent.vm.protocol import DEFAULT_WINDOW, FrameType
from tests.protocol.driver import AgentProcess, Session


@pytest.mark.timeout(120)
def test_many_concurrent_execs_each_with_its_own_output(session: Session) -> None:
    count = 64
    states = [session.exec(["sh", "-c", f"head -c {20000 + i} /dev/zero | tr '\\0' "
                            f"'{chr(65 + i % 26)}'; echo err-{i} >&2; exit {i % 7}"])
              for i in range(count)]
    session.pump_until(lambda: all(s.done for s in states), 60, "all streams to end")
    for i, state in enumerate(states):
        assert state.exit is not None, state.error
        assert state.exit["exit_code"] == i % 7
        assert bytes(state.stdout) == chr(65 + i % 26).encode() * (20000 + i)
        assert bytes(state.stderr) == f"err-{i}\n".encode()


def test_a_stuck_stream_does_not_block_others(agent: AgentProcess) -> None:
    session = Session(agent.sock, auto_credit=False)
    session.hello()
    # This one fills its window and then gets no credit: its process blocks on the pipe.
    stuck = session.exec(["head", "-c", "10000000", "/dev/zero"])
    session.pump_until(lambda: len(stuck.stdout) >= DEFAULT_WINDOW,
                       what="the stuck stream's window")
    # This one waits for stdin that never comes.
    waiting = session.exec(["cat"], stdin=True)
    start = time.monotonic()
    for i in range(10):
        state = session.exec(["echo", f"quick-{i}"])
        session.pump_until(lambda state=state: state.done, what=f"quick exec {i}")
        assert bytes(state.stdout) == f"quick-{i}\n".encode()
        session.credit(state, FrameType.STDOUT, len(state.stdout))
    assert time.monotonic() - start < 10
    assert len(stuck.stdout) == DEFAULT_WINDOW and not stuck.done and not waiting.done
    session.send_json(FrameType.CANCEL, stuck.id, {})
    session.send_json(FrameType.CANCEL, waiting.id, {})
    session.pump_until(lambda: stuck.done and waiting.done, what="the cancelled streams")
    assert stuck.exit is not None and stuck.exit["signal"] == 9


def test_more_streams_than_the_table_holds_are_refused(session: Session) -> None:
    states = [session.exec(["sleep", "60"]) for _ in range(130)]
    session.pump_until(lambda: sum(s.started is not None or s.done for s in states) == 130,
                       60, "all opens answered")
    refused = [s for s in states if s.error is not None]
    assert len(refused) == 2 and all(s.error and s.error["code"] == "EBUSY" for s in refused)
    for state in states:
        if not state.done:
            session.send_json(FrameType.CANCEL, state.id, {})
    session.pump_until(lambda: all(s.done for s in states), 60, "all cancelled")
    assert session.run(["true"]).exit is not None
