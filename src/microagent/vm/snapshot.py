"""What a memory image must match to be loaded, and the order to load one.

QEMU loads a memory image only into the same machine: the same QEMU (microvm is not
versioned), accelerator and CPU model, memory and its backend, vCPUs and devices in the
same order (:func:`microagent.vm.backends.qemu.machine_fingerprint`), and the kernel in
that memory must be the workspace's. A mismatch makes QEMU 7.2 exit half way through the
load, so it is found here first, from the manifest, before anything is touched
(:func:`restore_problems`).

A start that resumes gets a :class:`ResumeOrder` through ``run/resume.json``: the
directory to load (a snapshot, or the workspace's resume slot), how to name it in the
events, the identity of a fork, and the generation the guest is told.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microagent.disks.attachments import boot_disks
from microagent.errors import HostError, MicroagentError
from microagent.kernel.kernels import KernelBundle
from microagent.layout import StateLayout
from microagent.state.records import Workspace
from microagent.store import read_json, write_json_atomic
from microagent.vm.backends.base import AccelChoice, LaunchSpec
from microagent.vm.backends.qemu import QEMU_BINARY, machine_fingerprint, qemu_argv

FORMAT = 1


@dataclass(frozen=True)
class ResumeOrder:
    """What a start resumes from instead of booting."""

    source: Path  # a snapshot directory, or the workspace's resume slot
    kind: str  # restored, forked or resumed (from suspend)
    label: str  # NAME:TAG, or "suspend"
    generation: int  # the guest's /run/microagent/generation after it
    identity: dict[str, Any] | None = None  # a fork's: {"hostname": ..., "machine_id": true}
    discard: bool = False  # the source is the resume slot: removed once loaded
    held: Path | None = None  # this boot's links to the image's files (vm/launch.py)

    @property
    def image(self) -> Path:
        """The device state to load."""
        from microagent.state.snapshots import VMSTATE

        return (self.held or self.source) / VMSTATE

    @property
    def memory(self) -> Path:
        """The RAM to copy into this boot's RAM file."""
        from microagent.state.snapshots import MEMORY

        return (self.held or self.source) / MEMORY

    def to_json(self) -> dict[str, Any]:
        return {"source": str(self.source), "kind": self.kind, "label": self.label,
                "generation": self.generation, "identity": self.identity,
                "discard": self.discard}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ResumeOrder:
        return cls(Path(doc["source"]), str(doc["kind"]), str(doc["label"]),
                   int(doc["generation"]), doc.get("identity"), bool(doc.get("discard")))


def write_order(path: Path, order: ResumeOrder) -> None:
    write_json_atomic(path, order.to_json(), durable=False)


def read_order(path: Path) -> ResumeOrder | None:
    """The order ``start`` left for the first boot, or None (a cold boot)."""
    try:
        return ResumeOrder.from_json(read_json(path))
    except FileNotFoundError:
        return None


@functools.cache
def qemu_version(cache: Path | None = None) -> str:
    """The installed QEMU's version, e.g. ``7.2.22`` (``--version``'s first line); with
    ``cache`` (a JSON file) asked again only when the binary changes (25 ms a start)."""
    import os
    import shutil

    binary = shutil.which(QEMU_BINARY)
    if binary is None:
        raise HostError(f"{QEMU_BINARY} not found: install the qemu-system-x86 package")
    info = os.stat(binary)
    key = f"{os.path.realpath(binary)}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}"
    if cache is not None:
        try:
            record = read_json(cache)
            if record.get("key") == key:
                return str(record["version"])
        except (FileNotFoundError, ValueError, KeyError, MicroagentError):
            pass
    version = _ask_version(binary)
    if cache is not None:
        with contextlib.suppress(OSError, MicroagentError):
            write_json_atomic(cache, {"key": key, "version": version}, durable=False)
    return version


def _ask_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HostError(f"cannot run {QEMU_BINARY}: {e}") from e
    words = out.split()
    return words[3] if len(words) > 3 and words[:3] == ["QEMU", "emulator", "version"] else "?"


def qmp_version(answer: dict[str, Any]) -> str:
    """``query-version``'s answer as :func:`qemu_version` says it."""
    q = answer.get("qemu", {})
    return f"{q.get('major')}.{q.get('minor')}.{q.get('micro')}"


def kernel_digest(kernel: KernelBundle) -> str:
    """sha256 of the kernel image a workspace boots (the one in a snapshot's memory)."""
    image = kernel.vmlinux if kernel.vmlinux is not None else kernel.vmlinuz
    recorded = kernel.files.get(image.name, {}) if isinstance(kernel.files, dict) else {}
    if isinstance(recorded, dict) and recorded.get("sha256"):
        return str(recorded["sha256"])
    return _file_sha256(str(image))


@functools.cache
def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def machine_of(layout: StateLayout, workspace: Workspace, kernel: KernelBundle,
               accel: AccelChoice) -> dict[str, Any]:
    """The fingerprint of the machine a boot of ``workspace`` would be, RAM in a file
    (as a snapshot's is). Pure but for the kernel's digest."""
    from microagent.network import has_network

    files = layout.run_files(workspace.name)
    attached = boot_disks(layout, files, workspace.disks)
    spec = LaunchSpec(
        name=workspace.name, memory_mib=workspace.resources.memory_mib,
        cpus=workspace.resources.cpus, kernel=Path("vmlinux"), initramfs=Path("initrd"),
        cmdline="", disks=(*((_root_spec(workspace),)), *attached.disks), run_dir=files.dir,
        network="user" if has_network(workspace.network) else "none", accel=accel.accel,
        memory_file=Path("memory"))
    return {"qemu": qemu_version(layout.qemu_record),
            "kernel_sha256": kernel_digest(kernel), "host_cpu": host_cpu(accel.accel),
            **machine_fingerprint(qemu_argv(spec))}


def host_cpu(accel: str) -> str:
    """Under KVM (``-cpu host``) the guest's CPU is the host's: its model and flags
    (a digest), which a memory image must find again. Under TCG the model is named in
    the argv: empty."""
    if accel != "kvm":
        return ""
    model, flags = "", ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8",
                                            errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = hashlib.sha256(" ".join(sorted(value.split())).encode()).hexdigest()
            if model and flags:
                break
    return f"{model} ({flags[:12]})"


def _root_spec(workspace: Workspace) -> Any:
    from microagent.disks.attachments import DiskSpec

    return DiskSpec(workspace.rootfs)


def restore_problems(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between the machine a memory image was saved from (``recorded``,
    the manifest's ``machine``) and the one that would load it (``current``), in words;
    empty when it can be loaded. QEMU's point releases keep their device-state formats:
    only another major.minor is refused."""
    problems = []
    old_q, new_q = str(recorded.get("qemu", "?")), str(current.get("qemu", "?"))
    if old_q.split(".")[:2] != new_q.split(".")[:2]:
        problems.append(f"QEMU {old_q} saved it, this host has QEMU {new_q}")
    if recorded.get("kernel_sha256") != current.get("kernel_sha256"):
        problems.append("the kernel changed (sha256 "
                        f"{str(recorded.get('kernel_sha256'))[:12]} then, "
                        f"{str(current.get('kernel_sha256'))[:12]} now)")
    words = {"accel": "accelerator", "cpu": "CPU model", "memory": "memory",
             "smp": "vCPUs", "machine": "machine", "memory_backend": "memory backend",
             "host_cpu": "host CPU"}
    for key, word in words.items():
        if (recorded.get(key) or "") != (current.get(key) or ""):
            problems.append(f"the {word} changed ({recorded.get(key)} then, "
                            f"{current.get(key)} now)")
    if recorded.get("devices") != current.get("devices"):
        problems.append("the devices changed (disks or network attached differently)")
    return problems


def readonly_disks(layout: StateLayout, workspace: Workspace) -> list[dict[str, Any]]:
    """What a memory image's page cache expects of the read-only volumes and ``--disk``
    images it reads (they are not copied with it): each one's size and modification
    time."""
    import os

    own = str(layout.workspace_dir(workspace.name)) + "/"
    found = []
    for disk in boot_disks(layout, layout.run_files(workspace.name), workspace.disks).disks:
        if not disk.read_only or str(disk.path).startswith(own):  # bundles: by content
            continue
        try:
            info = os.stat(disk.path)
        except OSError:
            continue
        found.append({"name": disk.name, "path": str(disk.path), "size": info.st_size,
                      "mtime_ns": info.st_mtime_ns})
    return found


def readonly_problems(recorded: list[dict[str, Any]], current: list[dict[str, Any]]
                      ) -> list[str]:
    """The read-only disks that changed since a memory image was saved, in words."""
    now = {d["path"]: d for d in current}
    problems = []
    for disk in recorded:
        there = now.get(disk["path"])
        if there is None or (there["size"], there["mtime_ns"]) != (disk["size"],
                                                                  disk["mtime_ns"]):
            problems.append(f"the read-only disk {disk['name']} ({disk['path']}) changed "
                            "since (its page cache in the image would be stale)")
    return problems
