"""The guest's initramfs: a pure ``newc`` cpio writer and the boot initramfs.

The kernel unpacks concatenated cpio archives one after the other, so the boot initramfs
is built at every start as the kernel bundle's ``modules.cpio`` followed by a small
archive holding the agent as ``/init``. An upgraded agent therefore takes effect at the
next start without rebuilding anything else.

The format is the "new ASCII" cpio (``070701``) the kernel reads (see the kernel's
``Documentation/driver-api/early-userspace/buffer-format.rst``): a 110-byte header of
hex fields, the NUL-terminated name, the data, each padded to 4 bytes, and a
``TRAILER!!!`` entry at the end. The kernel does not create missing parent directories,
so :func:`write_cpio` adds them before their first child.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from microagent.kernels import KernelBundle

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
HEADER_SIZE = 110
AGENT_PATH = "init"


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


def agent_archive_entries(agent: Path) -> list[CpioEntry]:
    """The small archive that goes after the modules: ``/init`` and its mount points."""
    try:
        data = agent.read_bytes()
    except OSError as e:
        from microagent.errors import HostError

        raise HostError(f"cannot read the guest agent {agent}: {e.strerror}") from e
    return [
        directory("dev"),
        # The kernel opens /dev/console for init's stdio before /init runs.
        char_device("dev/console", 5, 1),
        directory("proc"),
        directory("sys"),
        directory("newroot"),
        regular_file(AGENT_PATH, data, 0o755),
    ]


def build_boot_initramfs(bundle: KernelBundle, agent: Path, out: Path) -> Path:
    """Write ``out``: the bundle's ``modules.cpio`` then an archive with ``agent`` as /init.

    Written to a temporary file next to ``out`` and renamed, so a concurrent reader never
    sees half an initramfs. Returns ``out``.
    """
    from microagent.errors import HostError

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                               0o600), "wb") as f:
            append_cpio([bundle.modules_cpio], f)
            write_cpio(agent_archive_entries(agent), f)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise HostError(f"cannot write the initramfs {out}: {e.strerror or e}") from e
    return out
