"""Background processes on a real VM (busybox): one started by a Python process that
then exits runs on and is found by a new client; its output is read from offsets with
nothing lost or duplicated, its stdin written in pieces, a signal delivered and recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent import Microagent, Workspace
from microagent.errors import (
    AgentFileError,
    CommandNotExecutableError,
    CommandNotFoundError,
    ConflictError,
    NotFoundError,
    WaitTimeoutError,
)
from tests.support.fixtures import MICROAGENT, PushedImage
from tests.vm.cli import events, ma, ok

pytestmark = pytest.mark.slow

SPAWNER = """
import sys
from microagent import Microagent
ws = Microagent(sys.argv[1]).get(sys.argv[2])
p = ws.spawn("i=0; while [ $i -lt 3000 ]; do echo line$i; i=$((i+1)); done; read x; "
             "echo got $x; read y; echo then $y; sleep 600")
print(p.id)
"""


@pytest.fixture
def running(home: Path, busybox_image: PushedImage) -> Iterator[Workspace]:
    ws = Microagent(home).create("procs", busybox_image.ref, profile="tiny")
    ws.start()
    yield ws
    if ws.state not in ("halted", "stopped", "failed", "prepared"):
        ws.kill()
    ws.delete()


def test_process_outlives_its_starter(home: Path, running: Workspace) -> None:
    env = {**os.environ, "MICROAGENT_HOME": str(home)}
    started = subprocess.run([sys.executable, "-c", SPAWNER, str(home), running.name],
                             capture_output=True, text=True, timeout=120, env=env)
    assert started.returncode == 0, started.stderr
    process_id = int(started.stdout)

    ws = Microagent(home).get(running.name)  # a new client, after the starter exited
    assert [p.id for p in ws.processes()] == [process_id]
    process = ws.process(process_id)
    assert process.poll() is None
    info = process.info()
    assert info.running and info.directory == f"/run/microagent/proc/{process_id}"

    # read from offsets in small pieces: nothing lost, nothing twice
    data, offset = bytearray(), 0
    expected = b"".join(b"line%d\n" % i for i in range(3000))
    deadline = time.monotonic() + 60
    while len(data) < len(expected):
        assert time.monotonic() < deadline, f"only {len(data)} bytes"
        chunk = process.read(offset, wait_s=5)
        assert chunk.offset == offset and chunk.skipped == 0
        data += chunk.data[:5000]
        offset += len(chunk.data[:5000])
    assert bytes(data) == expected

    # stdin in pieces, through two more handles
    assert ws.process(process_id).write("par") == 3
    assert ws.process(process_id).write(b"tial\nsecond\n") == 12
    chunk = process.read(offset, wait_s=20)
    text = chunk.data
    while b"then second\n" not in text:
        chunk = process.read(chunk.next, wait_s=20)
        assert chunk.data, "no more output"
        text += chunk.data
    assert text == b"got partial\nthen second\n"

    # the guest keeps the output where it said
    assert ws.files.read(f"{info.directory}/stdout").startswith(b"line0\nline1\n")

    process.signal("TERM")
    result = process.wait(timeout=30)
    assert (result.exit_code, result.signal) == (None, 15)
    assert result.stdout.startswith(b"line0\n") and result.stdout.endswith(b"then second\n")
    assert process.poll() == -15
    with pytest.raises(ConflictError):
        process.kill()
    with pytest.raises(NotFoundError):
        ws.process(process_id + 100)


def test_stdin_closed_and_exit_code(running: Workspace) -> None:
    process = running.spawn(["sh", "-c", "cat; echo done >&2; exit 4"])
    process.write(b"a\n")
    brief = running.spawn(["sleep", "4"])
    with pytest.raises(WaitTimeoutError):  # the wait ends at its timeout, long before
        brief.wait(timeout=0.5, output=False)  # the process does
    assert brief.poll() is None
    process.write(b"b\n")
    process.close_stdin()
    result = process.wait(timeout=30)
    assert (result.exit_code, result.stdout, result.stderr) == (4, b"a\nb\n", b"done\n")
    assert process.poll() == 4
    with pytest.raises(ConflictError):
        process.write(b"more")


def test_commands_that_cannot_start(running: Workspace) -> None:
    with pytest.raises(CommandNotFoundError, match="no-such-command: command not found"):
        running.spawn(["no-such-command"])
    running.files.write("/root/not-executable", b"#!/bin/sh\n", mode=0o644)
    with pytest.raises(CommandNotExecutableError):
        running.spawn(["/root/not-executable"])
    with pytest.raises(AgentFileError) as missing_dir:  # not a command's fault
        running.spawn(["true"], cwd="/no/such/dir")
    assert not isinstance(missing_dir.value, CommandNotExecutableError)


def test_cli_detach_top_attach_signal(home: Path, running: Workspace) -> None:
    name = running.name
    started = ok(ma(home, "exec", "-d", name, "--", "sh", "-c",
                    "echo one; sleep 1; echo two >&2; exit 3"))
    first = int(started.stdout)
    attached = ma(home, "exec", "--attach", str(first), name)
    assert attached.returncode == 3, attached.stderr
    assert attached.stdout == "one\n" and attached.stderr == "two\n"
    assert ma(home, "exec", "--attach", str(first), "--since", "2", name).stdout == "e\n"

    missing = ma(home, "exec", "-d", name, "--", "no-such-command")  # as exec: 127
    assert missing.returncode == 127 and "command not found" in missing.stderr, missing
    unknown = ma(home, "exec", "--attach", "999", name)
    assert unknown.returncode == 125, unknown
    assert f"workspace {name} has no background process 999" in unknown.stderr
    assert f"hint: microagent top {name}" in unknown.stderr
    second = int(ok(ma(home, "exec", "-d", name, "--", "sleep", "600")).stdout)
    listing = ok(ma(home, "top", name)).stdout.splitlines()
    assert listing[0].split() == ["ID", "PID", "STATE", "EXIT", "STARTED", "COMMAND"]
    assert listing[1].split()[:4] == [str(first), listing[1].split()[1], "exited", "3"]
    assert listing[2].split()[2:4] == ["running", "-"] and listing[2].endswith("sleep 600")
    ok(ma(home, "exec", "--signal", "KILL", str(second), name))
    assert ma(home, "exec", "--attach", str(second), name).returncode == 137
    doc = json.loads(ok(ma(home, "--json", "top", name)).stdout)
    assert [(p["id"], p["state"], p["signal"]) for p in doc["processes"]] == \
        [(first, "exited", None), (second, "signaled", 9)]


def test_a_background_process_carries_on_after_restore_and_in_a_fork(
        home: Path, running: Workspace) -> None:
    """The agent's process table is in the guest's memory: a restore and a fork bring it
    back with the process, which goes on counting into the same output."""
    process = running.spawn("i=0; while true; do echo $i; i=$((i+1)); sleep 0.1; done")
    time.sleep(1)
    running.snapshot("counting")
    running.halt()
    running.start(from_snapshot="counting")
    again = running.process(process.id)
    assert again.poll() is None, "still running after the restore"
    first = again.read().data
    time.sleep(1)
    later = again.read().data
    assert len(later) > len(first) and later.startswith(first)
    fork = Microagent(home).fork("procs-fork", "procs:counting")
    try:
        fork.start()
        forked = fork.process(process.id)
        assert forked.poll() is None
        lines = forked.read().data.split()
        time.sleep(1)
        assert len(forked.read().data.split()) > len(lines), "it counts on in the fork"
    finally:
        fork.kill()
        fork.delete()


def _counted(data: bytes) -> list[int]:
    return [int(line[1:]) for line in data.decode().split()]


def _until_gone(pid: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.05)


def test_process_survives_its_supervisor_killed(home: Path, busybox_image: PushedImage) -> None:
    """SIGKILL to the supervisor: the VM and the background process run on (counting with
    no supervisor at all), passt dies with it; the next command (the CLI's `top`)
    re-attaches a supervisor: output read from 0 with nothing lost or duplicated, a
    published port served again through a new passt, exec works; halt is clean and
    leaves no RAM file."""
    from tests.vm.test_publish import GUEST_PORT, PAGE, fetch, free_port, serve_page

    port = free_port()
    ok(ma(home, "create", "phoenix", "--image", busybox_image.ref, "--profile", "tiny",
          "--publish", f"{port}:{GUEST_PORT}"))
    ok(ma(home, "start", "phoenix"))
    serve_page(home, "phoenix")
    assert fetch("127.0.0.1", port, "/index.html") == (200, PAGE)
    ws = Microagent(home).get("phoenix")
    process = ws.spawn("i=0; while true; do echo n$i; i=$((i+1)); sleep 0.1; done")
    assert process.read(0, wait_s=10).data.startswith(b"n0\n")
    run = home / "workspaces" / "phoenix" / "run"
    before = json.loads((run / "status.json").read_text())
    vm, passt = before["vmm_pid"], before["network_helper"]["pid"]
    memory = Path(before["memory_file"])

    late = ws.spawn("sleep 4; echo late")
    waiting: list[bytes] = []  # a read waiting in the guest when the supervisor dies
    reader = threading.Thread(target=lambda: waiting.append(late.read(0, wait_s=60).data))
    reader.start()
    time.sleep(1)
    os.kill(before["supervisor_pid"], signal.SIGKILL)
    _until_gone(before["supervisor_pid"])
    _until_gone(passt)  # passt dies with its supervisor; QEMU does not
    assert Path(f"/proc/{vm}").exists(), "the VM died with its supervisor"

    # the waiting read and two commands at once: one of them re-attaches a supervisor,
    # the others wait for it (status, without a supervisor: test_lifecycle.py)
    env = {**os.environ, "MICROAGENT_HOME": str(home)}
    tops = [subprocess.Popen([MICROAGENT, "top", "phoenix"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    for top in tops:
        out, err = top.communicate(timeout=120)
        assert top.returncode == 0, err
        assert f"{process.id} " in out and "running" in out
    assert len([e for e in events(home, "phoenix") if "re-attached" in e["detail"]]) == 1
    reader.join(60)
    assert waiting == [b"late\n"], "the waiting read was not asked again"
    after = json.loads((run / "status.json").read_text())
    assert after["vmm_pid"] == vm and after["supervisor_pid"] != before["supervisor_pid"]
    assert after["network_helper"]["pid"] != passt
    reattached = [e for e in events(home, "phoenix") if e["state"] == "running"][-1]
    assert "re-attached to its VM" in reattached["detail"], reattached

    data = bytearray()
    while len(_counted(bytes(data))) < 40:
        chunk = ws.process(process.id).read(len(data), wait_s=5)
        assert chunk.offset == len(data) and chunk.skipped == 0
        data += chunk.data
    counted = _counted(bytes(data[:data.rindex(b"\n") + 1]))
    assert counted == list(range(len(counted))), "lost or duplicated output"
    assert fetch("127.0.0.1", port, "/index.html") == (200, PAGE)  # a new passt, same port
    assert ws.exec("echo still here").stdout == b"still here\n"
    assert memory.exists()

    ok(ma(home, "halt", "phoenix"))
    assert events(home, "phoenix")[-1]["state"] == "halted"
    _until_gone(vm)
    assert not memory.exists(), "the re-attached VM's RAM file was left"
    ok(ma(home, "delete", "--yes", "phoenix"))
