"""Snapshots, restore, forks and suspend on a real distribution (Debian bookworm minbase)
under the real agent: what was written before a snapshot is there after a restore and
what came after is not, a background process keeps counting after a restore and in a
fork, the guest clock follows the host's, three forks have their own identity, RNG and
disks, suspend/start resumes, and an image the host cannot load is refused before
anything is touched.

The tests of this module run in order on one source workspace (each boot of Debian under
TCG costs seconds): the forks are made while the source runs, then the source is
restored in place, suspended and resumed."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent import Microagent, Workspace
from microagent.errors import ConflictError, NotFoundError
from tests.support.fixtures import PushedImage
from tests.vm.cli import events, ma, ok, qemu_pids

pytestmark = pytest.mark.slow

COUNTER = ("i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.2; done "
           "</dev/null >/dev/null 2>&1 &")
SOURCE_MACHINE_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def source(home: Path, debian_image: PushedImage) -> Iterator[Workspace]:
    """``src``, running, with a counter in the background, snapshot ``t1`` taken, then
    ``/root/after`` written."""
    ma_ = Microagent(home)
    ws = ma_.create("src", debian_image.ref, profile="tiny")
    ws.start()
    ws.exec("echo before > /root/before && printf '127.0.0.1 localhost\\n127.0.1.1 src\\n' "
            f"> /etc/hosts && echo src > /etc/hostname && echo {SOURCE_MACHINE_ID} > "
            "/etc/machine-id", check=True)
    ws.exec(COUNTER, check=True)
    time.sleep(0.5)
    snapshot = ws.snapshot("t1")
    assert snapshot.tag == "t1" and snapshot.parent is None
    ws.exec("echo after > /root/after", check=True)
    yield ws
    for name in ("src", "f1", "f2", "f3"):
        ma(home, "kill", name)
        ma(home, "delete", "--yes", name)


def counting(ws: Workspace) -> tuple[int, int]:
    """The background counter read twice, a second apart."""
    first = int(ws.exec("cat /tmp/count", check=True).stdout_text)
    time.sleep(1)
    return first, int(ws.exec("cat /tmp/count", check=True).stdout_text)


def clock_skew(ws: Workspace) -> float:
    """How far the guest's wall clock is outside the host's around one exec (seconds)."""
    before = time.time()
    guest = float(ws.exec("date +%s.%N", check=True).stdout_text)
    after = time.time()
    return max(0.0, before - guest, guest - after)


def test_snapshot_create_lists_and_the_source_runs_on(home: Path, source: Workspace) -> None:
    listed = json.loads(ok(ma(home, "--json", "snapshot", "list", "src")).stdout)["snapshots"]
    assert [s["tag"] for s in listed] == ["t1"] and listed[0]["size_bytes"] > 0
    table = ok(ma(home, "snapshot", "list", "src")).stdout.splitlines()
    assert table[0].split() == ["TAG", "SIZE", "CREATED", "PARENT"] and table[1].startswith("t1")
    assert source.state == "running"
    first, then = counting(source)
    assert then > first, "the source runs on after its snapshot"
    detail = [e for e in events(home, "src") if "snapshot t1 taken" in e["detail"]]
    assert detail and "paused" in detail[0]["detail"]
    assert clock_skew(source) < 1.0, "the guest clock was stepped after the snapshot's pause"


def test_three_forks_have_their_own_identity_rng_and_disks(home: Path, source: Workspace
                                                           ) -> None:
    ma_ = Microagent(home)
    forks = [ma_.fork(f"f{i}", "src:t1") for i in (1, 2)]
    ok(ma(home, "create", "f3", "--from-snapshot", "src:t1"))
    forks.append(ma_.get("f3"))
    assert all(f.state == "prepared" for f in forks)
    for fork in forks:
        fork.start()
    assert all(qemu_pids(f.name) for f in forks), "three forks running at once"
    uuids = {source.exec("cat /proc/sys/kernel/random/uuid", check=True).stdout_text}
    for fork in forks:
        name = fork.name
        assert fork.exec("hostname", check=True).stdout_text.strip() == name
        assert fork.files.read_text("/etc/hostname").strip() == name
        hosts = fork.files.read_text("/etc/hosts")
        assert f"127.0.1.1 {name}" in hosts and " src" not in hosts
        machine_id = fork.files.read_text("/etc/machine-id").strip()
        assert len(machine_id) == 32 and machine_id != SOURCE_MACHINE_ID
        assert fork.files.read_text("/root/before") == "before\n"
        assert not fork.files.exists("/root/after"), "written after the snapshot"
        first, then = counting(fork)
        assert then > first, "the background process counts on in the fork"
        assert clock_skew(fork) < 1.0
        uuids.add(fork.exec("cat /proc/sys/kernel/random/uuid", check=True).stdout_text)
        assert any(e["detail"].startswith("forked from src:t1") for e in events(home, name))
    assert len(uuids) == 4, "each fork's RNG was reseeded"
    forks[0].files.write("/root/mine", "f1\n")
    assert not forks[1].files.exists("/root/mine") and not source.files.exists("/root/mine")
    ids = {f.files.read_text("/etc/machine-id") for f in forks}
    assert len(ids) == 3
    for fork in forks:  # each halts, starts cold, and is deleted
        assert fork.halt() == "halted"
        fork.start()
        assert events(home, fork.name)[-1]["detail"].startswith("ready in")
        assert fork.exec("hostname", check=True).stdout_text.strip() == fork.name
        fork.kill()
        assert fork.delete()
    assert source.state == "running"


def test_restore_in_place_of_an_old_snapshot(home: Path, source: Workspace) -> None:
    created = source.snapshots()[0].created
    import datetime as dt

    age = (dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(created)).total_seconds()
    if age < 10:
        time.sleep(10 - age)
    refused = ma(home, "start", "src", "--from-snapshot", "t1")
    assert refused.returncode == 1 and "already running" in refused.stderr
    source.halt()
    status = source.start(from_snapshot="t1")
    assert status.state == "running"
    assert source.files.read_text("/root/before") == "before\n"
    assert not source.files.exists("/root/after"), "written after the snapshot"
    first, then = counting(source)
    assert then > first, "the background process counts on after the restore"
    assert clock_skew(source) < 1.0, "the clock of a snapshot 10 s old was stepped"
    assert int(source.files.read_text("/run/microagent/generation")) >= 1
    assert events(home, "src")[-1]["detail"].startswith("restored from src:t1")
    listed = source.snapshots()
    assert [s.tag for s in listed] == ["t1"]


def test_suspend_start_resumes_and_cold_or_halt_discard(home: Path, source: Workspace
                                                        ) -> None:
    source.exec("echo suspended > /root/mark", check=True)
    assert ok(ma(home, "suspend", "src"))
    assert source.state == "suspended" and not qemu_pids("src")
    status = json.loads(ok(ma(home, "--json", "status", "src")).stdout)
    assert status["state"] == "suspended" and status["resumes_from_memory"] is True
    assert status["snapshots"] == 1
    assert "the next start resumes from it" in ok(ma(home, "status", "src")).stdout
    assert "suspended" in ok(ma(home, "list")).stdout
    assert (home / "workspaces" / "src" / "resume").is_dir()
    with pytest.raises(ConflictError):
        source.snapshot("t-suspended")  # no running VM to save
    refused = ma(home, "cp", "src:/root/before", str(home / "copied"))
    assert refused.returncode == 1 and "saved memory" in refused.stderr
    ok(ma(home, "start", "src"))
    assert events(home, "src")[-1]["detail"].startswith("resumed from its suspended memory")
    assert not (home / "workspaces" / "src" / "resume").exists(), "spent once resumed"
    assert source.files.read_text("/root/mark") == "suspended\n"
    first, then = counting(source)
    assert then > first
    assert clock_skew(source) < 1.0

    source.suspend()
    halted = ok(ma(home, "halt", "src"))
    assert "Discarded the suspended memory of src" in halted.stdout
    assert "discarded" in events(home, "src")[-1]["detail"]
    source.start()
    assert events(home, "src")[-1]["detail"].startswith("ready in"), "a cold boot"
    source.exec(COUNTER, check=True)

    source.suspend()
    cold = ok(ma(home, "start", "--cold", "src"))
    assert "discarding" in cold.stderr
    assert events(home, "src")[-1]["detail"].startswith("ready in")
    assert not (home / "workspaces" / "src" / "resume").exists()


def test_a_snapshot_this_host_cannot_load_is_refused_untouched(home: Path, source: Workspace
                                                               ) -> None:
    source.snapshot("t2")
    source.halt()
    manifest = home / "workspaces" / "src" / "snapshots" / "t2" / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["machine"]["kernel_sha256"] = "0" * 64
    doc["machine"]["memory"] = "4096M"
    manifest.write_text(json.dumps(doc))
    rootfs = home / "workspaces" / "src" / "rootfs.ext4"
    before = os.stat(rootfs)
    refused = ma(home, "start", "src", "--from-snapshot", "t2")
    assert refused.returncode == 1, refused.stderr
    assert "the kernel changed" in refused.stderr and "the memory changed" in refused.stderr
    assert "microagent start src" in refused.stderr, "says a cold start still works"
    after = os.stat(rootfs)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert source.state == "halted"
    with pytest.raises(NotFoundError):
        source.start(from_snapshot="nope")
    ok(ma(home, "snapshot", "delete", "src", "t2"))
    assert [s.tag for s in source.snapshots()] == ["t1"]
    deleted = ok(ma(home, "delete", "--yes", "src"))
    assert "1 snapshot" in deleted.stdout
