"""The public API's run and scratch against real VMs: nothing is left behind, whether the
body returns, raises, or the process gets SIGTERM; and the error types a program meets."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from microagent import Microagent
from microagent.errors import (
    BusyError,
    ConflictError,
    StartError,
    WaitTimeoutError,
)
from tests.support.fixtures import PushedImage
from tests.vm.cli import qemu_pids

pytestmark = pytest.mark.slow


def leftovers(home: Path) -> list[str]:
    root = home / "workspaces"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_run_returns_the_result_and_removes_the_workspace(home: Path,
                                                          busybox_image: PushedImage) -> None:
    ma = Microagent(home)
    before = leftovers(home)
    r = ma.run(busybox_image.ref, ["sh", "-c", "echo hi; hostname >&2; exit 2"],
               profile="tiny")
    assert (r.exit_code, r.stdout) == (2, b"hi\n") and r.stderr.startswith(b"run-")
    assert leftovers(home) == before
    default = ma.run(busybox_image.ref, profile="tiny", stdin=b"echo from-cmd\n")
    assert default.stdout == b"from-cmd\n", "the image's Cmd (/bin/sh) read the stdin"
    assert leftovers(home) == before


def test_scratch_is_removed_when_the_body_raises(home: Path,
                                                 busybox_image: PushedImage) -> None:
    ma = Microagent(home)
    with pytest.raises(RuntimeError, match="boom"), \
            ma.scratch(busybox_image.ref, profile="tiny") as ws:
        assert ws.exec("echo inside").stdout == b"inside\n"
        name = ws.name
        raise RuntimeError("boom")
    assert name not in leftovers(home)
    assert qemu_pids(name) == []


SCRIPT = """
import sys, time
from microagent import Microagent
ma = Microagent(sys.argv[1])
{body}
"""


@pytest.mark.parametrize("form", ["scratch", "run"])
def test_sigterm_removes_the_scratch_workspace(home: Path, busybox_image: PushedImage,
                                               form: str) -> None:
    body = {
        "scratch": """
with ma.scratch(sys.argv[2], profile="tiny") as ws:
    print(ws.name, flush=True)
    time.sleep(600)
""",
        "run": """
ma.run(sys.argv[2], ["sh", "-c", "hostname; sleep 600"], profile="tiny",
       on_stdout=lambda b: print(b.decode().strip(), flush=True))
""",
    }[form]
    before = leftovers(home)
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SCRIPT.format(body=body)), str(home),
         busybox_image.ref], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        name = child.stdout.readline().strip()  # the workspace runs (and, for run, execs)
        assert name.startswith("run-"), child.stderr.read() if child.stderr else ""
        assert name in leftovers(home)
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode != 0
    assert leftovers(home) == before
    assert qemu_pids(name) == []


def test_the_errors_a_program_meets(home: Path, busybox_image: PushedImage) -> None:
    ma = Microagent(home)
    ws = ma.create("api-errors", busybox_image.ref, profile="tiny")
    try:
        with pytest.raises(WaitTimeoutError) as waited:
            ws.wait("running", timeout=0.3)
        assert waited.value.kind == "timed-out" and waited.value.exit_code == 75
        assert "prepared" in waited.value.message

        with pytest.raises(StartError) as start:
            ws.start(timeout=0.5)  # a TCG boot takes longer
        assert start.value.kind == "start-failed"
        assert "did not become ready within" in start.value.message
        assert ws.state == "failed"

        lock = home / "locks" / "workspace-api-errors.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with pytest.raises(BusyError) as busy:
                ma.delete("api-errors")
            assert busy.value.kind == "busy" and busy.value.exit_code == 75
            assert "api-errors" in busy.value.message
        finally:
            os.close(fd)

        ws.start()
        with pytest.raises(ConflictError) as running:
            ws.start()
        assert running.value.kind == "conflict" and "running" in running.value.message
        ws.halt()
        with pytest.raises(ConflictError) as halted:
            ws.exec("true")
        assert "halted" in halted.value.message
        with pytest.raises(ConflictError):
            ws.files.read("/etc/hostname")
    finally:
        if ws.state in ("running", "starting", "paused", "quarantined"):
            ws.kill()
        ws.delete()
    assert "api-errors" not in leftovers(home)
