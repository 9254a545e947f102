"""``microagent cp`` on a workspace that is not running: its root disk through debugfs.

No mount, no root needed. Reading walks the tree by inode number (``ls -l -p <ino>``, one
debugfs run per tree level, as :mod:`microagent.disks.ext4` fixes a new disk), reads symlink
targets with ``stat``, and ``dump``s every regular file by inode into a private scratch
directory (numbered names only); :class:`~microagent.disks.hostfiles.HostWriter` then puts
each in place. Not ``rdump``: it writes the disk's names as host paths and follows
symlinks on the way, and a disk the guest wrote as root may hold crafted entries.

A disk left with an unreplayed journal (the VM was killed) has it replayed first
(``e2fsck -E journal_only``), as the guest's next mount would.

Writing ``cd``s into each guest directory and creates entries there by their bare name
(debugfs's ``write`` links the name into the current directory as given, ``/`` and all):
``mkdir``, ``write``, ``symlink``, ``mknod p``, then ``sif`` for mode, owner and mtime.
What exists already is listed first, so a file is replaced (``rm`` then ``write``) and a
directory merged, as ``docker cp`` does. Devices and sockets are not copied.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from microagent.disks import ext4
from microagent.disks.hostfiles import HostEntry, HostWriter, Meta, check_name
from microagent.errors import HostError, MicroagentError

_STAT = re.compile(rb"Inode: (\d+)\s+Type: (\w+)\s+Mode:\s+([0-7]+).*?User:\s+(\d+)\s+"
                   rb"Group:\s+(\d+).*?Size: (\d+)", re.S)
_FAST_LINK = b'Fast link dest: "'
_KINDS = {b"regular": "file", b"directory": "dir", b"symlink": "symlink", b"FIFO": "fifo"}


@dataclass(frozen=True)
class DiskEntry:
    """What ``stat`` says of one path of the disk."""

    ino: int
    kind: str  # file, dir, symlink, fifo, or other
    mode: int
    uid: int
    gid: int
    size: int


def replay_journal(image: Path) -> None:
    """Replay the journal of a disk whose VM was killed (``needs_recovery``), as the guest
    kernel would at its next mount: debugfs neither sees nor replays it, and a write made
    before the replay could be overwritten by it."""
    tools = ext4.find_tools()
    dumpe2fs = Path(tools.debugfs).with_name("dumpe2fs")
    e2fsck = Path(tools.debugfs).with_name("e2fsck")
    header = ext4._run([str(dumpe2fs), "-h", str(image)], what="dumpe2fs")
    if b"needs_recovery" not in header.stdout:
        return
    result = ext4._run([str(e2fsck), "-E", "journal_only", "-p", str(image)], what="e2fsck")
    if result.returncode not in (0, 1):
        raise HostError(f"cannot replay the journal of {image} (e2fsck exit "
                        f"{result.returncode}): "
                        f"{result.stderr.decode(errors='replace').strip()[-300:]}")


def stat_path(image: Path, path: str) -> DiskEntry | None:
    """The entry at the absolute guest ``path`` (a final symlink not followed), or None."""
    tools = ext4.find_tools()
    result = ext4._run([tools.debugfs, "-f", "-", str(image)], what="debugfs",
                       stdin=b"stat " + ext4._quote(os.fsencode(path)) + b"\n")
    match = _STAT.search(result.stdout)
    if match is None:
        if b"not found" in result.stderr or b"File not found" in result.stderr:
            return None
        raise HostError(f"debugfs cannot read {image}: "
                        f"{result.stderr.decode(errors='replace').strip()[-300:]}")
    return DiskEntry(int(match[1]), _KINDS.get(match[2], "other"), int(match[3], 8),
                     int(match[4]), int(match[5]), int(match[6]))


def _kind_of(mode: int) -> str:
    return ("dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else
            "symlink" if stat.S_ISLNK(mode) else "fifo" if stat.S_ISFIFO(mode) else "other")


def walk_disk(image: Path, top: DiskEntry) -> list[tuple[tuple[str, ...], DiskEntry]]:
    """``top`` and, for a directory, everything below it, parents first."""
    tools = ext4.find_tools()
    found: list[tuple[tuple[str, ...], DiskEntry]] = [((), top)]
    level: list[tuple[tuple[str, ...], int]] = [((), top.ino)] if top.kind == "dir" else []
    while level:
        listing = ext4._list_dirs(tools, image, [ino for _, ino in level])
        next_level: list[tuple[tuple[str, ...], int]] = []
        for parts, dir_ino in level:
            for name, ino, mode, uid, gid in listing[dir_ino]:
                if name in (b".", b".."):
                    continue
                child = (*parts, check_name(os.fsdecode(name), "/".join(parts)))
                entry = DiskEntry(ino, _kind_of(mode), mode & 0o7777, uid, gid, 0)
                found.append((child, entry))
                if entry.kind == "dir":
                    next_level.append((child, ino))
        level = next_level
    return found


def read_from_disk(image: Path, top: DiskEntry, writer: HostWriter) -> list[str]:
    """Copy ``top`` (and its tree) from the disk into ``writer``; return what was skipped."""
    tools = ext4.find_tools()
    entries = walk_disk(image, top)
    skipped: list[str] = []
    scratch = Path(tempfile.mkdtemp(prefix=".microagent-cp-", dir=writer.parent))
    try:
        dumps = [b"dump <%d> %d" % (e.ino, e.ino) for _, e in entries if e.kind == "file"]
        links = [e.ino for _, e in entries if e.kind == "symlink"]
        targets: dict[int, bytes] = {}
        if links:
            out = ext4._debugfs(tools, image, [b"stat <%d>" % ino for ino in links],
                                write=False)
            targets = _fast_links(out)
            dumps += [b"dump <%d> %d" % (ino, ino) for ino in links if ino not in targets]
        if dumps:
            ext4._debugfs(tools, image, sorted(set(dumps)), write=False, cwd=scratch)
        seen: dict[int, tuple[str, ...]] = {}
        for parts, entry in entries:
            meta = Meta(entry.mode, entry.uid, entry.gid)
            if entry.kind == "dir":
                writer.directory(parts, meta)
            elif entry.kind == "file" and entry.ino in seen and parts:
                writer.hard_link(parts, seen[entry.ino])
            elif entry.kind == "file":
                seen[entry.ino] = parts
                writer.file(parts, _dumped(scratch / str(entry.ino), meta))
            elif entry.kind == "symlink":
                target = targets.get(entry.ino)
                if target is None:
                    target = (scratch / str(entry.ino)).read_bytes()
                writer.symlink(parts, os.fsdecode(target), meta)
            elif entry.kind == "fifo":
                writer.fifo(parts, meta)
            else:
                skipped.append("/".join(parts))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return skipped


def _fast_links(out: bytes) -> dict[int, bytes]:
    """The targets that ``stat <ino>`` printed (the rest are in data blocks: dump them)."""
    targets = {}
    for section in out.split(b"debugfs: stat <")[1:]:
        ino, _, text = section.partition(b">")
        at = text.find(_FAST_LINK)
        if at >= 0 and ino.isdigit():
            value = text[at + len(_FAST_LINK):].rstrip(b"\n")
            targets[int(ino)] = value[:-1] if value.endswith(b'"') else value
    return targets


def _dumped(source: Path, meta: Meta) -> Callable[[int], Meta]:
    """A HostWriter fill that copies the dumped ``source``."""
    return lambda fd: _copy_into(source, fd, meta)


def _copy_into(source: Path, fd: int, meta: Meta) -> Meta:
    with source.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        done = 0
        while done < size:
            copied = os.sendfile(fd, f.fileno(), done, size - done)
            if copied == 0:
                break
            done += copied
    return meta


def write_to_disk(image: Path, entries: Iterable[HostEntry], parent: str, name: str, *,
                  keep_owners: bool) -> tuple[int, int, list[str]]:
    """Create the host ``entries`` as ``parent/name`` on the disk; (files, bytes, skipped).

    ``parent`` is an existing directory of the disk. An existing ``parent/name`` is
    replaced (a file) or merged into (a directory).
    """
    tools = ext4.find_tools()
    existing = _existing(image, f"{parent.rstrip('/')}/{name}")
    commands: list[bytes] = []
    files = size = 0
    skipped: list[str] = []
    cwd: tuple[str, ...] | None = None
    for entry in entries:
        where = (name, *entry.parts)
        if cwd != where[:-1]:
            cwd = where[:-1]
            commands.append(b"cd " + _q("/".join((parent.rstrip("/") or "", *cwd)) or "/"))
        leaf, mode = _q(where[-1]), entry.st.st_mode
        old = existing.get(entry.parts)
        if old is not None and (old == "dir") != stat.S_ISDIR(mode):
            if old == "dir":
                raise MicroagentError(f"cannot overwrite the directory "
                                      f"{parent}/{'/'.join(where)} with a non-directory")
            commands.append(b"rm " + leaf)
            old = None
        if stat.S_ISDIR(mode):
            if old is None:
                commands.append(b"mkdir " + leaf)
        elif stat.S_ISREG(mode):
            if old is not None:
                commands.append(b"rm " + leaf)
            commands.append(b"write " + _q(str(entry.path.absolute())) + b" " + leaf)
            files += 1
            size += entry.st.st_size
        elif stat.S_ISLNK(mode):
            if old is not None:
                commands.append(b"rm " + leaf)
            commands.append(b"symlink " + leaf + b" " + _q(entry.target))
            files += 1
        elif stat.S_ISFIFO(mode):
            if old is not None:
                commands.append(b"rm " + leaf)
            commands.append(b"mknod " + leaf + b" p")
            files += 1
        else:
            skipped.append(str(entry.path))
            continue
        uid, gid = (entry.st.st_uid, entry.st.st_gid) if keep_owners else (0, 0)
        if not stat.S_ISLNK(mode):
            commands.append(b"sif %s mode 0%o" % (leaf, mode))
        commands += [b"sif %s uid %d" % (leaf, uid), b"sif %s gid %d" % (leaf, gid),
                     b"sif %s mtime @%d" % (leaf, int(entry.st.st_mtime))]
    if commands:
        ext4._debugfs(tools, image, commands, write=True)
    return files, size, skipped


def _existing(image: Path, path: str) -> dict[tuple[str, ...], str]:
    """The kinds of what is at ``path`` already, by components below it."""
    top = stat_path(image, path)
    if top is None:
        return {}
    return {parts: entry.kind for parts, entry in walk_disk(image, top)}


def _q(text: str) -> bytes:
    return ext4._quote(os.fsencode(text))

