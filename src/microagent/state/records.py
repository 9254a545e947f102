"""The workspace verbs: create, list, get, delete.

A workspace is a directory ``workspaces/<name>/`` holding its desired state
(``workspace.json``), its own root disk (``rootfs.ext4``, a copy of the image's cached base
disk) and its event history. ``create`` assembles all of it in a hidden staging directory
and renames it into place at the end, so a failed or interrupted create leaves nothing.
The state shown to users is derived from the record and the last event; a workspace
whose record cannot be read is shown as ``broken`` with the reason, and can be deleted.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microagent.config import Resources, check_fits_host, resolve_resources, validate_name
from microagent.disks.attachments import Attachment, validate_attachments
from microagent.errors import ConflictError, MicroagentError, NotFoundError, UsageError
from microagent.events import Event, append_event, now_iso
from microagent.layout import StateLayout
from microagent.network import PublishedPort, validate_network, validate_ports
from microagent.progress import NullProgress, Progress
from microagent.staging import remove_whole, stage_dir, sweep_abandoned
from microagent.store import ensure_dir, file_lock, read_json, write_json_atomic

if TYPE_CHECKING:
    from microagent.images.catalog import Image
    from microagent.images.manifests import ImageConfig

BACKENDS = ("qemu",)
RESTART_POLICIES = ("never", "on-failure", "always")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_STAGING_PREFIX = ".new-"
_DELETING_PREFIX = ".deleting-"
BROKEN = "broken"  # the state of a workspace whose record cannot be read


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
    kernel: str = ""  # --kernel PATH: the workspace's own kernel (ownkernels.py)


@dataclass(frozen=True)
class OwnKernel:
    """The kernel a workspace boots instead of the default (``create --kernel``)."""

    digest: str  # of its bundle in kernels/by-digest/ (ownkernels.bundle_digest)
    version: str
    source: str  # the PATH it came from

    def to_json(self) -> dict[str, str]:
        """The record's shape (also ``--json``)."""
        return {"digest": self.digest, "version": self.version, "source": self.source}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> OwnKernel:
        """Inverse of :meth:`to_json`."""
        return cls(str(doc["digest"]), str(doc["version"]), str(doc["source"]))


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
    own_kernel: OwnKernel | None = None  # None: the default kernel at each start
    error: str = ""  # why the record cannot be read (state ``broken``)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` shape of one workspace."""
        if self.error:
            return {"name": self.name, "state": self.state, "error": self.error,
                    "backend": None, "profile": None, "network": None, "restart": None,
                    "image": None, "image_digest": None, "resources": None, "hostname": None,
                    "env": [], "created": None, "rootfs": str(self.rootfs), "disks": [],
                    "ports": []}
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
            "own_kernel": self.own_kernel.to_json() if self.own_kernel else None,
        }


def validate_spec(spec: WorkspaceSpec) -> None:
    """Refuse a bad spec before anything is written."""
    validate_name(spec.name)
    check_fits_host(spec.resources)
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
    from microagent.images.references import parse_image_source

    validate_spec(spec)
    parse_image_source(spec.image)  # a bad reference is a usage error before anything is written
    if spec.kernel:
        from microagent.kernel.ownkernels import check_kernel_path

        check_kernel_path(Path(spec.kernel))  # missing or not a kernel: before anything
    from microagent.disks.basedisks import ensure_base_disk
    from microagent.disks.rootfs import copy_disk
    from microagent.images.catalog import ensure_image

    progress = progress or NullProgress()
    from microagent.disks.attachments import check_sources, new_volumes

    built = check_sources(spec.disks, work_dir=ensure_dir(layout.tmp_dir), progress=progress)
    own_kernel = None
    if spec.kernel:  # before the image is pulled: a kernel without its modules is refused
        from microagent.kernel.ownkernels import bundle_digest, install_own_kernel

        bundle = install_own_kernel(layout, Path(spec.kernel), progress)
        own_kernel = OwnKernel(bundle_digest(bundle), bundle.version,
                               str(Path(spec.kernel).expanduser().absolute()))
    with built, _workspace_lock(layout, spec.name):
        sweep_abandoned(layout)  # what a killed create left behind (staging.py)
        if layout.workspace_dir(spec.name).exists():
            raise ConflictError(f"workspace {spec.name} already exists",
                                hint=f"delete it first (microagent delete {spec.name}) "
                                "or pick another name")
        image = ensure_image(layout, spec.image, progress=progress)
        base = ensure_base_disk(layout, image, spec.resources.disk_mib, progress=progress)
        if own_kernel is None:  # the seed page: create installs the default kernel if missing
            from microagent.kernel.kernels import default_kernel

            default_kernel(layout, install_if_missing=True)
        ensure_dir(layout.workspaces_dir)
        with stage_dir(layout.workspaces_dir, f"{_STAGING_PREFIX}{spec.name}-") as staged:
            staging = staged.path
            progress.step("Copying root disk")
            copy_disk(base, staging / layout.workspace_rootfs(spec.name).name)
            built.adopt(staging / layout.workspace_bundles_dir(spec.name).name)
            write_json_atomic(staging / "workspace.json", _record(spec, image, own_kernel))
            if spec.setup:
                from microagent.state.setup import SetupState, write_setup

                write_setup(staging / layout.workspace_setup(spec.name).name,
                            SetupState(spec.setup, pending=True))
            append_event(staging / "events.jsonl", "prepared", f"created from {image.reference}")
            with new_volumes(layout, spec.disks, progress):  # deleted again on failure
                staged.replace(layout.workspace_dir(spec.name))
    return get_workspace(layout, spec.name)


def _record(spec: WorkspaceSpec, image: Image, own_kernel: OwnKernel | None) -> dict[str, Any]:
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
        **({"kernel": own_kernel.to_json()} if own_kernel else {}),
    }


class BrokenWorkspaceError(MicroagentError):
    """The workspace's record cannot be read (truncated, not JSON, fields missing).

    ``workspace`` is what ``list`` and ``status`` show for it: state ``broken``, the
    reason in ``error``.
    """

    kind = "broken"

    def __init__(self, workspace: Workspace) -> None:
        super().__init__(f"workspace {workspace.name} is broken: {workspace.error}",
                         hint=f"delete it (microagent delete {workspace.name}), or restore "
                              "its workspace.json")
        self.workspace = workspace


def get_workspace(layout: StateLayout, name: str) -> Workspace:
    """Load one workspace; NotFoundError, or BrokenWorkspaceError for an unreadable record."""
    validate_name(name)
    path = layout.workspace_record(name)
    try:
        record = read_json(path)
    except FileNotFoundError:
        raise NotFoundError(f"no workspace named {name}",
                            hint="`microagent list` shows the saved workspaces") from None
    except MicroagentError as e:
        raise BrokenWorkspaceError(_broken(layout, name, e.message)) from e
    try:
        return _from_record(layout, name, record)
    except KeyError as e:
        raise BrokenWorkspaceError(_broken(layout, name, f"record {path} has no field "
                                                         f"{e.args[0]!r}")) from e
    except (TypeError, ValueError, AttributeError, MicroagentError) as e:
        detail = e.message if isinstance(e, MicroagentError) else f"{type(e).__name__}: {e}"
        raise BrokenWorkspaceError(_broken(layout, name, f"record {path} is malformed: "
                                                         f"{detail}")) from e


def _from_record(layout: StateLayout, name: str, record: dict[str, Any]) -> Workspace:
    from microagent.images.manifests import ImageConfig
    from microagent.state.runtime import runtime_state

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
        own_kernel=OwnKernel.from_json(record["kernel"]) if record.get("kernel") else None,
    )


def _broken(layout: StateLayout, name: str, error: str) -> Workspace:
    from microagent.images.manifests import ImageConfig
    from microagent.state.runtime import runtime_state

    return Workspace(
        name=name, state=BROKEN, image="", image_digest="", image_config=ImageConfig(),
        resources=Resources("-", 0, 0, 0), backend="-", network="-", restart="-", env=(),
        hostname="", created="", rootfs=layout.workspace_rootfs(name),
        last_event=runtime_state(layout, name).event, error=error)


def require_workspace(layout: StateLayout, name: str) -> None:
    """NotFoundError unless ``name`` has a record (a broken one will do: the verbs that
    only talk to its processes, halt, stop and kill, still work on it)."""
    validate_name(name)
    if not layout.workspace_record(name).is_file():
        raise NotFoundError(f"no workspace named {name}",
                            hint="`microagent list` shows the saved workspaces")


def list_workspaces(layout: StateLayout) -> list[Workspace]:
    """Every saved workspace, by name; those whose record cannot be read as ``broken``."""
    if not layout.workspaces_dir.is_dir():
        return []
    names = sorted(p.name for p in layout.workspaces_dir.iterdir()
                   if not p.name.startswith(".") and (p / "workspace.json").is_file())
    workspaces = []
    for name in names:
        try:
            workspaces.append(get_workspace(layout, name))
        except BrokenWorkspaceError as e:
            workspaces.append(e.workspace)
        except (NotFoundError, UsageError):  # gone meanwhile, or not a name we make
            continue
    return workspaces


def delete_workspace(layout: StateLayout, name: str) -> bool:
    """Remove a workspace's record and disk; False when there was no such workspace."""
    validate_name(name)
    with _workspace_lock(layout, name):
        directory = layout.workspace_dir(name)
        if not directory.exists():
            return False
        from microagent.state.runtime import runtime_state

        runtime = runtime_state(layout, name)
        if runtime.has_live_process or runtime.state in ("starting", "running", "halting",
                                                         "quarantined"):
            pid = runtime.vmm_pid or runtime.supervisor_pid
            raise ConflictError(
                f"workspace {name} is {runtime.state}"
                + (f" (VM process {pid})" if pid else "")
                + ": halt, stop, or kill it first")
        remove_whole(directory, directory.with_name(f"{_DELETING_PREFIX}{name}-{os.getpid()}"))
        sweep_abandoned(layout)
    return True


def _workspace_lock(layout: StateLayout, name: str) -> contextlib.AbstractContextManager[None]:
    return file_lock(layout.lock_file("workspace", name), what=f"workspace {name}")
