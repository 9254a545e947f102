"""``microagent exec``'s stdout through the VM's output port (docs/protocol.md, "The
output port"): the supervisor lends the port's connection to one CLI at a time, the
agent lends the port itself to the process as its stdout. Content is checked, not just
counted: random data hashed in the guest, a CLI killed in the middle (its bytes must never reach the
next exec), and execs at once (one on the port, the others framed through the relay)."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.fixtures import MICROAGENT, PushedImage
from tests.vm.cli import ma, ok

pytestmark = pytest.mark.slow

SIZE_MIB = 24


@pytest.fixture(scope="module")
def running(home: Path, busybox_image: PushedImage) -> Iterator[str]:
    """A running workspace with SIZE_MIB of random bytes in /tmp/data and their SHA-256."""
    ok(ma(home, "create", "portws", "--image", busybox_image.ref, "--profile", "tiny"))
    ok(ma(home, "start", "portws"))
    ok(ma(home, "exec", "portws", "--", "sh", "-c",
          f"head -c {SIZE_MIB << 20} /dev/urandom > /tmp/data"))
    yield "portws"
    ma(home, "kill", "portws")


def guest_sha256(home: Path, name: str) -> str:
    return ok(ma(home, "exec", name, "--", "sha256sum", "/tmp/data")).stdout.split()[0]


def exec_bytes(home: Path, name: str, *command: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([MICROAGENT, "--state-dir", str(home), "exec", name, "--",
                           *command], capture_output=True, timeout=300)


def test_stdout_arrives_whole_through_the_port(home: Path, running: str) -> None:
    result = exec_bytes(home, running, "cat", "/tmp/data")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) == SIZE_MIB << 20
    assert hashlib.sha256(result.stdout).hexdigest() == guest_sha256(home, running)
    log = (home / "workspaces" / running / "serial.log").read_text(errors="replace")
    assert "output port /dev/vport" in log  # the agent opened the port: stdout went there


def test_a_killed_reader_leaves_nothing_for_the_next(home: Path, running: str) -> None:
    """The first CLI dies with bytes in flight in the port; the next exec's stdout is
    exactly its own (the port's connection is cut and the preamble marks the start)."""
    for _ in range(3):
        endless = subprocess.Popen([MICROAGENT, "--state-dir", str(home), "exec", running,
                                    "--", "cat", "/dev/zero"],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert endless.stdout is not None
        assert endless.stdout.read(1 << 20) == bytes(1 << 20)  # streaming: the port is busy
        endless.send_signal(signal.SIGKILL)
        endless.wait(timeout=30)
        endless.stdout.close()
        result = exec_bytes(home, running, "echo", "mine")
        assert (result.returncode, result.stdout) == (0, b"mine\n"), result.stderr
    # no cat left running in the guest: CANCEL ended it when the relay went away
    deadline = time.monotonic() + 10
    while b"cat /dev/zero" in exec_bytes(home, running, "ps").stdout:
        assert time.monotonic() < deadline, "the killed reader's cat still runs"
        time.sleep(0.2)


def test_execs_at_once_each_get_their_own(home: Path, running: str) -> None:
    digest = guest_sha256(home, running)

    def one(index: int) -> tuple[int, str, bytes]:
        result = exec_bytes(home, running, "sh", "-c",
                            f"cat /tmp/data; echo done-{index} >&2; exit {index}")
        return result.returncode, hashlib.sha256(result.stdout).hexdigest(), result.stderr

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    for index, (code, received, stderr) in enumerate(results):
        assert (code, received) == (index, digest), stderr
        assert stderr == f"done-{index}\n".encode()


def test_the_stdout_is_the_port_and_ends_when_all_let_go(home: Path, running: str) -> None:
    """The process writes to the port itself; like a pipe's EOF, the exec ends when the
    last process holding it (here one left in the background) has let go."""
    start = time.monotonic()
    result = exec_bytes(home, running, "sh", "-c",
                        "readlink /proc/$$/fd/1; (sleep 1; echo late) & echo now")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0].startswith("/dev/vport") and lines[1:] == ["now", "late"], lines
    assert time.monotonic() - start >= 1
    # the port is free again: the next exec has it too
    again = exec_bytes(home, running, "readlink", "/proc/self/fd/1")
    assert again.stdout.startswith(b"/dev/vport"), again


def test_a_timeout_keeps_the_output_before_it(home: Path, running: str) -> None:
    result = subprocess.run([MICROAGENT, "--state-dir", str(home), "exec", "--timeout", "1",
                             running, "--", "sh", "-c", "echo before; exec sleep 30"],
                            capture_output=True, timeout=60)
    assert result.returncode == 124, result.stderr
    assert result.stdout == b"before\n"
