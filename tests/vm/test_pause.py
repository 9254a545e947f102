"""``pause`` and ``resume`` on a real VM: the vCPUs stop and the VM stays; exec, cp and
console input are refused with a conflict (exit 1) and status and logs still work; halt,
stop and kill work from paused; and what ran in the guest carries on after resume."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent import Microagent, Workspace
from microagent.errors import ConflictError, PausedError
from tests.support.fixtures import PushedImage
from tests.vm.cli import events, ma, ok, qemu_pids

pytestmark = pytest.mark.slow


@pytest.fixture
def running(home: Path, busybox_image: PushedImage, request: pytest.FixtureRequest
            ) -> Iterator[Workspace]:
    name = request.node.name.replace("_", "-")[:40].strip("-")
    ws = Microagent(home).create(name, busybox_image.ref, profile="tiny")
    ws.start()
    yield ws
    if ws.state not in ("halted", "stopped", "failed", "prepared"):
        ws.kill()
    ws.delete()


def test_pause_refuses_guest_access_and_resume_carries_on(home: Path, running: Workspace
                                                          ) -> None:
    name = running.name
    running.exec("(i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.2; done) "
                 "</dev/null >/dev/null 2>&1 &", check=True)
    time.sleep(1)
    ok(ma(home, "pause", name))
    status = json.loads(ok(ma(home, "--json", "status", name)).stdout)
    assert status["state"] == "paused" and "microagent pause" in status["detail"]
    assert status["execReady"]["ok"] is False
    assert qemu_pids(name), "the VM process stays"
    assert events(home, name)[-1]["state"] == "paused"

    refused = ma(home, "exec", name, "--", "true")
    assert refused.returncode == 1 and f"{name} is paused" in refused.stderr
    assert "resume it first" in refused.stderr
    assert ma(home, "cp", f"{name}:/etc/hostname", str(home / "h")).returncode == 1
    send = ma(home, "connect", name, "--send", "true")
    assert send.returncode == 1 and "paused" in send.stderr
    with pytest.raises(PausedError) as info:
        running.exec("true")
    assert info.value.kind == "conflict"
    with pytest.raises(ConflictError, match="already paused"):
        running.pause()
    assert ok(ma(home, "logs", name, "--tail", "5")).returncode == 0

    with pytest.raises(PausedError):
        running.files.read("/tmp/count")
    ok(ma(home, "resume", name))
    assert running.status().state == "running"
    first = int(running.exec("cat /tmp/count", check=True).stdout)
    time.sleep(1)
    assert int(running.exec("cat /tmp/count", check=True).stdout) > first, \
        "the background loop runs on after resume"
    assert ma(home, "resume", name).returncode == 1  # not paused


@pytest.mark.parametrize("verb", ["halt", "stop", "kill"])
def test_halt_stop_and_kill_work_from_paused(home: Path, running: Workspace,
                                             verb: str) -> None:
    running.exec("echo kept > /root/kept && sync", check=True)
    assert running.pause() == "paused"
    ok(ma(home, verb, running.name))
    assert running.state in ("halted", "stopped")
    assert qemu_pids(running.name) == []
    if verb == "halt":
        assert events(home, running.name)[-1]["state"] == "halted"
    running.start()
    assert running.files.read("/root/kept") == b"kept\n"
    running.halt()


def test_pause_is_refused_unless_running(home: Path, busybox_image: PushedImage) -> None:
    ws = Microagent(home).create("pause-prepared", busybox_image.ref, profile="tiny")
    try:
        result = ma(home, "pause", ws.name)
        assert result.returncode == 1 and "not running (state prepared)" in result.stderr
        with pytest.raises(ConflictError):
            ws.resume()
    finally:
        ws.delete()


def test_the_guest_clock_follows_the_host_after_a_pause(running: Workspace) -> None:
    """A stopped guest's clock stops too; resume steps it to the host's and bumps the
    generation counter (the agent's resumed operation)."""
    running.pause()
    time.sleep(10)
    running.resume()
    before = time.time()
    guest = int(running.exec("date +%s", check=True).stdout)  # busybox: whole seconds
    after = time.time()
    # within a second of the host (the whole second it printed lies in [before-1, after];
    # without the step it would be 10 s behind)
    assert before - 2 < guest <= after, f"guest clock {guest}, host {before}..{after}"
    assert running.files.read("/run/microagent/generation") == b"1\n"
    running.pause()
    running.resume()
    assert running.files.read("/run/microagent/generation") == b"2\n"
