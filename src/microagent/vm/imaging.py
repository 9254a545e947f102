"""The supervisor's memory images: ``snapshot create``, ``suspend`` and loading one at boot.

Functions of the :class:`microagent.vm.supervisor.Supervisor` they work for.

Saving (QEMU 7.2, guest RAM in a shared file: vm/memory.py): QMP ``stop`` (unless the
user paused it already), then ``migrate`` with ``x-ignore-shared`` to ``exec:cat``, which
writes only the device state (~80 KB); while the vCPUs are still stopped, the RAM file's
touched pages and every writable disk are copied (a reflink where the file system has
one), so that the memory and the disks are of one instant (the guest's page cache holds
the disks' dirty blocks); then ``cont``, and the guest is told it resumed (its clock
stepped). The files are synced after ``cont`` and published by one rename
(state/snapshots.py). ``suspend`` saves the same way into the resume slot, without the
root disk (the workspace's own disk stays as it is: the VM never runs again), then ends
the VM.

Loading: QEMU is started with the same machine and ``-incoming defer``, its disks the
image's (vm/launch.py ``place_image``); the image's RAM is copied into the RAM file while
QEMU starts (:func:`fill_memory`); ``migrate-incoming`` reads the device state, ``cont``
runs the vCPUs, and the agent, on a fresh channel, is told the time, fresh entropy, the
generation and, for a fork, its identity before anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microagent.errors import ConflictError, HostError, MicroagentError
from microagent.events import now_iso
from microagent.vm.backends.qmp import QmpClient
from microagent.vm.snapshot import FORMAT, ResumeOrder, readonly_disks

if TYPE_CHECKING:
    from microagent.vm.supervisor import Supervisor

IMAGE_WAIT = 120.0  # QEMU saving or loading a memory image's device state
SAVE_BANDWIDTH = 8 << 30  # bytes/s: QEMU's default (128 MiB/s) throttles a stopped VM too
SNAPSHOT_MARGIN = 64 << 20  # room left on the host after a snapshot's files


async def snapshot(sup: Supervisor, request: dict[str, Any]) -> dict[str, Any]:
    """``snapshot create``: the memory, device state and writable disks of one
    instant, published as ``snapshots/<tag>/``; a running workspace runs on."""
    from microagent.state.snapshots import validate_tag

    tag = validate_tag(str(request.get("tag") or ""))
    target = sup.layout.workspace_snapshots_dir(sup.name) / tag
    if target.exists():
        raise ConflictError(f"workspace {sup.name} already has a snapshot {tag}",
                            hint="pick another --tag, or delete that one first")
    result = await _save_image(sup, target, tag, suspend=False)
    state = "paused" if sup.pause.paused else "running"
    sup._event(state, f"snapshot {tag} taken: paused {result['paused_ms']} ms "
                       f"({result['state_ms']} ms device state, {result['copy_ms']} ms "
                       "copies)")
    return result

async def suspend(sup: Supervisor, request: dict[str, Any]) -> dict[str, Any]:
    """``suspend``: the memory into the resume slot, then the VM ends (``suspended``;
    the next start resumes it)."""
    slot = sup.layout.workspace_resume_dir(sup.name)
    if slot.exists():  # a slot nobody resumed (a failed resume): this one replaces it
        from microagent.state.snapshots import discard_resume

        discard_resume(sup.layout, sup.name)
    result = await _save_image(sup, slot, "suspend", suspend=True)
    await sup.exited.wait()
    return {**result, "state": "suspended"}


def _refuse_image(sup: Supervisor) -> Path:
    """Why this workspace's memory cannot be saved now, if it cannot; else its RAM
    file."""
    if sup.quarantined:
        raise ConflictError("the workspace is quarantined: its memory is not saved",
                            hint=f"halt, stop or kill {sup.name} to end the quarantine")
    if sup.intent is not None or sup.outcome is not None or not sup.booted \
            or sup.vmm is None or sup.vmm.returncode is not None or sup.qmp is None:
        raise ConflictError(f"workspace {sup.name} is not running")
    if not sup.image_idle.is_set():
        raise ConflictError(f"a snapshot of {sup.name} is being taken; try again when "
                            "it is done")
    if sup.postmigrate:
        raise ConflictError(f"workspace {sup.name} was snapshotted while paused: QEMU "
                            "saves it once per pause", hint=f"microagent resume "
                                                            f"{sup.name}, then snapshot it")
    if sup.memory_file is None:
        from microagent.vm.memory import shm_dir

        raise HostError(
            f"workspace {sup.name}'s memory is not in a file that can be saved: "
            f"{shm_dir().parent} had no room for its "
            f"{sup.workspace.resources.memory_mib} MiB when it started",
            hint=f"make room there, then halt and start {sup.name} again")
    for item in sup.workspace.disks:
        if not item.read_only and item.kind in ("volume", "disk"):
            raise ConflictError(
                f"workspace {sup.name} has the read-write {item.kind} {item.name} "
                "attached: a memory image paired with a disk that moves on corrupts it",
                hint="attach it read-only (:ro) to snapshot this workspace")
    return sup.memory_file


def _writable_disks(sup: Supervisor, suspend: bool) -> list[tuple[dict[str, str], Path]]:
    """The disks saved with the memory: the root disk (not for suspend: it stays) and
    this boot's copy of each rw bundle."""
    disks: list[tuple[dict[str, str], Path]] = []
    if not suspend:
        disks.append(({"role": "root", "file": "disks/root.ext4"}, sup.workspace.rootfs))
    for item in sup.workspace.disks:
        if item.kind == "bundle" and not item.read_only:
            disks.append(({"role": "bundle", "name": item.name,
                           "file": f"disks/bundle-{item.name}.ext4"},
                          sup.files.bundle_disk(item.name)))
    return disks


async def _save_image(sup: Supervisor, target: Path, tag: str, *,
                      suspend: bool) -> dict[str, Any]:
    """One image at a time: pause, resume, halt, stop and quarantine wait for it
    (``Supervisor.image_idle``); kill does not."""
    memory = _refuse_image(sup)
    sup.image_idle.clear()
    try:
        return await _save(sup, memory, target, tag, suspend=suspend)
    except OSError as e:
        from microagent.store import write_error

        raise write_error(e, f"cannot write the memory image of {sup.name}",
                          sup.layout.workspace_snapshots_dir(sup.name)) from e
    except (TimeoutError, ConnectionError) as e:
        raise MicroagentError(f"QEMU did not answer while saving the memory image of "
                              f"{sup.name}: {e!r}", hint=f"microagent kill {sup.name}") from e
    finally:
        sup.imaging = False
        sup.image_idle.set()


async def _save(sup: Supervisor, memory: Path, target: Path, tag: str, *,
                suspend: bool) -> dict[str, Any]:
    from microagent.state.snapshots import MEMORY, VMSTATE, directory_bytes, stage_snapshot
    from microagent.vm.memory import allocated_bytes, free_bytes

    disks = _writable_disks(sup, suspend)
    need = allocated_bytes(memory) + sum(allocated_bytes(p) for _, p in disks)
    snapshots = sup.layout.workspace_snapshots_dir(sup.name)
    snapshots.mkdir(mode=0o700, exist_ok=True)
    free = free_bytes(snapshots)
    if need + SNAPSHOT_MARGIN > free:
        raise HostError(f"not enough space for the memory image of {sup.name} in "
                        f"{snapshots}: it needs {need >> 20} MiB, {free >> 20} MiB are "
                        "free", hint="make room there, or delete old snapshots")
    machine = await _machine(sup)
    was_paused = sup.pause.paused
    with stage_snapshot(sup.layout, sup.name) as staged:
        began = time.monotonic()
        sup.imaging = True  # the STOP and RESUME that follow are ours
        if not was_paused:
            await _qmp(sup).execute("stop")
        try:
            await _save_device_state(sup, staged.path / VMSTATE)
            saved = time.monotonic()
            copied_disks = await asyncio.to_thread(_copy_image, memory, staged.path, disks)
            done = time.monotonic()
            manifest = {
                "format": FORMAT, "workspace": sup.name, "tag": tag, "created": now_iso(),
                "parent": sup.parent, "machine": machine,
                "memory_mib": sup.workspace.resources.memory_mib,
                "cpus": sup.workspace.resources.cpus, "generation": sup.generation,
                "hostname": sup.workspace.hostname, "disks": copied_disks,
                "readonly": readonly_disks(sup.layout, sup.workspace),
                "memory_bytes": allocated_bytes(staged.path / MEMORY),
                "paused_ms": round((done - began) * 1000),
                **({"resume_kind": "suspended", "label": "suspend"} if suspend else {}),
            }
            if suspend:  # the VM must not run again once its memory is the slot's
                await asyncio.to_thread(_publish, staged, manifest, target)
                sup.intent = "suspend"  # before anything waiting for the image goes on
                await sup._kill_vmm()
        except BaseException:
            if not was_paused:  # it runs on, whatever failed
                with contextlib.suppress(Exception):
                    await _qmp(sup).execute("cont")
            raise
        if was_paused:
            sup.postmigrate = True
        elif not suspend:
            await _qmp(sup).execute("cont")
            sup.imaging = False
            sup._tell_resumed_later()  # its clock stopped for the pause
        if not suspend:
            await asyncio.to_thread(_publish, staged, manifest, target)
    return {"tag": tag, "path": str(target), "paused_ms": manifest["paused_ms"],
            "state_ms": round((saved - began) * 1000),
            "copy_ms": round((done - saved) * 1000),
            "total_ms": round((time.monotonic() - began) * 1000),
            "size_bytes": directory_bytes(target)}


async def _machine(sup: Supervisor) -> dict[str, Any]:
    """This boot's machine, as a manifest records it (vm/snapshot.py)."""
    from microagent.vm.backends.qemu import machine_fingerprint
    from microagent.vm.snapshot import host_cpu, kernel_digest, qmp_version

    version = qmp_version(await _qmp(sup).execute("query-version"))
    if sup.kernel is None or sup.plan is None:
        raise MicroagentError(f"workspace {sup.name} has not booted")
    if not sup.kernel_sha256:
        sup.kernel_sha256 = await asyncio.to_thread(kernel_digest, sup.kernel)
    return {"qemu": version, "kernel_sha256": sup.kernel_sha256,
            "host_cpu": host_cpu(sup.accel.accel), **machine_fingerprint(sup.plan.argv)}


async def _save_device_state(sup: Supervisor, path: Path) -> None:
    """``migrate`` the device state (not the shared RAM) into ``path``."""
    qmp = _qmp(sup)
    await qmp.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "x-ignore-shared", "state": True}]})
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": SAVE_BANDWIDTH})
    part = path.with_name(path.name + ".part")
    # "completed" means QEMU wrote it all into the pipe: the rename says cat is done
    command = f"cat > {shlex.quote(str(part))} && mv {shlex.quote(str(part))} " \
              f"{shlex.quote(str(path))}"
    await qmp.execute("migrate", {"uri": f"exec:{command}"})
    await _migration_done(sup, "the save")
    deadline = time.monotonic() + 10
    while not path.exists():
        if time.monotonic() > deadline:
            raise MicroagentError("QEMU saved the device state but it never reached "
                                  f"{path}")
        await asyncio.sleep(0.001)

async def _migration_done(sup: Supervisor, what: str) -> None:
    deadline = time.monotonic() + IMAGE_WAIT
    while True:
        info = await _qmp(sup).execute("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise MicroagentError(f"QEMU failed {what} of the memory image: "
                                  f"{info.get('error-desc', status)}")
        if time.monotonic() > deadline:
            raise MicroagentError(f"QEMU did not finish {what} of the memory image "
                                  f"within {IMAGE_WAIT:.0f}s")
        await asyncio.sleep(0.002)

async def load_image(sup: Supervisor, order: ResumeOrder, root: Path | None) -> None:
    """Load ``order``'s device state into the waiting QEMU and run its vCPUs. A restore
    keeps the workspace's old root disk under a second name (``root``) until the load
    has worked (a failed one puts it back: vm/launch.put_back_root); the resume slot is
    spent before the guest runs again (its disk moves on from then)."""
    from microagent.state.snapshots import discard_resume

    if sup.memory_fill is not None:
        await sup.memory_fill  # QEMU reads the RAM file only once the vCPUs run
    sup.imaging = True
    try:
        qmp = _qmp(sup)
        await qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True}]})
        await qmp.execute("migrate-incoming", {
            "uri": f"exec:cat {shlex.quote(str(order.image))}"})
        await _migration_done(sup, "the load")
        if order.held is not None:  # loaded: the links are not needed any more
            import shutil

            shutil.rmtree(order.held, ignore_errors=True)
        if root is not None:  # loaded: the old disk is not coming back
            with contextlib.suppress(FileNotFoundError):
                os.unlink(root)
        if order.discard:
            discard_resume(sup.layout, sup.name)
        await qmp.execute("cont")
    finally:
        sup.imaging = False


def fill_memory(sup: Supervisor, order: ResumeOrder) -> asyncio.Future[None] | None:
    """Copy the image's RAM into this boot's RAM file in a thread, while QEMU starts
    (load_image waits for it)."""
    from microagent.disks.rootfs import fill_file

    if sup.memory_file is None:
        return None
    fill = asyncio.ensure_future(asyncio.to_thread(fill_file, order.memory,
                                                   sup.memory_file))
    # a boot that fails first never awaits it: its error must not be reported as lost
    fill.add_done_callback(lambda done: done.cancelled() or done.exception())
    return fill


def parent_of(order: ResumeOrder) -> str | None:
    """NAME:TAG the memory of ``order`` came from, if it came from a snapshot."""
    if order.kind in ("restored", "forked"):
        return order.label
    from microagent.state.snapshots import read_manifest

    with contextlib.suppress(Exception):
        parent = read_manifest(order.source).get("parent")
        return str(parent) if parent else None
    return None


def _qmp(sup: Supervisor) -> QmpClient:
    if sup.qmp is None:
        raise MicroagentError("QEMU's monitor is not connected: the memory image cannot be "
                              "saved or loaded")
    return sup.qmp


def _copy_image(memory: Path, staging: Path, disks: list[tuple[dict[str, str], Path]]
                ) -> list[dict[str, str]]:
    """The RAM file and ``disks`` into ``staging`` (vCPUs stopped: nothing changes them)."""
    from microagent.disks.rootfs import clone_file
    from microagent.state.snapshots import DISKS, MEMORY

    clone_file(memory, staging / MEMORY)
    if disks:
        os.mkdir(staging / DISKS, 0o700)
    for record, path in disks:
        clone_file(path, staging / record["file"])
    return [record for record, _ in disks]


def _publish(staged: Any, manifest: dict[str, Any], target: Path) -> None:
    """Sync every file, write the manifest, rename the staging directory to ``target``."""
    from microagent.disks.rootfs import sync_file
    from microagent.state.snapshots import MANIFEST
    from microagent.store import fsync_dir, write_json_atomic

    for root, _, files in os.walk(staged.path):
        for file in files:
            sync_file(Path(root) / file)
        fsync_dir(Path(root))
    write_json_atomic(staged.path / MANIFEST, manifest)
    try:
        staged.replace(target)
    except OSError as e:
        raise HostError(f"cannot publish the memory image at {target}: {e.strerror}") from e
    fsync_dir(target.parent)

