"""ConsoleBroker against real interactive shells on a host pty, no VM.

Each shell (bash with readline, dash, busybox ash with its line editor) runs as a session
leader on a pseudo-terminal whose master is bridged to a Unix socket, which is what
QEMU's serial chardev socket is to the supervisor. The VM side is tests/vm/test_console.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pty
import shutil
import signal
import socket
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent.vm.console import ConsoleBroker, ConsoleCapture, Holder, SendResult, _body

SHELLS = {"bash": ["bash", "--norc", "--noprofile", "-i"], "dash": ["dash", "-i"],
          "busybox": ["busybox", "sh", "-i"]}


class PtyShell:
    """An interactive shell on a pty, its master served on a Unix socket."""

    def __init__(self, argv: list[str], socket_path: Path) -> None:
        self.master, slave = pty.openpty()
        env = {"PATH": os.environ["PATH"], "TERM": "linux", "HOME": "/tmp", "PS1": "$ "}
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     start_new_session=True,
                                     preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(slave)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(socket_path))
        self.server.listen(1)
        self.thread = threading.Thread(target=self._bridge, daemon=True)
        self.thread.start()

    def _bridge(self) -> None:
        conn, _ = self.server.accept()

        def upstream() -> None:
            with contextlib.suppress(OSError):
                while data := conn.recv(4096):
                    os.write(self.master, data)

        threading.Thread(target=upstream, daemon=True).start()
        with contextlib.suppress(OSError):
            while data := os.read(self.master, 65536):
                conn.sendall(data)
        conn.close()

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        os.close(self.master)
        self.server.close()


@pytest.fixture(params=sorted(SHELLS))
def shell(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    argv = SHELLS[request.param]
    if shutil.which(argv[0]) is None:
        pytest.fail(f"{argv[0]} is needed (install.sh installs it)")
    path = tmp_path / "console.sock"
    running = PtyShell(argv, path)
    yield path
    running.close()


async def session(path: Path, lines: list[str], timeout: float = 10
                  ) -> tuple[list[SendResult], bytes]:
    """Send ``lines`` one by one through a broker; the results and the whole capture."""
    capture = ConsoleCapture(path.parent / "serial.log")
    task = asyncio.create_task(capture.capture(str(path), time.monotonic() + 10,
                                               lambda line: None))
    broker = ConsoleBroker()
    broker.capture = capture
    while capture.writer is None:
        await asyncio.sleep(0.01)
    try:
        results = [await broker.send_line(line, timeout, Holder("send", 1, "now"))
                   for line in lines]
        probe = await broker.probe(5)
        assert probe is not None and probe[0], probe
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return results, (path.parent / "serial.log").read_bytes()


def test_only_the_output_comes_back(shell: Path) -> None:
    long_line = "echo " + "y" * 6000 + " | wc -c"
    results, _ = asyncio.run(session(shell, [
        "echo one", "printf 'no newline'", "true", "printf 'a\\n\\nb\\n'; false",
        "cd / && pwd", "pwd", long_line, "echo 'it'\\''s'",
    ]))
    outputs = [(r.output, r.exit_code) for r in results]
    assert outputs == [
        (b"one\n", 0), (b"no newline", 0), (b"", 0), (b"a\n\nb\n", 1),
        (b"/\n", 0), (b"/\n", 0), (b"6001\n", 0), (b"it's\n", 0),
    ]


def test_incomplete_line_and_timeout_leave_a_working_shell(shell: Path) -> None:
    results, capture = asyncio.run(session(shell, ["if true", "echo a; sleep 30",
                                                   "echo $((40+2))"], timeout=3))
    # an incomplete line is a syntax error of eval, not a shell waiting for more
    assert results[0].exit_code == 2 and b"syntax error" in results[0].output.lower(), \
        (results[0], capture[-2000:])
    assert results[1].timed_out and results[1].output.startswith(b"a"), \
        (results[1], capture[-2000:])
    assert (results[2].output, results[2].exit_code) == (b"42\n", 0)
    # after the last line the shell's own prompt is back
    assert b"$ " in capture.rsplit(b"MA-e-", 1)[1]


def test_long_lines_are_assembled_in_chunks_under_the_tty_limit() -> None:
    line = "echo '" + "z" * 3000 + "' \"$HOME\" `echo x` \\"
    assert _body("echo hi") == (b" __ma_l='echo hi'\n", b' eval "$__ma_l"\n')
    prelude, typed = _body(line)
    assert typed == b' eval "$__ma_l"\n'
    assert all(len(part) < 4095 for part in prelude.splitlines())
    assembled = subprocess.run(["sh", "-c", prelude.decode() + ' printf %s "$__ma_l"'],
                               capture_output=True, text=True, check=True).stdout
    assert assembled.endswith(line)
