"""The output port (docs/protocol.md): one exec's stdout as raw bytes on a second
connection, here a socketpair given to the agent with ``--out-fd``: the process writes to
it itself, between a preamble and an end marker."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from microagent.vm.agent import AgentClient, ExecRequest
from microagent.vm.protocol import FrameType, ProtocolError
from tests.protocol.driver import AgentProcess, Session, StreamState

PATH = ("PATH=/usr/sbin:/usr/bin:/sbin:/bin",)
NONCE = "0123456789abcdef" * 2


@pytest.fixture
def ported(agent_binary: Path) -> Iterator[AgentProcess]:
    process = AgentProcess(agent_binary, out_port=True)
    yield process
    returncode, stderr = process.close()
    assert returncode == 0, f"the agent exited with {returncode}:\n{stderr}"


def read_port(sock: socket.socket, size: int, timeout: float = 10) -> bytes:
    """Up to ``size`` bytes, what came within ``timeout`` (asking for one more than is
    expected shows that nothing follows)."""
    sock.settimeout(timeout)
    data = bytearray()
    while len(data) < size:
        try:
            chunk = sock.recv(size - len(data))
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


PREAMBLE = f"microagent-out {NONCE}\n".encode()
END = f"\0microagent-end {NONCE}\n".encode()


def run_on_port(ported: AgentProcess, argv: list[str],
                **options: Any) -> tuple[Session, StreamState, bytes]:
    """Run ``argv`` with its stdout on the port; the session, the stream's state and all
    the port carried (read until a second passes with nothing more)."""
    session = Session(ported.sock)
    session.hello()
    state = session.run(argv, stdout_port=NONCE, **options)
    assert ported.out is not None
    return session, state, read_port(ported.out, 1 << 16, timeout=1)


def test_stdout_goes_to_the_port_between_preamble_and_end(ported: AgentProcess) -> None:
    session, state, data = run_on_port(ported, ["sh", "-c",
                                                "printf 'out\\n'; printf 'err\\n' >&2"])
    assert "stdout_port" in session.peer["features"]
    assert state.started == {"pid": state.started["pid"], "stdout_port": True}
    assert state.exit is not None and state.exit["stdout_end"] is True
    assert state.stdout == b""  # no STDOUT frames: the bytes went to the port
    assert bytes(state.stderr) == b"err\n"
    assert data == PREAMBLE + b"out\n" + END


def test_the_process_writes_to_the_port_itself(ported: AgentProcess) -> None:
    """Its stdout is the port (here the socket), not a pipe the agent copies from."""
    _, state, data = run_on_port(ported, ["sh", "-c", "readlink /proc/$$/fd/1"])
    assert state.exit is not None and state.exit["exit_code"] == 0
    assert data.startswith(PREAMBLE + b"socket:[") and data.endswith(b"]\n" + END)


def test_no_output_is_the_preamble_and_the_end(ported: AgentProcess) -> None:
    _, state, data = run_on_port(ported, ["true"])
    assert state.exit is not None and state.exit["stdout_end"] is True
    assert data == PREAMBLE + END


def test_a_timeout_still_ends_the_port(ported: AgentProcess) -> None:
    _, state, data = run_on_port(ported, ["sh", "-c", "echo before; exec sleep 30"],
                                 timeout_ms=300)
    assert state.exit is not None and state.exit["timed_out"] is True
    assert state.exit["stdout_end"] is True
    assert data == PREAMBLE + b"before\n" + END


def test_one_exec_at_a_time_and_never_with_a_tty(ported: AgentProcess) -> None:
    session = Session(ported.sock)
    session.hello()
    first = session.exec(["sh", "-c", "sleep 0.5; echo first"], stdout_port=NONCE)
    second = session.run(["echo", "second"], stdout_port="f" * 32)
    assert second.started is not None and second.started["stdout_port"] is False
    assert bytes(second.stdout) == b"second\n"
    assert second.exit is not None and "stdout_end" not in second.exit
    session.wait(first)
    assert first.started is not None and first.started["stdout_port"] is True
    tty = session.run(["echo", "tty"], stdout_port=NONCE, tty={"rows": 24, "cols": 80})
    assert tty.started is not None and tty.started["stdout_port"] is False
    # the port is free again once the first exec ended
    third = session.run(["echo", "third"], stdout_port=NONCE)
    assert third.started is not None and third.started["stdout_port"] is True


def test_a_bad_nonce_is_refused(ported: AgentProcess) -> None:
    session = Session(ported.sock)
    session.hello()
    for nonce in ("short", "X" * 32, 42):
        state = session.run(["true"], stdout_port=nonce)
        assert state.error is not None and state.error["code"] == "EINVAL", nonce
        assert "stdout_port" in state.error["message"]


def test_cancel_frees_the_port(ported: AgentProcess) -> None:
    session = Session(ported.sock)
    session.hello()
    endless = session.exec(["cat", "/dev/zero"], stdout_port=NONCE)
    session.pump_until(lambda: endless.started is not None, what="STARTED")
    session.send_json(FrameType.CANCEL, endless.id, {})
    session.wait(endless)
    # nobody read the cancelled exec's bytes, which may fill the port (how many depends on
    # how fast the host ran): a reader drains it, as the next exec's client would (skipping
    # what came before its preamble); the next exec gets the port
    port = ported.out
    assert port is not None
    drained = bytearray()
    stop = threading.Event()

    def drain() -> None:
        port.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                drained.extend(port.recv(1 << 16))

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        state = session.run(["echo", "next"], stdout_port="a" * 32)
        deadline = time.monotonic() + 10
        while b"next\n" not in drained and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        reader.join()
    assert state.started is not None and state.started["stdout_port"] is True
    assert state.stdout == b"" and b"next\n" in drained  # through the port, not frames


def test_cancel_ends_the_exec_with_the_port_full(ported: AgentProcess) -> None:
    """Nobody reads the port: after CANCEL the agent does not wait for room for the end
    marker, EXIT comes at once and says there is none."""
    session = Session(ported.sock)
    session.hello()
    endless = session.exec(["cat", "/dev/zero"], stdout_port=NONCE)
    session.pump_until(lambda: endless.started is not None, what="STARTED")
    time.sleep(0.5)  # the socket between agent and host is full: cat is blocked
    session.send_json(FrameType.CANCEL, endless.id, {})
    session.wait(endless, timeout=5)
    assert endless.exit is not None and endless.exit["stdout_end"] is False


def test_the_client_skips_what_an_earlier_exec_left(ported: AgentProcess) -> None:
    """Bytes of an exec cut off earlier may still be in the port: AgentClient drops
    everything before its own preamble."""
    client = AgentClient(ported.sock)
    client.hello()
    leftover = client.exec(ExecRequest(argv=("sh", "-c", "head -c 20000 /dev/zero"),
                                       env=PATH, stdout_port="b" * 32),
                           stdout=lambda data: None, stderr=lambda data: None)
    assert leftover.exit_code == 0  # its 20000 bytes and preamble wait unread in the port
    out = bytearray()
    result = client.exec(ExecRequest(argv=("echo", "mine"), env=PATH),
                         stdout=out.extend, stderr=out.extend, stdout_port=ported.out)
    assert result.exit_code == 0
    assert bytes(out) == b"mine\n"


def test_large_output_arrives_whole(ported: AgentProcess, tmp_path: Path) -> None:
    data = os.urandom(8 << 20)
    source = tmp_path / "data"
    source.write_bytes(data)
    client = AgentClient(ported.sock)
    client.hello()
    digest = hashlib.sha256()
    errors = bytearray()
    start = time.monotonic()
    result = client.exec(ExecRequest(argv=("cat", str(source)), env=PATH),
                         stdout=digest.update, stderr=errors.extend, stdout_port=ported.out)
    assert result.exit_code == 0, (result, errors)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert time.monotonic() - start < 60


def test_a_short_port_is_an_error(ported: AgentProcess) -> None:
    """The port closing before the end marker is reported, not taken as all: here the
    client reads a connection that ends at once (the agent writes to its own)."""
    client = AgentClient(ported.sock)
    client.hello()
    reader, writer = socket.socketpair()
    writer.close()
    with pytest.raises(ProtocolError, match="closed before the end of stdout"):
        client.exec(ExecRequest(argv=("echo", "lost"), env=PATH),
                    stdout=lambda data: None, stderr=lambda data: None, stdout_port=reader)
    reader.close()
