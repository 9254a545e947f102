"""Guest RAM in a shared file, so that a snapshot is the device state plus a file copy.

Every boot backs the guest's RAM with ``<shm>/microagent-<uid>/<key>-<name>.mem``
(``memory-backend-file,share=on``): a snapshot stops the vCPUs, saves only the device
state (QEMU's ``x-ignore-shared``: ~80 KB in ~20 ms) and copies the file's touched pages;
a restore copies them back and loads the device state. ``<shm>`` is ``/dev/shm`` (or
``MICROAGENT_SHM_DIR``): a tmpfs, so the RAM never goes through a disk. When it has no
room for the whole memory the boot falls back to anonymous RAM, and that boot cannot be
snapshotted (the supervisor says so when asked). The whole memory of the guests already
running counts as taken (:func:`_promised`): a tmpfs that fills under a running guest
kills its QEMU. The file is removed when the VM ends (and by the next start or a delete,
if a killed supervisor left it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from pathlib import Path

from microagent.errors import HostError
from microagent.layout import StateLayout

SHM_ENV = "MICROAGENT_SHM_DIR"
DEFAULT_SHM = "/dev/shm"


def shm_dir() -> Path:
    """Where guest RAM files live: this user's private directory in the shm tmpfs."""
    base = Path(os.environ.get(SHM_ENV) or DEFAULT_SHM)
    return base / f"microagent-{os.getuid()}"


def memory_file(layout: StateLayout, name: str) -> Path:
    """The RAM file of workspace ``name`` of this state directory."""
    key = hashlib.sha256(str(layout.root).encode()).hexdigest()[:12]
    return shm_dir() / f"{key}-{name}.mem"


def prepare_memory_file(layout: StateLayout, name: str, memory_mib: int) -> Path | None:
    """The RAM file for a boot of ``name``, any leftover removed; None when the shm
    directory cannot hold ``memory_mib`` (the boot then uses anonymous RAM)."""
    path = memory_file(layout, name)
    try:
        _private_dir(path.parent)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sweep_memory_files(layout)
        return path if room(path.parent) >= memory_mib << 20 else None
    except (OSError, HostError):
        return None


def _promised(directory: Path) -> int:
    """What the running guests' RAM files in ``directory`` may still grow by: a tmpfs
    that fills under a guest makes QEMU die of SIGBUS, so a new boot counts their whole
    memory as taken, not only the pages they have touched so far."""
    total = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.endswith(".mem"):
                with contextlib.suppress(OSError):
                    info = entry.stat(follow_symlinks=False)
                    total += max(0, info.st_size - info.st_blocks * 512)
    return total


def room(directory: Path | None = None) -> int:
    """Bytes a new guest's RAM may take in the shm directory: what is free there less what
    the running guests' RAM files may still grow by (:func:`_promised`)."""
    directory = directory or shm_dir()
    return free_bytes(directory) - _promised(directory)


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged writer may still use in ``directory``'s file system."""
    info = os.statvfs(directory)
    return info.f_bavail * info.f_frsize


def allocated_bytes(path: Path) -> int:
    """The bytes ``path`` occupies (its touched pages, for a RAM file)."""
    return os.stat(path).st_blocks * 512


def sweep_memory_files(layout: StateLayout) -> None:
    """Remove the RAM files of this state directory's workspaces whose supervisor is
    gone (SIGKILLed: its QEMU died with it, the file stayed and holds its pages)."""
    from microagent.state.runtime import supervisor_alive

    prefix = memory_file(layout, "x").name[:-len("x.mem")]
    with contextlib.suppress(OSError), os.scandir(shm_dir()) as entries:
        for entry in entries:
            if entry.name.startswith(prefix) and entry.name.endswith(".mem"):
                name = entry.name[len(prefix):-len(".mem")]
                if not supervisor_alive(layout.run_files(name)):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)


def remove_memory_file(layout: StateLayout, name: str) -> None:
    """The RAM file of ``name`` gone (its VM has ended)."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        os.unlink(memory_file(layout, name))


def _private_dir(path: Path) -> None:
    """``path`` a directory of this user's, 0700, not a symlink (the shm tmpfs is
    world-writable: another user could have made the name first)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise HostError(f"{path} is not a directory of this user's")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)
