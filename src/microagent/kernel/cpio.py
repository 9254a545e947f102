"""A pure ``newc`` cpio writer, for the guest's initramfs (kernel/initramfs.py) and the
kernel bundles' ``modules.cpio`` (kernel/kernels.py).

The format is the "new ASCII" cpio (``070701``) the kernel reads (see the kernel's
``Documentation/driver-api/early-userspace/buffer-format.rst``): a 110-byte header of
hex fields, the NUL-terminated name, the data, each padded to 4 bytes, and a
``TRAILER!!!`` entry at the end. The kernel does not create missing parent directories,
so :func:`write_cpio` adds them before their first child.
"""

from __future__ import annotations

import dataclasses
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
HEADER_SIZE = 110


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. ``name`` is relative (no leading ``/``); ``mode`` includes the
    file type bits; ``data`` is a file's content or a symlink's target."""

    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    rdev: tuple[int, int] = (0, 0)


def directory(name: str, mode: int = 0o755) -> CpioEntry:
    """A directory entry."""
    return CpioEntry(_clean(name), stat.S_IFDIR | mode)


def regular_file(name: str, data: bytes, mode: int = 0o644) -> CpioEntry:
    """A regular file with ``data`` as its content."""
    return CpioEntry(_clean(name), stat.S_IFREG | mode, data)


def symlink(name: str, target: str) -> CpioEntry:
    """A symbolic link to ``target``."""
    return CpioEntry(_clean(name), stat.S_IFLNK | 0o777, target.encode())


def char_device(name: str, major: int, minor: int, mode: int = 0o600) -> CpioEntry:
    """A character device node (the kernel creates it while unpacking)."""
    return CpioEntry(_clean(name), stat.S_IFCHR | mode, rdev=(major, minor))


def _clean(name: str) -> str:
    """``name`` without a leading ``/`` or ``.`` parts; ``..`` is refused."""
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"invalid cpio member name {name!r}")
    return "/".join(parts)


def _header(entry: CpioEntry, ino: int, name: bytes) -> bytes:
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (
        ino, entry.mode, entry.uid, entry.gid, nlink, entry.mtime, len(entry.data),
        0, 0, entry.rdev[0], entry.rdev[1], len(name) + 1, 0,
    )
    return MAGIC + b"".join(b"%08X" % value for value in fields)


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _write_member(out: BinaryIO, entry: CpioEntry, ino: int) -> None:
    name = entry.name.encode()
    header = _header(entry, ino, name)
    out.write(header + name + b"\0" + _pad(HEADER_SIZE + len(name) + 1))
    out.write(entry.data + _pad(len(entry.data)))


def write_cpio(entries: Iterable[CpioEntry], out: BinaryIO) -> None:
    """Write ``entries`` as one newc archive (with its trailer) to ``out``.

    Parent directories missing from ``entries`` are added (mode 0755) before their first
    child; a name given twice is refused, since the kernel would keep only the last.
    """
    seen: set[str] = set()
    ino = 1
    for entry in entries:
        entry = dataclasses.replace(entry, name=_clean(entry.name))
        if entry.name in seen:
            raise ValueError(f"duplicate cpio member {entry.name!r}")
        parts = entry.name.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent not in seen:
                seen.add(parent)
                _write_member(out, directory(parent), ino)
                ino += 1
        seen.add(entry.name)
        _write_member(out, entry, ino)
        ino += 1
    trailer = CpioEntry(TRAILER, 0)
    _write_member(out, trailer, 0)


def append_cpio(parts: Iterable[Path], out: BinaryIO) -> None:
    """Concatenate finished archives (each with its own trailer) onto ``out``.

    The kernel unpacks concatenated archives in order, later members replacing earlier
    ones; every archive is a multiple of 4 bytes long, as the next header must be aligned.
    """
    for part in parts:
        with part.open("rb") as f:
            while chunk := f.read(1 << 20):
                out.write(chunk)
