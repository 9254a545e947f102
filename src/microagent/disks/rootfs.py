"""Root disks: an image's layers as a sparse ext4 file, and per-workspace copies of it.

:func:`build_root_disk` stages the layers (:mod:`microagent.images.layers`, bounded by the
disk's size as they stream), checks the disk is big enough and the host has the room for
it before any mkfs runs, builds the file system (:mod:`microagent.disks.ext4`) in a temporary
file next to ``dest`` and renames it into place: a failure leaves nothing at ``dest`` and
no staging behind. A host file system that fills up is a HostError that says so, with
the directory and its free space. Neither root nor loop mounts are needed.

:func:`copy_disk` gives a workspace its own disk: a reflink where the file system can
share blocks, else a copy of the data regions only, keeping the holes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from microagent.disks import ext4
from microagent.errors import DiskTooSmallError, HostError
from microagent.images.imagetree import BLOCK_SIZE
from microagent.images.layers import ExtractLimitError, LayerFile, apply_layers
from microagent.staging import Staged, stage_dir, stage_file
from microagent.store import ensure_dir, fsync_dir, no_space_error, write_error

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
    max_mib: int | None = None,
) -> None:
    """Build the ext4 root disk of ``layers`` at ``dest``, ``size_mib`` MiB, sparse.

    ``size_mib=None`` sizes the disk to fit the tree with a margin (bundle disks); the
    content may then take up to ``max_mib`` (ExtractLimitError past it, naming the entry).

    ``work_dir`` holds the staging tree meanwhile (same file system as ``dest`` is best).
    ``on_step`` is told about each step. Raises DiskTooSmallError (as soon as the layers
    are known not to fit, before running mkfs), UnsafeImageError and IntegrityError from
    the layers, HostError when e2fsprogs is missing or fails or the host has no room.
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
        limit = size_mib if size_mib is not None else max_mib
        try:
            tree = apply_layers(layers, tree_dir, max_bytes=limit * MIB if limit else None,
                                measure=size_mib is not None)
        except ExtractLimitError as e:
            if size_mib is None:
                raise
            raise _over_limit(e, size_mib) from None
        needed = ext4.measure_tree(tree)
        minimum = ext4.minimum_size_mib(needed)
        if size_mib is None:
            size_mib = minimum + max(16, minimum // 10)
        if size_mib < minimum:
            raise _too_small(minimum, size_mib)
        # the sparse image takes about its content on the host: known not to fit, say so
        # now rather than after mkfs has filled the host file system
        content = needed.blocks * BLOCK_SIZE
        if shutil.disk_usage(dest.parent).free < content:
            raise no_space_error(f"cannot build the root disk {dest}", dest.parent,
                                 needed=content)
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
        raise write_error(e, f"cannot build the root disk {dest}", dest.parent) from e
    finally:
        if image is not None:
            image.close()
        staged.close()


def _over_limit(e: ExtractLimitError, size_mib: int) -> DiskTooSmallError:
    """The layers went past the disk's size while staging: how much they need, when every
    layer could be read (the most they took at any point counts), else more than it."""
    if e.tree is None:
        return DiskTooSmallError(f"the image needs more than the disk's {size_mib} MiB: "
                                 f"{e.message}", hint=_SIZE_HINT)
    peak = ext4.TreeSize(inodes=e.peak[0], blocks=e.peak[1])
    return _too_small(max(ext4.minimum_size_mib(ext4.measure_tree(e.tree)),
                          ext4.minimum_size_mib(peak)), size_mib)


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
        raise write_error(e, f"cannot copy the disk {src} to {dst}", dst.parent) from e
    finally:
        os.close(src_fd)
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def clone_file(src: Path, dst: Path, *, mode: int = 0o600) -> int:
    """Copy ``src`` to a new ``dst``: a reflink if the file system can, else the data
    regions only (holes stay holes). Not synced: the caller syncs once all its copies are
    made (:func:`sync_file`). Returns the bytes allocated to ``dst``. OSError as it
    comes."""
    src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            if not _reflink(src_fd, dst_fd):
                _sparse_copy(src_fd, dst_fd)
            return os.fstat(dst_fd).st_blocks * 512
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)


def fill_file(src: Path, dst: Path) -> None:
    """Copy the data regions of ``src`` into the existing ``dst`` of the same size (a
    RAM file QEMU has already mapped: it reads it only once told to)."""
    src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dst_fd = os.open(dst, os.O_WRONLY | os.O_CLOEXEC)
        try:
            _sparse_copy(src_fd, dst_fd)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)


def sync_file(path: Path) -> None:
    """fsync ``path``'s data."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
            copied = _copy_between_file_systems(src_fd, dst_fd, position, end)
        if copied == 0:
            raise HostError("the disk changed size while it was being copied")
        position += copied


def _copy_between_file_systems(src_fd: int, dst_fd: int, position: int, end: int) -> int:
    """sendfile (in the kernel; twice as fast as reading and writing 1 MiB at a time
    from ext4 into tmpfs, measured), else read and write."""
    try:
        os.lseek(dst_fd, position, os.SEEK_SET)
        return os.sendfile(dst_fd, src_fd, position, end - position)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        return _copy_slow(src_fd, dst_fd, position, end)


def _copy_slow(src_fd: int, dst_fd: int, position: int, end: int) -> int:
    data = os.pread(src_fd, min(MIB, end - position), position)
    view = memoryview(data)
    done = 0
    while done < len(data):
        done += os.pwrite(dst_fd, view[done:], position + done)
    return len(data)
