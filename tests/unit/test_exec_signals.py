"""exec's host-side bounds without a VM: a forwarded signal the guest does not act on,
a second signal, and how the CLI turns them (and a paused workspace) into exit codes."""

from __future__ import annotations

import signal
import socket
import subprocess

import pytest

from microagent.cli import main
from microagent.errors import Terminated
from microagent.events import append_event
from microagent.layout import StateLayout
from microagent.vm.agent import AgentClient
from microagent.vm.protocol import FrameDecoder, FrameType
from microagent.workspace.execution import _SignalWatch
from tests.support.fixtures import MICROAGENT
from tests.support.workspaces import LockHolder, make_workspace


@pytest.fixture
def watch() -> _SignalWatch:
    ours, _theirs = socket.socketpair()
    client = AgentClient(ours)
    client.current_stream = 3
    return _SignalWatch(client, tty=False)


def test_a_forwarded_signal_goes_to_the_guest_then_the_host_gives_up(
        watch: _SignalWatch) -> None:
    watch._forward(signal.SIGTERM, None)
    frames = watch.poll()  # forwarded first: the command may act on it
    (frame,) = FrameDecoder().feed(b"".join(frames))
    assert (frame.type, frame.stream, frame.json()) == (FrameType.SIGNAL, 3, {"signal": 15})
    assert watch.poll() == []  # within the grace: the exec goes on
    watch.give_up_at = 0.0  # the grace has passed without the command's end
    with pytest.raises(Terminated) as info:
        watch.poll()
    assert info.value.signum == signal.SIGTERM and "did not end within" in info.value.message


def test_a_second_signal_ends_the_exec_at_once(watch: _SignalWatch) -> None:
    watch._forward(signal.SIGINT, None)
    watch._forward(signal.SIGINT, None)
    with pytest.raises(Terminated) as info:
        watch.poll()
    assert info.value.signum == signal.SIGINT


def test_with_a_tty_sigterm_ends_the_exec_at_once(watch: _SignalWatch) -> None:
    watch.tty = True
    watch._end(signal.SIGTERM, None)
    with pytest.raises(Terminated):
        watch.poll()


@pytest.mark.parametrize("command", [["exec", "w", "--", "true"],
                                     ["cp", "w:/etc/hostname", "/nonexistent/x"],
                                     ["connect", "w", "--send", "true"]])
def test_sigterm_ends_a_command_waiting_on_a_silent_supervisor(
        layout: StateLayout, command: list[str]) -> None:
    """A supervisor that accepts and never answers (frozen): SIGTERM ends the command with
    143 and a word, not a silent death or a wait for the control timeout."""
    make_workspace(layout, "w")
    files = layout.run_files("w")
    supervisor = LockHolder(files.lock)
    append_event(layout.workspace_events("w"), "running", "ready")
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(files.dir / files.control_socket))
    silent.listen()
    try:
        process = subprocess.Popen([MICROAGENT, "--state-dir", str(layout.root), *command],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        silent.settimeout(20)
        connection, _ = silent.accept()  # the command is waiting for its answer now
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=20)
        connection.close()
        assert process.returncode == 143, err
        assert "terminated" in err
    finally:
        silent.close()
        supervisor.release()


def test_exec_on_a_paused_workspace_is_a_conflict_with_exit_1(
        layout: StateLayout, capsys: pytest.CaptureFixture[str]) -> None:
    make_workspace(layout, "w")
    supervisor = LockHolder(layout.run_files("w").lock)  # a live supervisor, as far as
    try:                                                 # the derived state can tell
        append_event(layout.workspace_events("w"), "paused", "host disk full in /d")
        code = main(["--state-dir", str(layout.root), "--json", "exec", "w", "--", "true"])
        assert code == 1
        error = capsys.readouterr().out
        assert '"kind": "conflict"' in error
        assert "workspace w is paused: host disk full in /d; resume it first" in error
        code = main(["--state-dir", str(layout.root), "start", "w"])
        assert code == 1 and "microagent resume w" in capsys.readouterr().err
    finally:
        supervisor.release()
