"""Output is spliced to the channel in batches (``src/microagent/guest/channel.c``): every
byte arrives, in order, in frames no larger than the maximum payload and within credit,
for several streams and both outputs at once, whatever the reader's pace and window."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from microagent.vm.protocol import FrameType
from tests.protocol.driver import AgentProcess, Session

SIZE = 3 * 1024 * 1024 + 4097  # not a multiple of a page or a frame


@pytest.fixture
def pattern(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "pattern"
    data = os.urandom(SIZE)
    path.write_bytes(data)
    return path, data


@pytest.mark.timeout(180)
@pytest.mark.parametrize("window,max_payload", [(262144, 65536), (8 << 20, 65536),
                                                (262144, 4096)])
def test_concurrent_streams_arrive_whole(agent: AgentProcess, pattern: tuple[Path, bytes],
                                         window: int, max_payload: int) -> None:
    path, data = pattern
    session = Session(agent.sock, window=window)
    session.hello(max_payload=max_payload)
    states = [
        session.exec(["cat", str(path)]),
        session.exec(["sh", "-c", f"dd if={path} bs=4097 >&2 2>/dev/null"]),
        session.exec(["sh", "-c", f"cat {path} & dd if={path} bs=100003 >&2 2>/dev/null; "
                      "wait"]),
    ]
    session.pump_until(lambda: all(s.done for s in states), 120, "all streams to end")
    digest = hashlib.sha256(data).hexdigest()
    for state, (out, err) in zip(states, [(True, False), (False, True), (True, True)],
                                 strict=True):
        assert state.exit == {"exit_code": 0, "signal": None, "timed_out": False}, state
        assert hashlib.sha256(state.stdout).hexdigest() == (digest if out else
                                                             hashlib.sha256(b"").hexdigest())
        assert hashlib.sha256(state.stderr).hexdigest() == (digest if err else
                                                             hashlib.sha256(b"").hexdigest())
        for frame in state.frames:
            assert len(frame.payload) <= max_payload


@pytest.mark.timeout(180)
def test_a_slow_reader_gets_everything_within_credit(agent: AgentProcess,
                                                     pattern: tuple[Path, bytes]) -> None:
    """Credit returned late and in odd amounts: the agent never sends beyond it, and the
    output still arrives whole."""
    path, data = pattern
    window = 100_000
    session = Session(agent.sock, auto_credit=False, window=window)
    session.hello()
    state = session.exec(["cat", str(path)])
    acknowledged = 0
    deadline = time.monotonic() + 120
    while not state.done:
        assert time.monotonic() < deadline, "timed out"
        session.read_frames(0.2)
        received = len(state.stdout)
        assert received - acknowledged <= window, "output beyond the credit"
        if received - acknowledged >= 30_000 or (received > acknowledged and
                                                 received == SIZE):
            time.sleep(0.005)
            session.credit(state, FrameType.STDOUT, received - acknowledged)
            acknowledged = received
    assert bytes(state.stdout) == data
