"""The host side of ``microagent cp``: writing a copied tree without following anything.

:class:`HostWriter` creates one file or directory tree at a destination the user named
(``parent``/``name``). What it writes comes from the guest, which is not trusted: every
path is given as components relative to the destination's top, each component is
checked (no ``..``, no ``/``, not empty), every directory is opened from its parent's fd
with ``O_NOFOLLOW``, and files, symlinks and fifos are created under a temporary name
with ``O_EXCL`` and renamed over the final name (a rename replaces a symlink, it never
follows one). A guest symlink is recreated as a symlink and never entered, so an entry
behind it is refused. A new top directory is built under a hidden name beside the
destination and renamed into place at :meth:`HostWriter.commit`: a failed copy leaves
nothing half-made there. Directory modes are applied last, so read-only directories can
still be filled.

Modes are the source's, less the bits that would hand the host a privilege: setuid and
setgid everywhere, sticky on anything but a directory; the files belong to the host user.
An archive copy (``cp -a``) keeps owners (when the host user may set them, i.e. root) and
every mode bit; where an owner cannot be kept, setuid and setgid go, as GNU ``cp -a`` does.

:func:`host_entries` walks a host source for the other direction, without following
symlinks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from microagent.errors import MicroagentError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeCopyError(MicroagentError):
    """A copied entry would make the host write outside the destination; refused."""

    kind = "unsafe-path"


@dataclass(frozen=True)
class Meta:
    """What a copied entry keeps: permission bits, owner, modification time."""

    mode: int
    uid: int = 0
    gid: int = 0
    mtime_ns: int | None = None


def check_name(name: str, where: str) -> str:
    """``name`` if it is one safe path component, else UnsafeCopyError."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise UnsafeCopyError(f"refusing the entry {where!r}: {name!r} is not a plain name "
                              "(it would write outside the destination)",
                              hint="the source holds a malformed or malicious name")
    return name


_PRIVILEGE_BITS = stat.S_ISUID | stat.S_ISGID
MAX_DEPTH = 256  # as an image's (layers.py): Python 3.11's rmtree recurses per level


def host_mode(mode: int, *, is_dir: bool) -> int:
    """The permission bits a plain (not archive) copy gives the host: setuid and setgid
    dropped, and sticky on anything but a directory."""
    if is_dir:
        return mode & 0o7777 & ~_PRIVILEGE_BITS
    return mode & 0o777


class HostWriter:
    """One copy's output at ``parent/name``; use as a context manager, then commit.

    ``archive``: keep owners and every mode bit (``cp -a``); else the host user owns what
    is written and setuid, setgid (and sticky on files) are dropped.
    """

    def __init__(self, parent: Path, name: str, *, archive: bool) -> None:
        self.parent = parent
        self.name = check_name(name, name)
        self.archive = archive
        self.files = 0
        self.bytes = 0
        try:
            # the parent is the user's own choice: it may be reached through symlinks
            self.parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise MicroagentError(f"no such directory: {parent}") from None
        except OSError as e:
            raise MicroagentError(f"cannot write in {parent}: {e.strerror}") from e
        self.top_fd: int | None = None
        self.staged: str | None = None
        self.fds: dict[tuple[str, ...], int] = {}
        self.dir_meta: list[tuple[tuple[str, ...], Meta]] = []

    def __enter__(self) -> HostWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every fd; drop a staged directory that was not committed."""
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        if self.top_fd is not None:
            os.close(self.top_fd)
            self.top_fd = None
        if self.staged is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.staged, dir_fd=self.parent_fd)
            self.staged = None
        if self.parent_fd >= 0:
            os.close(self.parent_fd)
            self.parent_fd = -1

    def where(self, parts: tuple[str, ...]) -> str:
        return str(self.parent / self.name / "/".join(parts)) if parts else \
            str(self.parent / self.name)

    # --- entries ----------------------------------------------------------------------

    def directory(self, parts: tuple[str, ...], meta: Meta) -> None:
        """Create (or merge into) the directory at ``parts``; its mode is set at commit."""
        if not parts:
            self._open_top()
        else:
            self._dir_fd(parts, create=True)
        self.dir_meta.append((parts, meta))

    def file(self, parts: tuple[str, ...], fill: Callable[[int], Meta]) -> None:
        """A regular file at ``parts``: ``fill(fd)`` writes the content, returns the Meta."""
        pfd, name = self._parent_of(parts)
        tmp = self._temp_name(name)
        fd = os.open(tmp, _NEW_FILE, 0o600, dir_fd=pfd)
        try:
            try:
                self._set_meta_fd(fd, fill(fd))
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            self._replace(pfd, tmp, name, parts)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=pfd)
            raise
        self.files += 1
        self.bytes += size

    def symlink(self, parts: tuple[str, ...], target: str, meta: Meta) -> None:
        """A symlink at ``parts`` pointing at ``target``, verbatim; never followed."""
        if "\0" in target:
            raise UnsafeCopyError(f"refusing the symlink {self.where(parts)}: NUL in target")
        pfd, name = self._parent_of(parts)
        tmp = self._temp_name(name)
        os.symlink(target, tmp, dir_fd=pfd)
        self._set_link_meta(pfd, tmp, meta)
        self._replace(pfd, tmp, name, parts)
        self.files += 1

    def fifo(self, parts: tuple[str, ...], meta: Meta) -> None:
        """A named pipe at ``parts`` (devices are not copied; see copy.py)."""
        pfd, name = self._parent_of(parts)
        tmp = self._temp_name(name)
        os.mkfifo(tmp, 0o600, dir_fd=pfd)
        owned = self._set_link_meta(pfd, tmp, meta)
        os.chmod(tmp, self._mode(meta.mode, is_dir=False, owned=owned), dir_fd=pfd)
        self._replace(pfd, tmp, name, parts)
        self.files += 1

    def hard_link(self, parts: tuple[str, ...], target: tuple[str, ...]) -> None:
        """``parts`` as a hard link to the already copied ``target``."""
        if not target:
            raise UnsafeCopyError(f"refusing {self.where(parts)}: a hard link to the top")
        target_dir, tname = self._parent_of(target)
        tfd = os.dup(target_dir)  # the next lookup may close the cached one (see _dir_fd)
        try:
            pfd, name = self._parent_of(parts)
            st = os.stat(tname, dir_fd=tfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise UnsafeCopyError(f"refusing {self.where(parts)}: a hard link to a "
                                      "directory")
            tmp = self._temp_name(name)
            os.link(tname, tmp, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(tfd)
        self._replace(pfd, tmp, name, parts)
        self.files += 1

    def commit(self) -> None:
        """Apply directory modes (deepest first) and move a staged top into place."""
        for parts, meta in sorted(self.dir_meta, key=lambda item: -len(item[0])):
            fd = self.top_fd if not parts else self._dir_fd(parts, create=False)
            if fd is not None:
                self._set_meta_fd(fd, meta)
        if self.staged is not None:
            try:
                os.rename(self.staged, self.name, src_dir_fd=self.parent_fd,
                          dst_dir_fd=self.parent_fd)
            except OSError as e:
                raise MicroagentError(f"cannot create {self.where(())}: {e.strerror}") from e
            self.staged = None

    # --- the tree -----------------------------------------------------------------------

    def _open_top(self) -> int:
        if self.top_fd is not None:
            return self.top_fd
        try:
            st = os.stat(self.name, dir_fd=self.parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            self.staged = self._temp_name(self.name)
            os.mkdir(self.staged, 0o700, dir_fd=self.parent_fd)
            self.top_fd = os.open(self.staged, _DIR_FLAGS, dir_fd=self.parent_fd)
            return self.top_fd
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeCopyError(f"refusing to write a directory through the symlink "
                                  f"{self.where(())}", hint="remove it or name another "
                                  "destination")
        if not stat.S_ISDIR(st.st_mode):
            raise MicroagentError(f"cannot overwrite the non-directory {self.where(())} "
                                  "with a directory")
        self.top_fd = os.open(self.name, _DIR_FLAGS, dir_fd=self.parent_fd)
        return self.top_fd

    def _parent_of(self, parts: tuple[str, ...]) -> tuple[int, str]:
        """The fd of the directory holding ``parts`` and the entry's own name."""
        self._check_depth(parts)
        for part in parts:
            check_name(part, "/".join(parts))
        if not parts:
            return self.parent_fd, self.name
        return self._dir_fd(parts[:-1], create=True), parts[-1]

    def _dir_fd(self, parts: tuple[str, ...], *, create: bool) -> int:
        """The directory at ``parts``, opened component by component with O_NOFOLLOW.

        Only the fds of ``parts``'s own chain stay open (entries come depth first, so
        the next one mostly shares it): a wide tree does not use up the fd limit, and a
        deep one is walked without recursion, up to MAX_DEPTH."""
        if not parts:
            return self._open_top()
        fd = self.fds.get(parts)
        if fd is not None:
            return fd
        self._check_depth(parts)
        for part in parts:
            check_name(part, "/".join(parts))
        for cached in [key for key in self.fds if key != parts[:len(key)]]:
            os.close(self.fds.pop(cached))
        depth = len(parts) - 1
        while depth and parts[:depth] not in self.fds:
            depth -= 1
        fd = self.fds[parts[:depth]] if depth else self._open_top()
        for end in range(depth + 1, len(parts) + 1):
            fd = self._open_child(fd, parts[:end], create=create)
            self.fds[parts[:end]] = fd
        return fd

    def _check_depth(self, parts: tuple[str, ...]) -> None:
        if len(parts) > MAX_DEPTH:
            raise UnsafeCopyError(f"refusing {self.where(parts[:4])}/...: it is nested deeper "
                                  f"than {MAX_DEPTH} directories")

    def _open_child(self, parent: int, parts: tuple[str, ...], *, create: bool) -> int:
        name = parts[-1]
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=parent)
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as e:
            st = None
            with contextlib.suppress(OSError):
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if st is not None and stat.S_ISLNK(st.st_mode):
                raise UnsafeCopyError(
                    f"refusing to write through the symlink {self.where(parts)}",
                    hint="an entry of the source lies behind a symlink") from e
            if st is not None:
                raise MicroagentError(f"cannot overwrite the non-directory "
                                      f"{self.where(parts)} with a directory") from e
            raise

    def _temp_name(self, name: str) -> str:
        return f".{name[:100]}.cp-{secrets.token_hex(4)}"

    def _replace(self, pfd: int, tmp: str, name: str, parts: tuple[str, ...]) -> None:
        try:
            os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=pfd)
            if e.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                raise MicroagentError(f"cannot overwrite the directory {self.where(parts)} "
                                      "with a non-directory") from e
            raise

    def _set_meta_fd(self, fd: int, meta: Meta) -> None:
        owned = False
        if self.archive:
            with contextlib.suppress(OSError):
                os.fchown(fd, meta.uid, meta.gid)
                owned = True
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        # after chown, which clears setuid bits
        os.fchmod(fd, self._mode(meta.mode, is_dir=is_dir, owned=owned))
        if meta.mtime_ns is not None:
            os.utime(fd, ns=(meta.mtime_ns, meta.mtime_ns))

    def _set_link_meta(self, pfd: int, name: str, meta: Meta) -> bool:
        """Owner (archive copies) and mtime of an entry that is not opened; whether the
        owner was kept."""
        owned = False
        if self.archive:
            with contextlib.suppress(OSError):
                os.chown(name, meta.uid, meta.gid, dir_fd=pfd, follow_symlinks=False)
                owned = True
        if meta.mtime_ns is not None:
            with contextlib.suppress(OSError):
                os.utime(name, ns=(meta.mtime_ns, meta.mtime_ns), dir_fd=pfd,
                         follow_symlinks=False)
        return owned

    def _mode(self, mode: int, *, is_dir: bool, owned: bool) -> int:
        if not self.archive:
            return host_mode(mode, is_dir=is_dir)
        return mode & 0o7777 if owned else mode & 0o7777 & ~_PRIVILEGE_BITS


# --- reading a host source -------------------------------------------------------------


@dataclass(frozen=True)
class HostEntry:
    """One entry of a host source: path components below the top and its lstat."""

    parts: tuple[str, ...]
    path: Path
    st: os.stat_result
    target: str = ""


def host_entries(top: Path) -> Iterator[HostEntry]:
    """``top`` and, for a directory, everything below it, parents first; no symlink is
    followed (a symlink is an entry with its ``target``)."""
    stack: list[tuple[tuple[str, ...], Path]] = [((), top)]
    while stack:
        parts, path = stack.pop()
        st = os.lstat(path)
        target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
        yield HostEntry(parts, path, st, target)
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(path) as it:
                names = sorted(entry.name for entry in it)
            stack.extend(((*parts, name), path / name) for name in reversed(names))
