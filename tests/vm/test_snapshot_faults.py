"""Memory images when things go wrong, on a real VM: bad input and refusals with their
exit codes, a read-write volume, no room for the RAM file, and the supervisor SIGKILLed
during a snapshot and during a restore (no snapshot half written, the workspace
startable cold)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent import Microagent, Workspace
from microagent.errors import ConflictError, HostError, MicroagentError
from microagent.layout import StateLayout
from microagent.state.runtime import runtime_state
from tests.support.fixtures import PushedImage
from tests.vm.cli import events, ma, ok, qemu_pids

pytestmark = pytest.mark.slow


@pytest.fixture
def ws(home: Path, busybox_image: PushedImage, request: pytest.FixtureRequest
       ) -> Iterator[Workspace]:
    name = request.node.name.replace("_", "-")[:40].strip("-")
    workspace = Microagent(home).create(name, busybox_image.ref, profile="tiny")
    yield workspace
    ma(home, "kill", name)
    ma(home, "delete", "--yes", name)


def supervisor_pid(home: Path, name: str, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = runtime_state(StateLayout(home), name).supervisor_pid
        if pid:
            return pid
        time.sleep(0.005)
    raise AssertionError("no supervisor pid")


def test_bad_input_and_refusals(home: Path, ws: Workspace) -> None:
    name = ws.name
    refused = ma(home, "snapshot", "create", name)
    assert refused.returncode == 1 and "not running" in refused.stderr
    assert ma(home, "suspend", name).returncode == 1
    ws.start()
    assert ma(home, "snapshot", "create", name, "--tag", "../x").returncode == 2
    assert ma(home, "snapshot", "create", name, "--tag", "-x").returncode == 2
    ok(ma(home, "snapshot", "create", name, "--tag", "one"))
    taken = ma(home, "snapshot", "create", name, "--tag", "one")
    assert taken.returncode == 1 and "already has a snapshot one" in taken.stderr
    assert ma(home, "snapshot", "delete", name, "nope").returncode == 1
    both = ma(home, "start", name, "--from-snapshot", "one", "--cold")
    assert both.returncode == 2
    image = ma(home, "create", "x", "--from-snapshot", f"{name}:one", "--image", "busybox")
    assert image.returncode == 2 and "only hostname and publish" in image.stderr
    assert ma(home, "create", "x", "--from-snapshot", f"{name}").returncode == 2
    missing = ma(home, "create", "x", "--from-snapshot", f"{name}:two")
    assert missing.returncode != 0 and "no snapshot two" in missing.stderr
    assert not (home / "workspaces" / "x").exists()
    taken_name = ma(home, "create", name, "--from-snapshot", f"{name}:one")
    assert taken_name.returncode == 1 and "already exists" in taken_name.stderr
    # a default tag names the moment
    default = ok(ma(home, "snapshot", "create", name)).stdout.strip()
    assert default.startswith("snap-") and len(default) == len("snap-YYYYMMDD-HHMMSS")


def test_a_read_write_volume_is_refused(home: Path, busybox_image: PushedImage) -> None:
    ws = Microagent(home).create("vol-rw", busybox_image.ref, profile="tiny",
                                 volumes=["snapdata:/data"])
    try:
        ws.start()
        with pytest.raises(ConflictError, match="read-write volume snapdata"):
            ws.snapshot("t")
        with pytest.raises(ConflictError, match="read-write volume snapdata"):
            ws.suspend()
        assert ws.state == "running" and ws.snapshots() == []
        ws.exec("true", check=True)
    finally:
        ma(home, "kill", "vol-rw")
        ma(home, "delete", "--yes", "vol-rw")
        ma(home, "volume", "delete", "snapdata")


def test_no_room_for_the_ram_file_refuses_before_pausing(home: Path, ws: Workspace,
                                                         tmp_path: Path) -> None:
    environment = {**os.environ, "MICROAGENT_SHM_DIR": str(tmp_path / "missing" / "shm")}
    ok(ma(home, "start", ws.name, env=environment))
    assert ws.status().state == "running"
    refused = ma(home, "snapshot", "create", ws.name, env=environment)
    assert refused.returncode == 1 and "no room for its" in refused.stderr
    assert ws.snapshots() == [] and ws.state == "running"
    assert not [e for e in events(home, ws.name) if e["state"] == "paused"]
    ws.exec("true", check=True)


def test_supervisor_killed_during_a_snapshot(home: Path, ws: Workspace) -> None:
    ws.start()
    ws.exec("echo kept > /root/kept && sync", check=True)  # a kill loses the unsynced
    snapshots = home / "workspaces" / ws.name / "snapshots"
    pid = supervisor_pid(home, ws.name)
    failure: list[BaseException] = []

    def take() -> None:
        try:
            ws.snapshot("killed")
        except BaseException as e:
            failure.append(e)

    thread = threading.Thread(target=take)
    thread.start()
    deadline = time.monotonic() + 60
    while not (snapshots.is_dir() and any(p.name.startswith(".new-")
                                          for p in snapshots.iterdir())):
        assert time.monotonic() < deadline and thread.is_alive(), "no staging seen"
        time.sleep(0.0005)
    os.kill(pid, signal.SIGKILL)
    thread.join(60)
    assert failure and isinstance(failure[0], MicroagentError)
    assert ws.snapshots() == [], "no snapshot half written"
    assert qemu_pids(ws.name), "QEMU outlives its supervisor"
    # the next command re-attaches a supervisor, which runs the vCPUs the snapshot stopped
    assert ws.files.read_text("/root/kept") == "kept\n"
    assert events(home, ws.name)[-1]["detail"].startswith("re-attached to its VM")
    assert ws.state == "running"
    ws.snapshot("after")
    assert [s.tag for s in ws.snapshots()] == ["after"]
    assert not [p for p in snapshots.iterdir() if p.name.startswith(".new-")], "swept"


def test_supervisor_killed_during_a_restore(home: Path, ws: Workspace) -> None:
    ws.start()
    ws.exec("echo one > /root/mark && sync", check=True)
    ws.snapshot("t")
    ws.halt()
    before = len(events(home, ws.name))
    thread = threading.Thread(target=lambda: ma(home, "start", ws.name, "--from-snapshot",
                                                "t"))
    thread.start()
    os.kill(supervisor_pid(home, ws.name), signal.SIGKILL)
    thread.join(120)
    assert len(events(home, ws.name)) > before
    if ws.state == "running":  # the restore was done: its VM runs on, re-attachable
        ws.kill()
    assert ws.state in ("failed", "stopped", "halted")
    ws.start()  # cold: whatever the kill interrupted (a half-loaded VM is ended first)
    assert events(home, ws.name)[-1]["detail"].startswith("ready in")
    assert ws.files.read_text("/root/mark") == "one\n"
    with pytest.raises((ConflictError, HostError)):
        ws.start(from_snapshot="t")  # running: refused


def test_a_load_that_fails_leaves_the_old_disk(home: Path, ws: Workspace) -> None:
    ws.start()
    ws.exec("echo snapshot > /root/mark && sync", check=True)
    ws.snapshot("t")
    ws.exec("echo later > /root/mark && sync", check=True)
    ws.halt()
    vmstate = home / "workspaces" / ws.name / "snapshots" / "t" / "vmstate"
    vmstate.write_bytes(vmstate.read_bytes()[:4096])  # a torn device state: QEMU exits
    rootfs = home / "workspaces" / ws.name / "rootfs.ext4"
    before = os.stat(rootfs)
    failed = ma(home, "start", ws.name, "--from-snapshot", "t")
    assert failed.returncode == 1
    assert "a cold start still works" in failed.stderr, failed.stderr
    assert os.stat(rootfs).st_ino == before.st_ino, "the workspace's own disk is back"
    assert not [p for p in rootfs.parent.iterdir() if p.name.startswith(".rootfs")]
    ws.start()
    assert ws.files.read_text("/root/mark") == "later\n"


def test_one_image_at_a_time_and_halt_waits_for_it(home: Path, ws: Workspace) -> None:
    ws.start()
    outcomes: list[object] = []

    def take(tag: str) -> None:
        try:
            outcomes.append(ws.snapshot(tag))
        except ConflictError as e:
            outcomes.append(e)

    threads = [threading.Thread(target=take, args=(f"t{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    taken = [o for o in outcomes if not isinstance(o, ConflictError)]
    refused = [o for o in outcomes if isinstance(o, ConflictError)]
    assert taken and len(taken) + len(refused) == 3
    assert all("being taken" in e.message for e in refused)
    assert len(ws.snapshots()) == len(taken)
    ws.exec("true", check=True)
    halting = threading.Thread(target=ws.halt)
    snapping = threading.Thread(target=take, args=("last",))
    snapping.start()
    time.sleep(0.01)
    halting.start()
    snapping.join(120)
    halting.join(120)
    assert ws.state == "halted"
    ws.start(from_snapshot=taken[0].tag)  # type: ignore[union-attr]
    ws.exec("true", check=True)


def test_restoring_a_suspended_workspace_spends_its_memory(home: Path, ws: Workspace
                                                           ) -> None:
    ws.start()
    ws.exec("echo at-snapshot > /root/mark && sync", check=True)
    ws.snapshot("t")
    ws.exec("echo at-suspend > /root/mark", check=True)
    ws.suspend()
    fork = Microagent(home).fork("unstarted-fork", f"{ws.name}:t")
    try:
        refused = ma(home, "cp", "unstarted-fork:/root/mark", str(home / "m"))
        assert refused.returncode == 1 and "saved memory" in refused.stderr
    finally:
        fork.delete()
    started = ok(ma(home, "start", ws.name, "--from-snapshot", "t"))
    assert "discarding" in started.stderr
    assert ws.files.read_text("/root/mark") == "at-snapshot\n"
    assert not (home / "workspaces" / ws.name / "resume").exists()
    ws.halt()
    ws.start()
    assert events(home, ws.name)[-1]["detail"].startswith("ready in"), "a cold boot"
