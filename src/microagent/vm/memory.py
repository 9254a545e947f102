"""Guest RAM in a shared file, so that a snapshot is the device state plus a file copy.

Every boot backs the guest's RAM with ``<shm>/microagent-<uid>/<key>-<name>.mem``
(``memory-backend-file,share=on``): a snapshot stops the vCPUs, saves only the device
state (QEMU's ``x-ignore-shared``: ~80 KB in ~20 ms) and copies the file's touched pages;
a restore copies them back and loads the device state. ``<shm>`` is ``/dev/shm`` (or
``MICROAGENT_SHM_DIR``): a tmpfs, so the RAM never goes through a disk. When it has no
room for the whole memory the boot falls back to anonymous RAM, and that boot cannot be
snapshotted (the supervisor says so when asked). The whole memory of the guests already
running counts as taken (:func:`_promised`): a tmpfs that fills under a running guest
kills its QEMU. Each file is locked for the boot's life by its supervisor and by QEMU,
which inherits the descriptor (a VM outlives a killed supervisor: vm/adopt.py), and
removed when the VM ends; one whose lock is free is removed by the next sweep.
"""

from __future__ import annotations

import contextlib
import fcntl
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


def prepare_memory_file(layout: StateLayout, name: str, memory_mib: int
                        ) -> tuple[Path, int] | None:
    """The RAM file for a boot of ``name``, made now at its full (sparse) size, with a
    descriptor on it that holds an ``flock`` for as long as the boot lives (the caller
    keeps it, QEMU inherits it; the kernel drops the lock when both are gone, however
    they end, and the next :func:`sweep_memory_files` removes the file). None when the shm directory
    cannot hold ``memory_mib`` (the boot then uses anonymous RAM)."""
    path = memory_file(layout, name)
    try:
        _private_dir(path.parent)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # this workspace's last boot's: its supervisor is this one
        sweep_memory_files()
        if room(path.parent) < memory_mib << 20:
            return None
        return path, _create_locked(path, memory_mib << 20)
    except (OSError, HostError):
        return None


def _create_locked(path: Path, size: int) -> int:
    """A new file at ``path`` of ``size`` bytes, locked; made again if a sweep took it
    between its creation and the lock (see staging.py for the same dance)."""
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.ftruncate(fd, size)  # counted whole at once by the next boot's room
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise HostError(f"cannot make {path}: it keeps disappearing")


def release_memory_file(path: Path, fd: int) -> None:
    """The boot is over: its RAM file removed (if it is still ours), the lock dropped."""
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)
    with contextlib.suppress(OSError):
        os.close(fd)


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


def sweep_memory_files() -> None:
    """Remove the RAM files whose lock is free: their supervisor and their QEMU are gone
    (SIGKILLed, or its state directory deleted meanwhile), whatever state
    directory they belonged to. A live boot's file is locked and left alone."""
    with contextlib.suppress(OSError), os.scandir(shm_dir()) as entries:
        for entry in entries:
            if entry.name.endswith(".mem"):
                _sweep_one(Path(entry.path))


def _sweep_one(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)
    except OSError:  # locked (a live boot), or gone meanwhile
        pass
    finally:
        os.close(fd)


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
