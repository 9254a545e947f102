"""Memory images without a VM: the argv of a RAM file and a restore (golden), the machine
fingerprint and what a restore must match, tags, the snapshot store and its staging, the
RAM file's directory, sparse copies, and a fork assembled from a snapshot's files."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from microagent.disks.rootfs import clone_file, fill_file
from microagent.errors import ConflictError, NotFoundError, UsageError
from microagent.events import read_events
from microagent.layout import StateLayout
from microagent.staging import sweep_abandoned
from microagent.state import snapshots as store
from microagent.state.forks import fork_workspace
from microagent.store import write_json_atomic
from microagent.vm.backends.qemu import machine_fingerprint, qemu_argv
from microagent.vm.memory import (
    SHM_ENV,
    memory_file,
    prepare_memory_file,
    release_memory_file,
    sweep_memory_files,
)
from microagent.vm.snapshot import (
    ResumeOrder,
    host_cpu,
    read_order,
    readonly_problems,
    restore_problems,
    write_order,
)
from tests.unit.test_backends import GOLDEN, SPEC


def test_a_ram_file_and_a_restore_in_the_argv() -> None:
    spec = dataclasses.replace(SPEC, memory_file=Path("/dev/shm/m,1.mem"), incoming=True)
    argv = qemu_argv(spec)
    assert argv[argv.index("-M") + 1] == \
        "microvm,acpi=on,rtc=on,x-option-roms=off,memory-backend=mem"
    assert argv[argv.index("-object") + 1] == \
        "memory-backend-file,id=mem,size=2048M,mem-path=/dev/shm/m,,1.mem,share=on"
    assert argv[-2:] == ["-incoming", "defer"]
    without = [a for a in argv if a not in ("-object", argv[argv.index("-object") + 1],
                                            "-incoming", "defer")]
    without[without.index("-M") + 1] = GOLDEN[GOLDEN.index("-M") + 1]
    assert without == GOLDEN, "nothing else changes"


def test_the_fingerprint_leaves_out_what_may_differ() -> None:
    boot = machine_fingerprint(qemu_argv(dataclasses.replace(
        SPEC, memory_file=Path("/a.mem"))))
    restore = machine_fingerprint(qemu_argv(dataclasses.replace(
        SPEC, name="fork", memory_file=Path("/b.mem"), incoming=True,
        cmdline="other", run_dir=Path("/elsewhere"), kernel=Path("/k2"))))
    assert boot == restore
    assert boot["memory_backend"] == "file,share=on" and boot["memory"] == "2048M"
    assert boot["devices"][0] == "virtio-blk-device,drive=disk0"
    anon = machine_fingerprint(qemu_argv(SPEC))
    assert anon["memory_backend"] == "anon"
    more = machine_fingerprint(qemu_argv(dataclasses.replace(SPEC, cpus=4)))
    assert more["smp"] == "4"


def test_restore_problems_say_what_changed() -> None:
    base = {"qemu": "7.2.22", "kernel_sha256": "a" * 64, "machine": "m", "accel": "tcg",
            "cpu": "max", "memory": "256M", "memory_backend": "file,share=on", "smp": "1",
            "devices": ["x"]}
    assert restore_problems(base, dict(base)) == []
    assert restore_problems(base, {**base, "qemu": "7.2.23"}) == [], "a point release loads"
    changed = {**base, "qemu": "8.0.0", "kernel_sha256": "b" * 64, "accel": "kvm",
               "memory": "512M", "devices": ["x", "y"]}
    problems = "; ".join(restore_problems(base, changed))
    for words in ("QEMU 7.2.22 saved it, this host has QEMU 8.0.0", "the kernel changed",
                  "the accelerator changed (tcg then, kvm now)",
                  "the memory changed (256M then, 512M now)", "the devices changed"):
        assert words in problems


@pytest.mark.parametrize("tag", ["", "-x", "../x", "a/b", "x" * 65, "a b", ".hidden"])
def test_bad_tags(tag: str) -> None:
    with pytest.raises(UsageError):
        store.validate_tag(tag)


def test_sources_and_default_tags(tmp_path: Path) -> None:
    assert store.parse_source("dev:snap-1") == ("dev", "snap-1")
    for bad in ("dev", ":t", "dev:", "../x:t", "dev:../t"):
        with pytest.raises(UsageError):
            store.parse_source(bad)
    layout = StateLayout(tmp_path)
    tag = store.default_tag(layout, "dev")
    assert tag.startswith("snap-") and len(tag) == len("snap-YYYYMMDD-HHMMSS")
    (layout.workspace_snapshots_dir("dev") / tag).mkdir(parents=True)
    assert store.default_tag(layout, "dev") in (f"{tag}-2", store.default_tag(layout, "dev"))


def publish(layout: StateLayout, name: str, tag: str, created: str, **extra: object) -> Path:
    with store.stage_snapshot(layout, name) as staged:
        (staged.path / store.VMSTATE).write_bytes(b"state")
        with open(staged.path / store.MEMORY, "wb") as f:
            f.truncate(64 << 20)
            f.seek(8 << 20)
            f.write(b"touched" * 1000)
        os.mkdir(staged.path / store.DISKS)
        (staged.path / "disks" / "root.ext4").write_bytes(b"root disk")
        (staged.path / "disks" / "bundle-b.ext4").write_bytes(b"bundle disk")
        write_json_atomic(staged.path / store.MANIFEST, {
            "created": created, "parent": None, "generation": 3, "machine": {},
            "disks": [{"role": "root", "file": "disks/root.ext4"},
                      {"role": "bundle", "name": "b", "file": "disks/bundle-b.ext4"}],
            **extra})
        staged.replace(layout.workspace_snapshots_dir(name) / tag)
    return layout.workspace_snapshots_dir(name) / tag


def test_the_store_lists_gets_and_deletes(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path)
    assert store.list_snapshots(layout, "dev") == []
    publish(layout, "dev", "b", "2026-01-02T00:00:00+00:00")
    publish(layout, "dev", "a", "2026-01-01T00:00:00+00:00", parent="src:t")
    (layout.workspace_snapshots_dir("dev") / "junk").mkdir()  # no manifest: not listed
    listed = store.list_snapshots(layout, "dev")
    assert [s.tag for s in listed] == ["a", "b"], "oldest first"
    assert listed[0].parent == "src:t" and listed[1].parent is None
    assert 0 < listed[0].size_bytes < 1 << 20, "the sparse RAM file counts what it holds"
    assert listed[0].to_json()["tag"] == "a"
    with pytest.raises(NotFoundError) as missing:
        store.get_snapshot(layout, "dev", "c")
    assert missing.value.hint == "its snapshots: a, b"
    store.delete_snapshot(layout, "dev", "a")
    assert [s.tag for s in store.list_snapshots(layout, "dev")] == ["b"]
    assert not [p for p in layout.workspace_snapshots_dir("dev").iterdir()
                if p.name.startswith(".")], "nothing left behind"


def test_abandoned_staging_is_swept_and_a_live_one_kept(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path)
    (layout.workspaces_dir / "dev").mkdir(parents=True)
    abandoned = layout.workspace_snapshots_dir("dev") / ".new-killed"
    abandoned.mkdir(parents=True)
    (abandoned / store.MEMORY).write_bytes(b"half")
    with store.stage_snapshot(layout, "dev") as live:
        assert not abandoned.exists(), "the next snapshot sweeps a killed one's"
        abandoned.mkdir()
        sweep_abandoned(layout)
        assert live.path.exists() and not abandoned.exists()


def test_resume_orders_round_trip(tmp_path: Path) -> None:
    order = ResumeOrder(tmp_path / "s", "forked", "src:t", 4, {"hostname": "f"}, True)
    write_order(tmp_path / "resume.json", order)
    assert read_order(tmp_path / "resume.json") == order
    assert read_order(tmp_path / "missing.json") is None


def test_the_ram_file_lives_in_a_private_directory(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SHM_ENV, str(tmp_path))
    layout = StateLayout(tmp_path / "state")
    held = prepare_memory_file(layout, "dev", 1)
    assert held is not None
    path, fd = held
    assert path == memory_file(layout, "dev") and path.parent.parent == tmp_path
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    assert path.stat().st_size == 1 << 20 and path.stat().st_blocks == 0, "sized, sparse"
    other = StateLayout(tmp_path / "other")
    assert memory_file(other, "dev") != path, "two state directories never share one"
    sweep_memory_files()
    assert path.exists(), "a live boot's file is locked: never swept"
    release_memory_file(path, fd)
    assert not path.exists()
    assert prepare_memory_file(layout, "dev", 1 << 40) is None, "no room: anonymous RAM"
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    running = prepare_memory_file(other, "big", (free >> 20) - 8)
    assert running is not None, "a running guest's RAM file: sparse, its whole size"
    assert prepare_memory_file(layout, "dev", 64) is None, "its memory counts as taken"
    release_memory_file(*running)
    monkeypatch.setenv(SHM_ENV, str(tmp_path / "missing"))
    assert prepare_memory_file(layout, "dev", 1) is None


def test_copies_keep_holes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with open(src, "wb") as f:
        f.truncate(32 << 20)
        f.seek(16 << 20)
        f.write(b"x" * 4096)
    allocated = clone_file(src, tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == src.read_bytes()
    assert allocated < 1 << 20
    with open(tmp_path / "filled", "wb") as f:
        f.truncate(32 << 20)
    fill_file(src, tmp_path / "filled")
    assert (tmp_path / "filled").read_bytes() == src.read_bytes()
    with pytest.raises(FileExistsError):
        clone_file(src, tmp_path / "copy")


def test_a_fork_is_assembled_from_the_snapshot(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path)
    source = layout.workspace_dir("src")
    source.mkdir(parents=True)
    write_json_atomic(source / "workspace.json", {
        "name": "src", "created": "then", "image": {"reference": "r", "digest": "d",
                                                    "config": {}},
        "resources": {"profile": "tiny", "memory_mib": 256, "cpus": 1, "disk_mib": 512},
        "backend": "qemu", "network": "user", "restart": "never", "env": ["A=1"],
        "hostname": "src", "disks": [], "ports": [{"host_ip": "127.0.0.1", "host_port": 8080,
                                                    "guest_port": 80}]})
    (source / "bundles").mkdir()
    (source / "bundles" / "b.ext4").write_bytes(b"built bundle")
    snap = publish(layout, "src", "t", "2026-01-01T00:00:00+00:00")
    fork = fork_workspace(layout, "f1", "src:t")
    assert fork.name == "f1" and fork.hostname == "f1" and fork.ports == ()
    assert fork.env == ("A=1",)
    assert fork.rootfs.read_bytes() == b"root disk"
    slot = layout.workspace_resume_dir("f1")
    for name in (store.VMSTATE, store.MEMORY, "disks/bundle-b.ext4"):
        assert os.stat(slot / name).st_ino == os.stat(snap / name).st_ino, "linked"
    manifest = json.loads((slot / store.MANIFEST).read_text())
    assert manifest["resume_kind"] == "forked" and manifest["label"] == "src:t"
    assert [d["role"] for d in manifest["disks"]] == ["bundle"], "its root disk is its own"
    assert (layout.workspace_dir("f1") / "bundles" / "b.ext4").read_bytes() == b"built bundle"
    assert "forked from src:t" in read_events(layout.workspace_events("f1"))[-1].detail
    assert json.loads(layout.workspace_record("f1").read_text())["forked_from"] == "src:t"
    store.delete_snapshot(layout, "src", "t")
    assert (slot / store.MEMORY).stat().st_size == 64 << 20, "the fork keeps its links"
    with pytest.raises(ConflictError, match="already exists"):
        fork_workspace(layout, "f1", "src:t")
    with pytest.raises(NotFoundError):
        fork_workspace(layout, "f2", "src:t")
    with pytest.raises(UsageError):
        fork_workspace(layout, "f2", "src:t", hostname="-bad")
    assert not layout.workspace_dir("f2").exists()


def test_read_only_disks_that_moved_on_are_named() -> None:
    recorded = [{"name": "ref", "path": "/v/ref.ext4", "size": 10, "mtime_ns": 1}]
    assert readonly_problems(recorded, [dict(recorded[0])]) == []
    moved = readonly_problems(recorded, [{**recorded[0], "mtime_ns": 2}])
    assert moved and "read-only disk ref (/v/ref.ext4) changed" in moved[0]
    assert readonly_problems(recorded, []), "gone counts as changed"


def test_kvm_records_the_host_cpu() -> None:
    assert host_cpu("tcg") == ""
    kvm = host_cpu("kvm")
    assert kvm and kvm == host_cpu("kvm") and "(" in kvm
    base = {"qemu": "7.2.22", "host_cpu": kvm}
    assert "the host CPU changed" in restore_problems(base, {**base, "host_cpu": "other"})[0]


def test_a_killed_supervisors_ram_file_is_swept(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Its lock dies with it (a real process, SIGKILLed), whatever state directory it was
    of; the next sweep removes the file."""
    monkeypatch.setenv(SHM_ENV, str(tmp_path))
    script = ("import os, signal, sys; from pathlib import Path; "
              "from microagent.layout import StateLayout; "
              "from microagent.vm.memory import prepare_memory_file; "
              "held = prepare_memory_file(StateLayout(Path(sys.argv[1])), 'gone', 1); "
              "print(held[0], flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    killed = subprocess.run([sys.executable, "-c", script, str(tmp_path / "deleted-state")],
                            capture_output=True, text=True)
    leftover = Path(killed.stdout.strip())
    assert killed.returncode == -9 and leftover.exists()
    live = prepare_memory_file(StateLayout(tmp_path / "state"), "dev", 1)
    assert live is not None and not leftover.exists(), "the next boot swept it"
    release_memory_file(*live)


def test_room_for_copies_on_a_small_file_system(tmp_path: Path) -> None:
    """The state directory on a 128 MiB tmpfs in a private mount namespace (as in
    tests/e2e/test_host_full.py): a copy of an 80 MiB disk does not fit with the 64 MiB
    kept free; 1 MiB does."""
    from tests.e2e.test_host_full import _unshare_argv, _why_not

    argv = _unshare_argv()
    if argv is None:
        pytest.skip(_why_not())
    disk, small = tmp_path / "disk", tmp_path / "small"
    for path, size in ((disk, 80 << 20), (small, 1 << 20)):
        with open(path, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, size)  # allocated: what a copy takes
    state = tmp_path / "state"
    state.mkdir()
    script = (f"mount -t tmpfs -o size=128m tmpfs {state} && mkdir {state}/workspaces && "
              f"{sys.executable} -c '"
              "import sys, pathlib; from microagent.layout import StateLayout; "
              "from microagent.state.forks import check_room_for; "
              f"check_room_for(StateLayout(pathlib.Path(\"{state}\")), "
              "[pathlib.Path(p) for p in sys.argv[1:]])' \"$@\"")
    fits = subprocess.run([*argv, "sh", "-c", script, "sh", str(small)],
                          capture_output=True, text=True)
    assert fits.returncode == 0, fits.stderr
    full = subprocess.run([*argv, "sh", "-c", script, "sh", str(disk)],
                          capture_output=True, text=True)
    assert full.returncode != 0 and "not enough space" in full.stderr
