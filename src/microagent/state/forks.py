"""``create NEW --from-snapshot NAME:TAG``: a fork, a new workspace that resumes from a
snapshot's memory on its own copy of the disks.

The fork's directory is assembled in staging and renamed into place, as ``create`` does:
its record is the source's but for the name, hostname, published ports and creation
time; its root disk a copy of the snapshot's; its resume slot (``resume/``) links the
snapshot's device state, RAM file and bundle disks (published snapshot files never
change, so a link is a copy that costs nothing, and it outlives the snapshot's deletion).
Its first start resumes there and gives the guest its new identity (vm/imaging.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from microagent.config import validate_name
from microagent.errors import ConflictError, UsageError
from microagent.events import append_event, now_iso
from microagent.layout import StateLayout
from microagent.network import PublishedPort, validate_ports
from microagent.progress import NullProgress, Progress
from microagent.staging import stage_dir, sweep_abandoned
from microagent.state.records import (
    _HOSTNAME,
    Workspace,
    _workspace_lock,
    default_hostname,
    get_workspace,
)
from microagent.state.snapshots import (
    DISKS,
    MANIFEST,
    MEMORY,
    VMSTATE,
    get_snapshot,
    parse_source,
)
from microagent.store import ensure_dir, read_json, write_json_atomic


def fork_workspace(layout: StateLayout, name: str, source: str, *, hostname: str = "",
                   ports: Sequence[PublishedPort] = (),
                   progress: Progress | None = None) -> Workspace:
    """Create ``name`` from the snapshot ``source`` (``NAME:TAG``), state ``prepared``."""
    progress = progress or NullProgress()
    validate_name(name)
    parent, tag = parse_source(source)
    if hostname and not _HOSTNAME.fullmatch(hostname):
        raise UsageError(f"invalid hostname {hostname!r}")
    if layout.workspace_dir(name).exists():  # said first; checked again under the lock
        raise _exists(name)
    get_workspace(layout, parent)
    snapshot = get_snapshot(layout, parent, tag)
    record = read_json(layout.workspace_record(parent))
    validate_ports(tuple(ports), str(record.get("network", "user")))
    _check_room(layout, snapshot.path, [d for d in snapshot.manifest.get("disks", [])
                                        if d.get("role") == "root"])
    with _workspace_lock(layout, name):
        sweep_abandoned(layout)
        if layout.workspace_dir(name).exists():
            raise _exists(name)
        from microagent.disks.rootfs import clone_file

        with stage_dir(layout.workspaces_dir, f".new-{name}-") as staged:
            progress.step("Copying root disk")
            slot = ensure_dir(staged.path / layout.workspace_resume_dir(name).name)
            manifest = dict(snapshot.manifest)
            for disk in manifest.get("disks", []):
                if disk["role"] == "root":
                    clone_file(snapshot.path / disk["file"],
                               staged.path / layout.workspace_rootfs(name).name)
                else:
                    ensure_dir(slot / DISKS)
                    _link(snapshot.path / disk["file"], slot / disk["file"])
            manifest["disks"] = [d for d in manifest.get("disks", []) if d["role"] != "root"]
            for file in (VMSTATE, MEMORY):
                _link(snapshot.path / file, slot / file)
            manifest.update(resume_kind="forked", label=f"{parent}:{tag}")
            write_json_atomic(slot / MANIFEST, manifest)
            bundles = layout.workspace_bundles_dir(parent)
            if bundles.is_dir():  # a ro bundle's disk must be the one in the memory's cache
                _copy_tree(bundles, staged.path / bundles.name)
            record.update(name=name, created=now_iso(),
                          hostname=hostname or default_hostname(name),
                          ports=[p.to_json() for p in ports], forked_from=f"{parent}:{tag}")
            record.pop("schema", None)
            write_json_atomic(staged.path / "workspace.json", record)
            append_event(staged.path / "events.jsonl", "prepared",
                         f"forked from {parent}:{tag}; its first start resumes from that "
                         "memory")
            from microagent.disks.rootfs import sync_file
            from microagent.store import fsync_dir

            sync_file(staged.path / layout.workspace_rootfs(name).name)  # as create does
            for directory in (slot, staged.path):
                fsync_dir(directory)
            staged.replace(layout.workspace_dir(name))
            fsync_dir(layout.workspaces_dir)
    return get_workspace(layout, name)


def _check_room(layout: StateLayout, source: Path, disks: list[dict[str, str]]) -> None:
    """HostError unless the state directory's disk has room for copies of ``disks``."""
    check_room_for(layout, [source / d["file"] for d in disks])


def check_room_for(layout: StateLayout, files: Sequence[Path]) -> None:
    """HostError unless the state directory's disk has room for copies of ``files``
    (what they occupy, and 64 MiB to spare)."""
    from microagent.errors import HostError

    need = sum(os.stat(f).st_blocks * 512 for f in files)
    info = os.statvfs(layout.workspaces_dir)
    free = info.f_bavail * info.f_frsize
    if need + (64 << 20) > free:
        raise HostError(f"not enough space in {layout.workspaces_dir} for a copy of the "
                        f"snapshot's disks: they need {need >> 20} MiB, {free >> 20} MiB are "
                        "free", hint="make room there, or delete old snapshots")


def _exists(name: str) -> ConflictError:
    return ConflictError(f"workspace {name} already exists",
                         hint=f"delete it first (microagent delete {name}) or pick another "
                              "name")


def _link(source: Path, target: Path) -> None:
    """``target`` the same file as ``source`` (a copy where a link cannot be made)."""
    try:
        os.link(source, target)
    except OSError:
        from microagent.disks.rootfs import clone_file

        clone_file(source, target)


def _copy_tree(source: Path, target: Path) -> None:
    from microagent.disks.rootfs import clone_file

    for root, dirs, files in os.walk(source):
        here = target / Path(root).relative_to(source)
        ensure_dir(here)
        for file in files:
            if not file.startswith("."):
                clone_file(Path(root) / file, here / file)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
