"""Every on-disk name microagent uses, in one place.

The state directory (default ``~/.microagent``, else ``MICROAGENT_HOME`` or
``--state-dir``) holds::

    images/blobs/sha256/<hex>   content-addressed blobs: manifests, configs, layers
    images/index.json           image references pulled, with their digests
    images/disks/<key>-<N>m.ext4  base root disks, by Image.disk_key and size
    kernels/<version>/          kernel bundles (vmlinuz, vmlinux, modules.cpio, kernel.json)
    kernels/default.json        which bundle is the default
    kernels/by-digest/<hex>/    workspaces' own kernels (create --kernel), by content
    volumes/<name>.ext4         named volumes, with their records volumes/<name>.json
    workspaces/<name>/          workspace.json, rootfs.ext4, events.jsonl, serial.log
                                (+ .1), serial.previous.log (+ .1: the boot before the
                                last), supervisor.log, bundles/ (built bundle disks),
                                snapshots/<tag>/ (state/snapshots.py), resume/ (the
                                memory the next start resumes from: suspend, a fork),
                                run/ (see RunFiles)
    locks/                      lock files (outlive the directories they protect)
    tmp/                        staging; same file system, so renames are atomic

Directories are 0700 and files 0600 whatever the umask (``store.py``); processes that
create files there (the supervisor, QEMU, e2fsprogs) run with :data:`PRIVATE_UMASK`.
Staging entries and their sweep: ``staging.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

STATE_DIR_ENV = "MICROAGENT_HOME"
PRIVATE_UMASK = 0o077


def default_state_dir() -> Path:
    """``$MICROAGENT_HOME`` if set, else ``~/.microagent``."""
    env = os.environ.get(STATE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".microagent"


@dataclass(frozen=True)
class StateLayout:
    """Paths inside one state directory. Pure: nothing here touches the disk."""

    root: Path

    @classmethod
    def resolve(cls, state_dir: Path | str | None = None) -> StateLayout:
        """The layout for ``state_dir``, or for the default state directory."""
        root = Path(state_dir).expanduser() if state_dir else default_state_dir()
        return cls(root.absolute())

    # images
    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def blobs_dir(self) -> Path:
        return self.images_dir / "blobs" / "sha256"

    def blob_path(self, digest: str) -> Path:
        """Where the blob ``sha256:<hex>`` lives once verified."""
        return self.blobs_dir / digest.split(":", 1)[1]

    @property
    def image_index(self) -> Path:
        return self.images_dir / "index.json"

    @property
    def base_disks_dir(self) -> Path:
        return self.images_dir / "disks"

    def base_disk(self, key: str, disk_mib: int) -> Path:
        """The cached base root disk of an image (``Image.disk_key``) at one size."""
        return self.base_disks_dir / f"{key.split(':', 1)[1]}-{disk_mib}m.ext4"

    # kernels and volumes
    @property
    def kernels_dir(self) -> Path:
        return self.root / "kernels"

    @property
    def own_kernels_dir(self) -> Path:
        """Bundles of ``create --kernel``, named by :func:`kernels.bundle_digest`."""
        return self.kernels_dir / "by-digest"

    @property
    def volumes_dir(self) -> Path:
        return self.root / "volumes"

    def volume_disk(self, name: str) -> Path:
        """The ext4 image of the named volume ``name``."""
        return self.volumes_dir / f"{name}.ext4"

    def volume_record(self, name: str) -> Path:
        return self.volumes_dir / f"{name}.json"

    def volume_hold(self, name: str) -> Path:
        """Held (flock) by the supervisor of the one running workspace using the volume;
        it holds that workspace's name."""
        return self.lock_file("volume-hold", name)

    # workspaces
    @property
    def workspaces_dir(self) -> Path:
        return self.root / "workspaces"

    def workspace_dir(self, name: str) -> Path:
        return self.workspaces_dir / name

    def workspace_record(self, name: str) -> Path:
        return self.workspace_dir(name) / "workspace.json"

    def workspace_rootfs(self, name: str) -> Path:
        return self.workspace_dir(name) / "rootfs.ext4"

    def workspace_events(self, name: str) -> Path:
        return self.workspace_dir(name) / "events.jsonl"

    def workspace_setup(self, name: str) -> Path:
        """``--setup`` commands and whether they still have to run (``provision.py``)."""
        return self.workspace_dir(name) / "setup.json"

    def workspace_serial_log(self, name: str) -> Path:
        return self.workspace_dir(name) / "serial.log"

    def workspace_run_dir(self, name: str) -> Path:
        """Runtime files of a running workspace; see :class:`RunFiles`."""
        return self.workspace_dir(name) / "run"

    def workspace_bundles_dir(self, name: str) -> Path:
        """The workspace's bundle disks, one per bundle, by archive content (bundles.py)."""
        return self.workspace_dir(name) / "bundles"

    def workspace_snapshots_dir(self, name: str) -> Path:
        """``snapshots/<tag>/``: memory, device state, disks, manifest (state/snapshots.py)."""
        return self.workspace_dir(name) / "snapshots"

    def workspace_resume_dir(self, name: str) -> Path:
        """The memory image the next ``start`` resumes from (``suspend``, a fork's first
        start), laid out as a snapshot; removed once resumed."""
        return self.workspace_dir(name) / "resume"

    def workspace_supervisor_log(self, name: str) -> Path:
        return self.workspace_dir(name) / "supervisor.log"

    def run_files(self, name: str) -> RunFiles:
        return RunFiles(self.workspace_run_dir(name))

    # locks and staging
    @property
    def locks_dir(self) -> Path:
        return self.root / "locks"

    def lock_file(self, kind: str, name: str) -> Path:
        """The lock of one object, e.g. ``lock_file("workspace", "research")``."""
        return self.locks_dir / f"{kind}-{name}.lock"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def qemu_record(self) -> Path:
        """The installed QEMU's version, asked again only when its binary changes."""
        return self.root / "host-qemu.json"

    @property
    def tsc_record(self) -> Path:
        """The host's TSC frequency, measured once per host boot (TCG's clock hint)."""
        return self.root / "host-tsc.json"


@dataclass(frozen=True)
class RunFiles:
    """The files of one running workspace, in ``workspaces/<name>/run/``.

    The supervisor works with this directory as its current directory and names its
    sockets relative to it, so a long state directory never exceeds the ~107-byte limit
    of Unix socket addresses (clients connect through ``/proc/self/fd``).
    """

    dir: Path

    @property
    def lock(self) -> Path:
        """Held (flock) by the supervisor for its whole life: the liveness signal."""
        return self.dir / "supervisor.lock"

    @property
    def status(self) -> Path:
        """The supervisor's runtime record: pids, readiness, boot times."""
        return self.dir / "status.json"

    @property
    def initramfs(self) -> Path:
        return self.dir / "boot.cpio"

    @property
    def vmm_log(self) -> Path:
        return self.dir / "vmm.log"

    @property
    def network_log(self) -> Path:
        """What the network's helper (passt) said, every boot's."""
        return self.dir / "passt.log"

    @property
    def resume_order(self) -> Path:
        """What the supervisor's first boot resumes from instead of booting (written by
        ``start``; vm/launch.py)."""
        return self.dir / "resume.json"

    def bundle_disk(self, name: str) -> Path:
        """This boot's copy of the rw bundle ``name``'s disk (a fresh one at each boot)."""
        return self.dir / f"bundle-{name}.ext4"

    control_socket = "control.sock"
