"""Staging entries, and the sweep of those a killed command left behind.

What microagent builds before it becomes visible (a blob being verified, a root disk
being made, a workspace being assembled) lives under a hidden name until one rename puts
it in place. :func:`stage_file` and :func:`stage_dir` make such an entry and hold an
``flock`` on it for as long as its owner works on it (:class:`Staged`). The kernel drops
the lock when the owner dies, however it dies (SIGKILL included), so a free lock proves
the entry abandoned: :func:`sweep` removes exactly those and never a live command's.
A creator checks, once it holds the lock, that its entry is still there (a sweeper may
have taken the lock in the instant between the creation and the locking) and makes
another if not.

Where staging lives (what :func:`sweep_abandoned` looks at)::

    images/blobs/sha256/.incoming-*   images/blobs.py: a blob being fetched and verified
    images/disks/.*.tmp               disks/rootfs.py: a base disk being built
    tmp/rootfs-*                      disks/rootfs.py: the layers' staging tree
    tmp/bundle-*                      disks/bundles.py: a bundle built on trial at create
    tmp/kernel-*                      kernel/kernels.py, kernel/ownkernels.py: a kernel
                                      package being unpacked
    kernels/.new-*, kernels/.old-*    kernel/kernels.py: a bundle being assembled or replaced
    kernels/by-digest/.new-*          kernel/ownkernels.py: a create --kernel bundle
    workspaces/.new-*                 state/records.py: a workspace being created
    workspaces/NAME/bundles/B/.*.tmp  disks/bundles.py: a bundle disk (swept by its next build)
    workspaces/.deleting-*            state/records.py: a workspace being deleted
    workspaces/NAME/snapshots/.new-*  vm/supervisor.py, state/forks.py: a snapshot or a
                                      resume slot being written; one being deleted

Anything that stages under these names must do it through this module: an entry there
whose lock is free is taken for abandoned. Ctrl-C and SIGTERM are held off for the
instant between an entry's creation and its lock, so that the unwinding they cause
always finds it to remove.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from microagent.errors import HostError
from microagent.layout import StateLayout
from microagent.store import write_error

_ATTEMPTS = 5
_DEFERRED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


class Staged:
    """A staging file or directory, locked while its owner lives.

    A context manager: on exit the entry is removed (a tree with everything in it) unless
    :meth:`replace` moved it into place, then the lock is released. For a file, ``fd`` is
    open read-write on it (do not close it; it holds the lock).
    """

    def __init__(self, path: Path, fd: int, *, is_dir: bool) -> None:
        self.path = path
        self.fd = fd
        self.is_dir = is_dir
        self.placed = False

    def __enter__(self) -> Staged:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def replace(self, target: Path) -> None:
        """Rename the entry over ``target`` (``os.replace``); it is kept from then on."""
        os.replace(self.path, target)
        self.placed = True

    def close(self) -> None:
        """Remove the entry unless it was placed, then release the lock (idempotent)."""
        if self.fd < 0:
            return
        try:
            if not self.placed:
                remove_entry(self.path)
        finally:
            os.close(self.fd)
            self.fd = -1


def stage_file(directory: Path, prefix: str, suffix: str = "") -> Staged:
    """A new empty file ``directory/prefix*suffix``, mode 0600, locked."""
    def make() -> tuple[Path, int]:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
        os.fchmod(fd, 0o600)
        return Path(name), fd
    return _stage(directory, make, is_dir=False)


def stage_dir(directory: Path, prefix: str) -> Staged:
    """A new empty directory ``directory/prefix*``, mode 0700, locked."""
    def make() -> tuple[Path, int]:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=directory))
        os.chmod(path, 0o700)
        return path, os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    return _stage(directory, make, is_dir=True)


def _stage(directory: Path, make: Callable[[], tuple[Path, int]], *, is_dir: bool) -> Staged:
    # Ctrl-C or SIGTERM between the creation and the Staged that removes it would leave
    # the entry behind: they wait until it exists, locked (pthread_sigmask raises a
    # signal that came meanwhile as it unblocks it, and then the entry goes).
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
    try:
        staged = _create_locked(directory, make, is_dir=is_dir)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        raise
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    except BaseException:
        staged.close()
        raise
    return staged


def _create_locked(directory: Path, make: Callable[[], tuple[Path, int]], *,
                   is_dir: bool) -> Staged:
    what = "directory" if is_dir else "file"
    for _ in range(_ATTEMPTS):
        try:
            path, fd = make()
        except FileNotFoundError:
            continue  # swept between mkdtemp and open: make another
        except OSError as e:
            raise write_error(e, f"cannot create a staging {what} in {directory}",
                              directory) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits out a sweeper that is removing it
            mine = os.fstat(fd)
            with contextlib.suppress(FileNotFoundError):
                there = os.stat(path, follow_symlinks=False)
                if (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
                    return Staged(path, fd, is_dir=is_dir)
        except BaseException:
            os.close(fd)
            remove_entry(path)
            raise
        os.close(fd)
    raise HostError(f"cannot create a staging {what} in {directory}: it vanished "
                    f"{_ATTEMPTS} times in a row")


def remove_entry(path: Path) -> None:
    """Remove a file, or a directory and everything in it; nothing if it is gone."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def remove_whole(directory: Path, doomed: Path) -> None:
    """Remove ``directory`` so that it disappears at once, whole: locked, renamed to
    ``doomed`` (a name a sweep looks for), then deleted; swept if the deletion is killed."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(directory, doomed)
    except BaseException:
        os.close(fd)
        raise
    Staged(doomed, fd, is_dir=True).close()


def sweep(directory: Path, prefix: str, suffix: str = "") -> list[Path]:
    """Remove the entries ``directory/prefix*suffix`` whose lock is free (their owner is
    gone); return what was removed. Entries a live owner holds are left alone."""
    try:
        with os.scandir(directory) as it:
            names = [e.name for e in it if e.name.startswith(prefix)
                     and e.name.endswith(suffix)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [directory / name for name in names if _sweep_one(directory / name)]


def _sweep_one(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False  # gone already, or a symlink (never made by a stager)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its owner still works on it
        mine = os.fstat(fd)
        try:
            there = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return False  # its owner put it in place and let go meanwhile
        if (there.st_dev, there.st_ino) != (mine.st_dev, mine.st_ino):
            return False
        remove_entry(path)
        return True
    finally:
        os.close(fd)


def sweep_abandoned(layout: StateLayout) -> list[Path]:
    """Sweep every kind of staging of the state directory (see the module docstring)."""
    places = (
        (layout.blobs_dir, ".incoming-", ""),
        (layout.base_disks_dir, ".", ".tmp"),
        (layout.tmp_dir, "rootfs-", ""),
        (layout.tmp_dir, "bundle-", ""),
        (layout.tmp_dir, "kernel-", ""),
        (layout.kernels_dir, ".new-", ""),
        (layout.kernels_dir, ".old-", ""),
        (layout.own_kernels_dir, ".new-", ""),
        (layout.workspaces_dir, ".new-", ""),
        (layout.workspaces_dir, ".deleting-", ""),
    )
    removed: list[Path] = []
    for directory, prefix, suffix in places:
        removed += sweep(directory, prefix, suffix)
    try:
        with os.scandir(layout.workspaces_dir) as it:
            workspaces = [e.name for e in it if not e.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        workspaces = []
    for name in workspaces:
        removed += sweep(layout.workspace_snapshots_dir(name), ".new-")
    return removed
