"""The workspace verbs: create, list, get, delete.

A workspace is a directory ``workspaces/<name>/`` holding its desired state
(``workspace.json``), its own root disk (``rootfs.ext4``, a copy of the image's cached base
disk) and its event history. ``create`` assembles all of it in a hidden staging directory
and renames it into place at the end, so a failed or interrupted create leaves nothing.
The state shown to users is derived from the record and the last event.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microagent.attachments import Attachment, validate_attachments
from microagent.config import Resources, resolve_resources, validate_name
from microagent.errors import ConflictError, NotFoundError, UsageError
from microagent.events import Event, append_event, now_iso
from microagent.layout import StateLayout
from microagent.network import PublishedPort, validate_network, validate_ports
from microagent.progress import NullProgress, Progress
from microagent.store import ensure_dir, file_lock, read_json, write_json_atomic

if TYPE_CHECKING:
    from microagent.images import Image
    from microagent.manifests import ImageConfig

BACKENDS = ("qemu",)
RESTART_POLICIES = ("never", "on-failure", "always")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_STAGING_PREFIX = ".new-"
_DELETING_PREFIX = ".deleting-"


@dataclass(frozen=True)
class WorkspaceSpec:
    """What ``create`` is asked to make."""

    name: str
    image: str
    resources: Resources = field(default_factory=resolve_resources)
    backend: str = "qemu"
    network: str = "user"
    restart: str = "never"
    env: tuple[str, ...] = ()
    hostname: str = ""
    setup: tuple[str, ...] = ()  # commands run once before the first start
    disks: tuple[Attachment, ...] = ()  # --volume, --disk, --bundle
    ports: tuple[PublishedPort, ...] = ()  # --publish


@dataclass(frozen=True)
class Workspace:
    """A saved workspace: its record plus its derived state."""

    name: str
    state: str
    image: str
    image_digest: str
    image_config: ImageConfig
    resources: Resources
    backend: str
    network: str
    restart: str
    env: tuple[str, ...]
    hostname: str
    created: str
    rootfs: Path
    last_event: Event | None
    disks: tuple[Attachment, ...] = ()
    ports: tuple[PublishedPort, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` shape of one workspace."""
        return {
            "name": self.name,
            "state": self.state,
            "backend": self.backend,
            "profile": self.resources.profile,
            "network": self.network,
            "restart": self.restart,
            "image": self.image,
            "image_digest": self.image_digest,
            "resources": {
                "memory_mib": self.resources.memory_mib,
                "cpus": self.resources.cpus,
                "disk_mib": self.resources.disk_mib,
            },
            "hostname": self.hostname,
            "env": list(self.env),
            "created": self.created,
            "rootfs": str(self.rootfs),
            "disks": [disk.to_json() for disk in self.disks],
            "ports": [port.to_json() for port in self.ports],
        }


def validate_spec(spec: WorkspaceSpec) -> None:
    """Refuse a bad spec before anything is written."""
    validate_name(spec.name)
    if spec.backend not in BACKENDS:
        raise UsageError(f"unknown or unavailable backend {spec.backend!r}",
                         hint=f"available: {', '.join(BACKENDS)}")
    validate_network(spec.network)
    if spec.restart not in RESTART_POLICIES:
        raise UsageError(f"unknown restart policy {spec.restart!r}",
                         hint=f"choose one of: {', '.join(RESTART_POLICIES)}")
    for item in spec.env:
        key, sep, _ = item.partition("=")
        if not sep or not _ENV_KEY.fullmatch(key):
            raise UsageError(f"invalid --env {item!r}", hint="use KEY=VALUE")
    if spec.hostname and not _HOSTNAME.fullmatch(spec.hostname):
        raise UsageError(f"invalid hostname {spec.hostname!r}")
    validate_attachments(spec.disks)
    validate_ports(spec.ports, spec.network)
    for command in spec.setup:
        if not command.strip():
            raise UsageError("--setup needs a command; it was empty")


def default_hostname(name: str) -> str:
    """A valid hostname derived from a workspace name."""
    cleaned = re.sub(r"[^A-Za-z0-9-]", "-", name).strip("-")[:63].strip("-")
    return cleaned or "workspace"


def create_workspace(layout: StateLayout, spec: WorkspaceSpec, *,
                     progress: Progress | None = None) -> Workspace:
    """Pull the image if needed, build the root disk and record the workspace."""
    from microagent.references import parse_image_source

    validate_spec(spec)
    parse_image_source(spec.image)  # a bad reference is a usage error before anything is written
    from microagent.images import ensure_base_disk, ensure_image
    from microagent.rootfs import copy_disk

    progress = progress or NullProgress()
    from microagent.attachments import check_sources, new_volumes

    check_sources(spec.disks, work_dir=ensure_dir(layout.tmp_dir), progress=progress)
    with _workspace_lock(layout, spec.name):
        if layout.workspace_dir(spec.name).exists():
            raise ConflictError(f"workspace {spec.name} already exists",
                                hint=f"delete it first (microagent delete {spec.name}) "
                                "or pick another name")
        image = ensure_image(layout, spec.image, progress=progress)
        base = ensure_base_disk(layout, image, spec.resources.disk_mib, progress=progress)
        # the seed page: create installs the default kernel if it is missing
        from microagent.kernels import default_kernel

        default_kernel(layout, install_if_missing=True)
        ensure_dir(layout.workspaces_dir)
        staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{spec.name}-",
                                        dir=layout.workspaces_dir))
        try:
            progress.step("Copying root disk")
            copy_disk(base, staging / layout.workspace_rootfs(spec.name).name)
            write_json_atomic(staging / "workspace.json", _record(spec, image))
            if spec.setup:
                from microagent.provision import SetupState, write_setup

                write_setup(staging / layout.workspace_setup(spec.name).name,
                            SetupState(spec.setup, pending=True))
            append_event(staging / "events.jsonl", "prepared", f"created from {image.reference}")
            with new_volumes(layout, spec.disks, progress):  # deleted again on failure
                os.rename(staging, layout.workspace_dir(spec.name))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return get_workspace(layout, spec.name)


def _record(spec: WorkspaceSpec, image: Image) -> dict[str, Any]:
    return {
        "name": spec.name,
        "created": now_iso(),
        "image": {
            "reference": image.reference,
            "digest": image.digest,
            "config_digest": image.config_digest,
            "config": image.config.to_json(),
        },
        "resources": {
            "profile": spec.resources.profile,
            "memory_mib": spec.resources.memory_mib,
            "cpus": spec.resources.cpus,
            "disk_mib": spec.resources.disk_mib,
        },
        "backend": spec.backend,
        "network": spec.network,
        "restart": spec.restart,
        "env": list(spec.env),
        "hostname": spec.hostname or default_hostname(spec.name),
        "disks": [disk.to_json() for disk in spec.disks],
        "ports": [port.to_json() for port in spec.ports],
    }


def get_workspace(layout: StateLayout, name: str) -> Workspace:
    """Load one workspace, or raise NotFoundError."""
    from microagent.manifests import ImageConfig

    validate_name(name)
    try:
        record = read_json(layout.workspace_record(name))
    except FileNotFoundError:
        raise NotFoundError(f"no workspace named {name}",
                            hint="`microagent list` shows the saved workspaces") from None
    from microagent.runtime import runtime_state

    runtime = runtime_state(layout, name)
    res = record["resources"]
    return Workspace(
        name=record["name"],
        state=runtime.state,
        image=record["image"]["reference"],
        image_digest=record["image"]["digest"],
        image_config=ImageConfig.from_json(record["image"]["config"]),
        resources=Resources(res["profile"], res["memory_mib"], res["cpus"], res["disk_mib"]),
        backend=record["backend"],
        network=record["network"],
        restart=record["restart"],
        env=tuple(record.get("env", ())),
        hostname=record.get("hostname", ""),
        created=record["created"],
        rootfs=layout.workspace_rootfs(name),
        last_event=runtime.event,
        disks=tuple(Attachment.from_json(d) for d in record.get("disks", ())),
        ports=tuple(PublishedPort.from_json(p) for p in record.get("ports", ())),
    )


def list_workspaces(layout: StateLayout) -> list[Workspace]:
    """Every saved workspace, by name."""
    if not layout.workspaces_dir.is_dir():
        return []
    names = sorted(p.name for p in layout.workspaces_dir.iterdir()
                   if not p.name.startswith(".") and (p / "workspace.json").is_file())
    workspaces = []
    for name in names:
        with contextlib.suppress(NotFoundError):
            workspaces.append(get_workspace(layout, name))
    return workspaces


def delete_workspace(layout: StateLayout, name: str) -> bool:
    """Remove a workspace's record and disk; False when there was no such workspace."""
    validate_name(name)
    with _workspace_lock(layout, name):
        directory = layout.workspace_dir(name)
        if not directory.exists():
            return False
        from microagent.runtime import runtime_state

        runtime = runtime_state(layout, name)
        if runtime.has_live_process or runtime.state in ("starting", "running", "halting",
                                                         "quarantined"):
            pid = runtime.vmm_pid or runtime.supervisor_pid
            raise ConflictError(
                f"workspace {name} is {runtime.state}"
                + (f" (VM process {pid})" if pid else "")
                + ": halt, stop, or kill it first")
        # Rename first so that the workspace disappears at once, whole.
        doomed = directory.with_name(f"{_DELETING_PREFIX}{name}-{os.getpid()}")
        os.rename(directory, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return True


def _workspace_lock(layout: StateLayout, name: str) -> contextlib.AbstractContextManager[None]:
    return file_lock(layout.lock_file("workspace", name), what=f"workspace {name}")
