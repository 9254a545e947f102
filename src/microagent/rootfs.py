"""Root disks: an image's layers as a sparse ext4 file, and per-workspace copies of it.

:func:`build_root_disk` stages the layers (:mod:`microagent.layers`), checks the disk is
big enough before any mkfs runs, builds the file system (:mod:`microagent.ext4`) in a
temporary file next to ``dest`` and renames it into place: a failure leaves nothing at
``dest`` and no staging behind. Neither root nor loop mounts are needed.

:func:`copy_disk` gives a workspace its own disk: a reflink where the file system can
share blocks, else a copy of the data regions only, keeping the holes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from microagent import ext4
from microagent.errors import DiskTooSmallError, HostError
from microagent.layers import LayerFile, apply_layers
from microagent.staging import Staged, stage_dir, stage_file
from microagent.store import ensure_dir, fsync_dir

MIB = 1 << 20
_FICLONE = 0x40049409
_SIZE_HINT = "use --size-mib with at least that, or a bigger --profile"


def build_root_disk(
    layers: Sequence[LayerFile],
    dest: Path,
    *,
    size_mib: int | None,
    work_dir: Path,
    on_step: Callable[[str], None] | None = None,
    label: str = "rootfs",
) -> None:
    """Build the ext4 root disk of ``layers`` at ``dest``, ``size_mib`` MiB, sparse.

    ``size_mib=None`` sizes the disk to fit the tree with a margin (bundle disks).

    ``work_dir`` holds the staging tree meanwhile (same file system as ``dest`` is best).
    ``on_step`` is told about each step. Raises DiskTooSmallError (before running mkfs
    when the tree is known not to fit), UnsafeImageError and IntegrityError from the
    layers, HostError when e2fsprogs is missing or fails.
    """
    step = on_step or (lambda _message: None)
    tools = ext4.find_tools()
    ensure_dir(work_dir)
    ensure_dir(dest.parent)
    staged = stage_dir(work_dir, "rootfs-")  # locked: a killed build's is swept later
    staging = staged.path
    image: Staged | None = None
    try:
        tree_dir, scratch = staging / "tree", staging / "scratch"
        tree_dir.mkdir(mode=0o700)
        scratch.mkdir(mode=0o700)
        step(f"applying {len(layers)} layer{'s' if len(layers) != 1 else ''}")
        tree = apply_layers(layers, tree_dir)
        needed = ext4.measure_tree(tree)
        minimum = ext4.minimum_size_mib(needed)
        if size_mib is None:
            size_mib = minimum + max(16, minimum // 10)
        if size_mib < minimum:
            raise _too_small(minimum, size_mib)
        image = stage_file(dest.parent, f".{dest.name}.", ".tmp")
        os.ftruncate(image.fd, size_mib * MIB)
        step(f"creating the ext4 file system ({size_mib} MiB)")
        try:
            ext4.make_filesystem(tools, tree_dir, image.path, label=label,
                                 inodes=ext4.inode_count(size_mib, needed))
        except DiskTooSmallError as e:  # the estimate was short: ask for a safe margin more
            raise _too_small(max(minimum, size_mib) + max(16, size_mib // 10), size_mib,
                             f" ({e.message})") from e
        step("setting owners, modes and devices")
        ext4.fix_inodes(tools, image.path, tree, scratch)
        os.fsync(image.fd)
        image.replace(dest)
        fsync_dir(dest.parent)
    except OSError as e:
        raise HostError(f"cannot build the root disk {dest}: {e.strerror or e}") from e
    finally:
        if image is not None:
            image.close()
        staged.close()


def _too_small(minimum: int, size_mib: int, detail: str = "") -> DiskTooSmallError:
    return DiskTooSmallError(
        f"the image needs at least {minimum} MiB of disk, and the disk is {size_mib} MiB"
        f"{detail}", hint=_SIZE_HINT)


def copy_disk(src: Path, dst: Path) -> None:
    """Copy the disk ``src`` to ``dst``: a reflink if possible, else sparse; atomic."""
    ensure_dir(dst.parent)
    try:
        src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise HostError(f"cannot read the disk {src}: {e.strerror}") from e
    tmp: str | None = None
    try:
        dst_fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
        try:
            if not _reflink(src_fd, dst_fd):
                _sparse_copy(src_fd, dst_fd)
            os.fchmod(dst_fd, 0o600)
            os.fsync(dst_fd)  # a crash must not leave a workspace with a half-copied disk
        finally:
            os.close(dst_fd)
        os.replace(tmp, dst)
        tmp = None
        fsync_dir(dst.parent)
    except OSError as e:
        raise HostError(f"cannot copy the disk {src} to {dst}: {e.strerror or e}") from e
    finally:
        os.close(src_fd)
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _reflink(src_fd: int, dst_fd: int) -> bool:
    try:
        fcntl.ioctl(dst_fd, _FICLONE, src_fd)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL,
                       errno.ENOSYS, errno.EPERM):
            return False
        raise
    return True


def _sparse_copy(src_fd: int, dst_fd: int) -> None:
    """Copy the data regions of ``src_fd`` (SEEK_DATA/SEEK_HOLE); holes stay holes."""
    size = os.fstat(src_fd).st_size
    os.ftruncate(dst_fd, size)
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src_fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                return
            raise
        end = os.lseek(src_fd, start, os.SEEK_HOLE)
        _copy_range(src_fd, dst_fd, start, end)
        offset = end


def _copy_range(src_fd: int, dst_fd: int, start: int, end: int) -> None:
    position = start
    while position < end:
        try:
            copied = os.copy_file_range(src_fd, dst_fd, end - position,
                                        offset_src=position, offset_dst=position)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            copied = _copy_slow(src_fd, dst_fd, position, end)
        if copied == 0:
            raise HostError("the disk changed size while it was being copied")
        position += copied


def _copy_slow(src_fd: int, dst_fd: int, position: int, end: int) -> int:
    data = os.pread(src_fd, min(MIB, end - position), position)
    view = memoryview(data)
    done = 0
    while done < len(data):
        done += os.pwrite(dst_fd, view[done:], position + done)
    return len(data)
