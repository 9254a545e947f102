"""Memory state verbs: snapshot create/list/delete, suspend, and what a start resumes from.

The supervisor saves the images (vm/imaging.py); the files are state/snapshots.py's.
:func:`plan_resume` decides, under the start's workspace lock and before anything is
touched, whether a start resumes (``--from-snapshot TAG``, a suspended workspace, a
fork's first start) and refuses an image this host cannot load, saying what changed
(vm/snapshot.py ``restore_problems``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from microagent.config import validate_name
from microagent.errors import ConflictError, HostError
from microagent.layout import StateLayout
from microagent.progress import NullProgress, Progress
from microagent.state.records import Workspace, get_workspace
from microagent.state.runtime import runtime_state, supervisor_alive
from microagent.state.snapshots import (
    Snapshot,
    default_tag,
    discard_resume,
    get_snapshot,
    list_snapshots,
    resume_manifest,
    validate_tag,
)
from microagent.vm.snapshot import ResumeOrder
from microagent.workspace.supervisors import supervisor_of

IMAGE_TIMEOUT = 600.0  # the supervisor copies the RAM and the disks: large ones take long
RESTORABLE = frozenset({"halted", "stopped", "failed", "suspended", "prepared"})


def snapshot_workspace(layout: StateLayout, name: str, tag: str | None = None) -> Snapshot:
    """Save the memory, device state and writable disks of the running (or paused)
    ``name`` as ``snapshots/<tag>/``; a running workspace runs on."""
    validate_name(name)
    get_workspace(layout, name)
    tag = validate_tag(tag) if tag else default_tag(layout, name)
    _refuse_unless_live(layout, name, "snapshot")
    supervisor_of(layout, name).request("snapshot", timeout=IMAGE_TIMEOUT,
                                                           tag=tag)
    return get_snapshot(layout, name, tag)


def suspend_workspace(layout: StateLayout, name: str) -> dict[str, Any]:
    """Save the memory of the running (or paused) ``name`` into its resume slot and end
    the VM: ``suspended``, and the next start resumes it."""
    validate_name(name)
    get_workspace(layout, name)
    _refuse_unless_live(layout, name, "suspend")
    answer = supervisor_of(layout, name).request(
        "suspend", timeout=IMAGE_TIMEOUT)
    deadline = time.monotonic() + 30  # it ends the VM, then exits
    while supervisor_alive(layout.run_files(name)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return answer


def workspace_snapshots(layout: StateLayout, name: str) -> list[Snapshot]:
    """The snapshots of ``name``, oldest first."""
    validate_name(name)
    get_workspace(layout, name)
    return list_snapshots(layout, name)


def remove_snapshot(layout: StateLayout, name: str, tag: str) -> None:
    """Delete the snapshot ``tag`` of ``name`` (forks made from it are not affected)."""
    from microagent.state.snapshots import delete_snapshot

    validate_name(name)
    get_workspace(layout, name)
    delete_snapshot(layout, name, tag)


def _refuse_unless_live(layout: StateLayout, name: str, verb: str) -> None:
    state = runtime_state(layout, name)
    if state.state not in ("running", "paused"):
        raise ConflictError(f"workspace {name} is not running (state {state.state})",
                            hint=f"{verb} saves a running workspace's memory: start it first")


def plan_resume(layout: StateLayout, workspace: Workspace, state: str, *,
                from_snapshot: str | None, cold: bool,
                progress: Progress | None = None) -> ResumeOrder | None:
    """What this start of ``workspace`` (in ``state``) resumes from, None for a cold
    boot; refuses, before anything is touched, an image this host cannot load. A
    suspended memory that ``--cold`` or ``--from-snapshot`` skips is discarded (said)."""
    progress = progress or NullProgress()
    name = workspace.name
    slot = resume_manifest(layout, name)
    if from_snapshot is not None:
        if state not in RESTORABLE:
            raise ConflictError(f"workspace {name} is {state}: a snapshot is restored into "
                                "a workspace that is not running",
                                hint=f"halt it first: microagent halt {name}")
        snapshot = get_snapshot(layout, name, validate_tag(from_snapshot))
        _check_loadable(layout, workspace, snapshot.path, snapshot.manifest,
                        f"{name}:{snapshot.tag}",
                        f"`microagent start {name}` boots its current disk instead")
        if slot is not None:  # its disk is about to be replaced: that memory is spent
            progress.step(f"notice: discarding {name}'s suspended memory")
            discard_resume(layout, name)
        order = ResumeOrder(snapshot.path, "restored", f"{name}:{snapshot.tag}",
                            int(snapshot.manifest.get("generation", 0)) + 1)
        return order
    if slot is None:
        return None
    if cold:
        progress.step(f"notice: discarding {name}'s suspended memory (--cold)")
        discard_resume(layout, name)
        return None
    if slot.get("kind") == "unreadable":
        raise ConflictError(f"the suspended memory of {name} cannot be read",
                            hint=f"microagent start --cold {name} boots its disk instead")
    forked = slot.get("resume_kind") == "forked"
    label = str(slot.get("label") or "suspend")
    _check_loadable(layout, workspace, layout.workspace_resume_dir(name), slot, label,
                    f"`microagent start --cold {name}` boots its disk instead")
    identity = {"hostname": workspace.hostname, "machine_id": True} if forked else None
    return ResumeOrder(layout.workspace_resume_dir(name), "forked" if forked else "resumed",
                       label, int(slot.get("generation", 0)) + 1, identity, discard=True)


def _check_loadable(layout: StateLayout, workspace: Workspace, source: Path,
                    manifest: dict[str, Any], label: str, cold_hint: str) -> None:
    from microagent.vm.backends.base import choose_accel
    from microagent.vm.launch import workspace_kernel
    from microagent.vm.memory import room, shm_dir, sweep_memory_files
    from microagent.vm.snapshot import (
        machine_of,
        readonly_disks,
        readonly_problems,
        restore_problems,
    )

    kernel = workspace_kernel(layout, workspace)
    current = machine_of(layout, workspace, kernel, choose_accel())
    problems = restore_problems(manifest.get("machine", {}), current) + readonly_problems(
        manifest.get("readonly", []), readonly_disks(layout, workspace))
    if problems:
        raise ConflictError(f"the memory image {label} cannot be loaded here: "
                            + "; ".join(problems), hint=cold_hint)
    from microagent.state.forks import check_room_for
    from microagent.state.snapshots import DISKS

    check_room_for(layout, [source / d["file"] for d in manifest.get("disks", [])
                            if str(d.get("file", "")).startswith(DISKS + "/")])
    need = workspace.resources.memory_mib << 20
    directory = shm_dir()
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        sweep_memory_files()  # a killed supervisor's would count against the room
        free = room(directory)
    except OSError:
        free = 0
    if free < need:
        raise HostError(f"no room in {directory.parent} for the memory of {workspace.name}: "
                        f"it needs {need >> 20} MiB, {free >> 20} MiB are free",
                        hint=f"free some there; {cold_hint}")


def snapshot_counts(layout: StateLayout, name: str) -> tuple[int, bool]:
    """How many snapshots ``name`` has, and whether it holds suspended memory."""
    return len(list_snapshots(layout, name)), resume_manifest(layout, name) is not None


def discard_suspended(layout: StateLayout, name: str) -> bool:
    """Remove the suspended memory of ``name`` (halt of a suspended workspace)."""
    return discard_resume(layout, name)
