"""Data through the credit windows: stdin round trips, large output, a slow reader."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

from microagent.vm.agent import AgentClient, ExecRequest
from microagent.vm.protocol import DEFAULT_WINDOW, FrameType, encode
from tests.protocol.driver import AgentProcess, Session

PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"


def feed(data: bytes) -> int:
    """A pipe's read end fed with ``data`` by a thread (then EOF)."""
    read_fd, write_fd = os.pipe()

    def writer() -> None:
        with os.fdopen(write_fd, "wb") as f:
            f.write(data)

    threading.Thread(target=writer, daemon=True).start()
    return read_fd


def test_binary_stdin_round_trip(client: AgentClient) -> None:
    data = bytes(range(256)) * 4
    read_fd = feed(data)
    out = bytearray()
    result = client.exec(ExecRequest(argv=("cat",), env=(PATH,), stdin=True),
                         stdout=out.extend, stderr=out.extend, stdin_fd=read_fd)
    os.close(read_fd)
    assert result.exit_code == 0
    assert bytes(out) == data


def test_stdin_is_dev_null_without_stdin(client: AgentClient) -> None:
    out = bytearray()
    result = client.exec(ExecRequest(argv=("sh", "-c", "cat; readlink /proc/self/fd/0"),
                                     env=(PATH,)), stdout=out.extend, stderr=out.extend)
    assert result.exit_code == 0
    assert out == b"/dev/null\n"


@pytest.mark.timeout(120)
def test_large_stdin_within_credit(client: AgentClient) -> None:
    data = os.urandom(1 << 20) * 24  # 24 MiB
    read_fd = feed(data)
    out = bytearray()
    result = client.exec(ExecRequest(argv=("sha256sum",), env=(PATH,), stdin=True),
                         stdout=out.extend, stderr=out.extend, stdin_fd=read_fd)
    os.close(read_fd)
    assert result.exit_code == 0, out
    assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_stdin_beyond_credit_is_refused(session: Session) -> None:
    state = session.exec(["sleep", "30"], stdin=True)
    session.pump_until(lambda: state.started is not None, what="STARTED")
    # The process never reads: the agent can pass one pipe's worth (64 KiB) on and must
    # hold the rest of the window; anything beyond that exceeds the credit.
    for _ in range(8):
        session.send(encode(FrameType.STDIN, state.id, b"y" * 65536))
    session.wait(state)
    assert state.error is not None and state.error["code"] == "EPROTO"
    assert "credit" in state.error["message"]
    assert session.run(["true"]).exit is not None


def test_process_closing_stdin_early_does_not_stall(session: Session) -> None:
    # After the process closes its stdin, what the host sends is dropped, and its credit
    # still comes back: the host can finish sending three windows' worth.
    state = session.exec(["sh", "-c", "head -c 10; exec 0<&-; sleep 1; echo done"],
                         stdin=True)
    session.stdin(state, b"z" * (3 * DEFAULT_WINDOW), end=True)
    session.wait(state)
    assert state.exit is not None and state.exit["exit_code"] == 0
    assert bytes(state.stdout) == b"z" * 10 + b"done\n"


@pytest.mark.timeout(180)
def test_large_stdout_with_a_slow_reader_stays_bounded(agent: AgentProcess) -> None:
    """64 MiB through the window; the host withholds credit at times and the agent must
    neither send beyond the window nor buffer the output itself."""
    session = Session(agent.sock, auto_credit=False)
    session.hello()
    size = 64 << 20
    state = session.exec(["head", "-c", str(size), "/dev/zero"])
    base = 0  # bytes received and dropped from state.stdout to bound the test's memory
    credited = 0
    rss_samples = []
    pause_every = 8 << 20
    next_pause = pause_every
    deadline = time.monotonic() + 150
    while not state.done:
        assert time.monotonic() < deadline, f"stuck at {base + len(state.stdout)} bytes"
        session.read_frames(0.5)
        received = base + len(state.stdout)
        # Never more than the window beyond the credit the host gave.
        assert received <= credited + DEFAULT_WINDOW, (received, credited)
        if received >= next_pause:
            # A slow reader: no credit for a while; the agent must stop at the window.
            time.sleep(0.3)
            session.read_frames(0.2)
            assert base + len(state.stdout) <= credited + DEFAULT_WINDOW
            rss_samples.append(agent.rss_kib())
            next_pause += pause_every
            received = base + len(state.stdout)
        if received > credited:
            session.credit(state, FrameType.STDOUT, received - credited)
            credited = received
        if len(state.stdout) > (8 << 20):
            assert not state.stdout.strip(b"\0"), "not zeros"
            base += len(state.stdout)
            state.stdout.clear()
    assert state.exit is not None, state.error
    assert state.exit["exit_code"] == 0
    assert base + len(state.stdout) == size
    assert FrameType.STDOUT in state.ends
    assert len(rss_samples) >= 4, "never paused"
    assert max(rss_samples) < 16 * 1024, f"agent RSS grew: {rss_samples} KiB"
