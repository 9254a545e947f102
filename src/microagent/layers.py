"""Apply OCI image layers, in order, to a staging directory.

The staging directory holds the content (files, directories, symlinks, hard links, fifos)
and :class:`Tree` holds what the tar headers asked for that the disk may not: owners, real
modes, device numbers and xattrs, since an ordinary user can neither chown nor mknod.
:mod:`microagent.rootfs` turns the two into an ext4 image.

Safety: every name is cleaned and resolved against the Tree, never the host file system;
a symlink in a parent path is followed only when its target is relative and stays inside
the tree; every file is created relative to a directory opened component by component
with ``O_NOFOLLOW``, and with ``O_EXCL``, so nothing a layer planted can redirect a write.
Layers are streamed (:mod:`microagent.tarstream`): a thread decompresses while the main
thread writes.
"""

from __future__ import annotations

import contextlib
import enum
import os
import shutil
import stat
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from microagent.errors import HostError, IntegrityError, UnsafeImageError
from microagent.tarstream import CorruptLayerError, LayerFile, TarEntry, TarReader, open_layer

__all__ = ["Kind", "LayerFile", "Node", "Tree", "apply_layers"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_SYMLINK_HOPS = 40
_CACHED_DIR_FDS = 64
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_AUFS_META = ".wh..wh."


class Kind(enum.Enum):
    """The file types a layer can create."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"


@dataclass(eq=False, slots=True)
class Node:
    """One inode of the applied image, as the tar headers describe it.

    Paths that are hard links to each other share one Node (compare with ``is``).
    ``mode`` holds the permission bits including setuid, setgid and sticky.
    """

    kind: Kind
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    target: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    children: dict[str, Node] | None = None

    @property
    def st_mode(self) -> int:
        """The full ``st_mode``: type bits and permission bits."""
        return _TYPE_BITS[self.kind] | self.mode


_TYPE_BITS = {
    Kind.FILE: stat.S_IFREG, Kind.DIR: stat.S_IFDIR, Kind.SYMLINK: stat.S_IFLNK,
    Kind.CHAR: stat.S_IFCHR, Kind.BLOCK: stat.S_IFBLK, Kind.FIFO: stat.S_IFIFO,
}
_KINDS = {"0": Kind.FILE, "7": Kind.FILE, "2": Kind.SYMLINK, "3": Kind.CHAR,
          "4": Kind.BLOCK, "5": Kind.DIR, "6": Kind.FIFO}


class Tree:
    """Every path of the applied image and its :class:`Node`; the root is ``""``.

    ``pending_xattrs`` holds the xattrs the staging directory could not take (for an
    ordinary user, anything outside ``user.*``): they must be set in the image.
    """

    def __init__(self) -> None:
        self.root = Node(Kind.DIR, 0o755, 0, 0, 0, children={})
        self.pending_xattrs: dict[Node, dict[str, bytes]] = {}

    def get(self, path: str) -> Node | None:
        """The node at ``path`` (relative, ``/``-separated, no symlink followed)."""
        node: Node | None = self.root
        for name in path.split("/"):
            if name:
                if node is None or node.children is None:
                    return None
                node = node.children.get(name)
        return node

    def walk(self) -> Iterator[tuple[str, Node]]:
        """Every ``(path, node)``, directories before their children; hard links repeat."""
        stack: list[tuple[str, Node]] = [("", self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            if node.children:
                prefix = f"{path}/" if path else ""
                stack.extend((prefix + name, child)
                             for name, child in reversed(node.children.items()))


def apply_layers(layers: Sequence[LayerFile], root: Path) -> Tree:
    """Apply ``layers`` in order into the empty directory ``root``; return the Tree.

    ``root`` should be private (0700, as ``tempfile.mkdtemp`` makes it): as root, staged
    files keep their setuid bits and device nodes are real.

    Raises UnsafeImageError if any entry would write outside ``root`` (naming the layer
    and the entry), IntegrityError if a layer is truncated or corrupt, HostError if the
    host file system fails.
    """
    try:
        if any(root.iterdir()):
            raise HostError(f"staging directory {root} is not empty")
    except OSError as e:
        raise HostError(f"cannot use staging directory {root}: {e.strerror}") from e
    stager = _Stager(root)
    try:
        for layer in layers:
            stager.apply_layer(layer)
        stager.finish()
    finally:
        stager.close()
    return stager.tree


# -- staging -------------------------------------------------------------------------


class _Stager:
    """Applies entries to the staging directory and the Tree, keeping the two equal."""

    def __init__(self, root: Path) -> None:
        self.tree = Tree()
        self.privileged = os.geteuid() == 0
        self.root_fd = os.open(root, _DIR_FLAGS)
        self.fds: OrderedDict[str, int] = OrderedDict()
        self.digest = ""
        self.entry = ""
        self.unpacked: set[str] = set()
        self.opaque: list[str] = []

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        os.close(self.root_fd)

    def unsafe(self, reason: str) -> UnsafeImageError:
        return UnsafeImageError(
            f"layer {self.digest}: entry {self.entry!r} {reason}; the image is refused",
            hint="the image is malformed or malicious; nothing from it was used",
        )

    def apply_layer(self, layer: LayerFile) -> None:
        self.digest, self.entry = layer.digest, ""
        self.unpacked, self.opaque = {""}, []
        try:
            with open_layer(layer) as chunks:
                reader = TarReader(chunks)
                for entry in reader.entries():
                    self.entry = entry.name
                    self.apply_entry(entry, reader)
            self.entry = ""
            self.finish_opaque()
        except CorruptLayerError as e:
            where = f" (at entry {self.entry!r})" if self.entry else ""
            raise IntegrityError(
                f"layer {layer.digest} is truncated or corrupt{where}: {e}",
                hint="remove the image and pull it again",
            ) from e
        except OSError as e:
            where = f", entry {self.entry!r}" if self.entry else ""
            raise HostError(
                f"cannot apply layer {layer.digest}{where}: {e.strerror or e}") from e

    def apply_entry(self, entry: TarEntry, reader: TarReader) -> None:
        parts = self.clean(entry.name)
        if not parts:
            if entry.type != "5":
                raise self.unsafe("replaces the root directory")
            _update_dir(self.tree.root, entry)
            return
        name = parts[-1]
        if name.startswith(_WHITEOUT):
            self.whiteout(parts)
            return
        if _AUFS_META in entry.name and any(p.startswith(_AUFS_META) for p in parts):
            return  # inside AUFS metadata (.wh..wh.plnk/...): never content
        parent, real = self.resolve(parts[:-1], entry.mtime_ns, create=True)
        children = _children(parent)
        path = f"{real}/{name}" if real else name
        self.mark_unpacked(path)
        existing = children.get(name)
        if entry.type == "1":
            self.hard_link(entry, real, children, name)
            return
        kind = _KINDS.get(entry.type)
        if kind is None:
            raise CorruptLayerError(f"entry {entry.name!r} has unsupported type {entry.type!r}")
        if kind is Kind.DIR and existing is not None and existing.kind is Kind.DIR:
            _update_dir(existing, entry)
            return
        pfd = self.dirfd(real)
        if existing is not None:
            self.remove(real, children, name)
        node = Node(kind, entry.mode & 0o7777, entry.uid, entry.gid, entry.mtime_ns,
                    devmajor=entry.devmajor, devminor=entry.devminor,
                    xattrs=entry.xattrs)
        if kind is Kind.FILE:
            node.size = entry.size
            fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=pfd)
            try:
                reader.copy_body(fd)
                self.set_meta_fd(fd, node, 0o600)
            finally:
                os.close(fd)
        elif kind is Kind.DIR:
            node.children = {}
            os.mkdir(name, 0o700, dir_fd=pfd)
        elif kind is Kind.SYMLINK:
            node.target = entry.linkname
            os.symlink(entry.linkname, name, dir_fd=pfd)
            self.set_meta_at(pfd, name, node)
        else:
            self.make_special(pfd, name, node)
        children[name] = node

    # paths
    def clean(self, name: str) -> list[str]:
        """The components of an archive name, ``.`` and ``..`` resolved lexically."""
        if name.startswith("/"):
            raise self.unsafe("has an absolute name")
        if "\0" in name:
            raise CorruptLayerError(f"entry {name!r} has a NUL byte in its name")
        parts: list[str] = []
        for part in name.split("/"):
            if part == "..":
                if not parts:
                    raise self.unsafe("climbs out of the image with '..'")
                parts.pop()
            elif part and part != ".":
                parts.append(part)
        return parts

    def resolve(self, parts: list[str], mtime_ns: int, *, create: bool) -> tuple[Node, str]:
        """Follow ``parts`` from the root through the Tree to a directory.

        Returns the directory and its real path (no symlink in it). A missing directory
        is created (0755, root's) when ``create`` is true, else FileNotFoundError.
        """
        stack: list[tuple[str, Node]] = [("", self.tree.root)]
        todo = parts[::-1]
        hops = 0
        while todo:
            name = todo.pop()
            real, node = stack[-1]
            if name in ("", "."):
                continue
            if name == "..":
                if len(stack) == 1:
                    raise self.unsafe("goes through a symlink that climbs out of the image")
                stack.pop()
                continue
            children = _children(node)
            path = f"{real}/{name}" if real else name
            child = children.get(name)
            if child is None:
                if not create:
                    raise FileNotFoundError(path)
                os.mkdir(name, 0o700, dir_fd=self.dirfd(real))
                child = Node(Kind.DIR, 0o755, 0, 0, mtime_ns, children={})
                children[name] = child
                self.mark_unpacked(path)
            elif child.kind is Kind.SYMLINK:
                if child.target.startswith("/"):
                    raise self.unsafe(f"goes through the symlink {path!r} to the absolute "
                                      f"path {child.target!r}")
                hops += 1
                if hops > _MAX_SYMLINK_HOPS:
                    raise self.unsafe("goes through too many levels of symlinks")
                todo.extend(child.target.split("/")[::-1])
                continue
            elif child.kind is not Kind.DIR:
                raise CorruptLayerError(f"entry {self.entry!r} has a parent {path!r} that is "
                                    "not a directory")
            stack.append((path, child))
        real, node = stack[-1]
        return node, real

    def mark_unpacked(self, path: str) -> None:
        while path not in self.unpacked:
            self.unpacked.add(path)
            path = path.rpartition("/")[0]

    def dirfd(self, path: str) -> int:
        """An fd of the staged directory at real ``path``, opened component by component."""
        if not path:
            return self.root_fd
        fd = self.fds.get(path)
        if fd is not None:
            self.fds.move_to_end(path)
            return fd
        missing = [path]
        head = path.rpartition("/")[0]
        while head and head not in self.fds:
            missing.append(head)
            head = head.rpartition("/")[0]
        fd = self.fds[head] if head else self.root_fd
        for sub in reversed(missing):
            fd = os.open(sub.rpartition("/")[2], _DIR_FLAGS, dir_fd=fd)
            self.fds[sub] = fd
        while len(self.fds) > _CACHED_DIR_FDS:
            os.close(self.fds.popitem(last=False)[1])
        return fd

    # creating and removing
    def make_special(self, pfd: int, name: str, node: Node) -> None:
        if node.kind is Kind.FIFO or not self.privileged:
            # mknod needs CAP_MKNOD: a fifo stands in and rootfs fixes the inode's type.
            os.mkfifo(name, 0o600, dir_fd=pfd)
        else:
            dev_type = stat.S_IFCHR if node.kind is Kind.CHAR else stat.S_IFBLK
            try:
                os.mknod(name, dev_type | 0o600, os.makedev(node.devmajor, node.devminor),
                         dir_fd=pfd)
            except PermissionError:
                os.mkfifo(name, 0o600, dir_fd=pfd)
        self.set_meta_at(pfd, name, node, chmod=True)

    def set_meta_fd(self, fd: int, node: Node, owner_bits: int) -> None:
        if self.privileged:
            with contextlib.suppress(OSError):  # an id the kernel refuses: fixed in the image
                os.fchown(fd, node.uid, node.gid)
        os.fchmod(fd, node.mode if self.privileged else node.mode | owner_bits)
        if node.xattrs:
            self.set_xattrs(fd, node)
        os.utime(fd, ns=(node.mtime_ns, node.mtime_ns))

    def set_meta_at(self, pfd: int, name: str, node: Node, *, chmod: bool = False) -> None:
        """Metadata of a symlink, fifo or device we just made (chown first: it drops suid)."""
        if self.privileged:
            with contextlib.suppress(OSError):
                os.chown(name, node.uid, node.gid, dir_fd=pfd, follow_symlinks=False)
        if chmod:  # a fifo or device we just made, never a symlink
            os.chmod(name, node.mode if self.privileged else node.mode | 0o600, dir_fd=pfd)
        if node.xattrs:
            self.set_xattrs(f"/proc/self/fd/{pfd}/{name}", node)
        os.utime(name, ns=(node.mtime_ns, node.mtime_ns), dir_fd=pfd,
                 follow_symlinks=False)

    def set_xattrs(self, target: int | str, node: Node) -> None:
        pending: dict[str, bytes] = {}
        for key, value in node.xattrs.items():
            try:
                if isinstance(target, int):
                    os.setxattr(target, key, value)
                else:
                    os.setxattr(target, key, value, follow_symlinks=False)
            except OSError:
                pending[key] = value
        if pending:
            self.tree.pending_xattrs[node] = pending
        else:
            self.tree.pending_xattrs.pop(node, None)

    def remove(self, real: str, children: dict[str, Node], name: str) -> None:
        pfd = self.dirfd(real)
        if children.pop(name).kind is Kind.DIR:
            path = f"{real}/{name}" if real else name
            for key in [k for k in self.fds if k == path or k.startswith(path + "/")]:
                os.close(self.fds.pop(key))
            shutil.rmtree(name, dir_fd=pfd)
        else:
            os.unlink(name, dir_fd=pfd)

    def hard_link(self, entry: TarEntry, real: str, children: dict[str, Node],
                  name: str) -> None:
        target_parts = self.clean(entry.linkname)
        if not target_parts:
            raise self.unsafe("is a hard link to the root directory")
        try:
            found_dir, found_real = self.resolve(target_parts[:-1], 0, create=False)
            target = _children(found_dir)[target_parts[-1]]
        except (FileNotFoundError, KeyError):
            raise self.unsafe(
                f"is a hard link to {entry.linkname!r}, which does not exist") from None
        if target.kind is Kind.DIR:
            raise self.unsafe(f"is a hard link to the directory {entry.linkname!r}")
        existing = children.get(name)
        if existing is target:
            return
        if existing is not None:
            path = f"{real}/{name}" if real else name
            if existing.kind is Kind.DIR and (found_real + "/").startswith(path + "/"):
                raise self.unsafe(f"replaces the directory that holds {entry.linkname!r}")
            self.remove(real, children, name)
        os.link(target_parts[-1], name, src_dir_fd=self.dirfd(found_real),
                dst_dir_fd=self.dirfd(real), follow_symlinks=False)
        children[name] = target

    # whiteouts
    def whiteout(self, parts: list[str]) -> None:
        base = parts[-1]
        if base == _OPAQUE:
            real = self.resolve(parts[:-1], 0, create=True)[1]
            self.mark_unpacked(real)
            self.opaque.append(real)
            return
        if base.startswith(_AUFS_META):
            return  # other AUFS metadata (.wh..wh.plnk and the like), never content
        name = base[len(_WHITEOUT):]
        if name in ("", ".", ".."):
            raise CorruptLayerError(f"entry {self.entry!r} is a whiteout of nothing")
        try:
            parent, real = self.resolve(parts[:-1], 0, create=False)
        except FileNotFoundError:
            return
        children = _children(parent)
        path = f"{real}/{name}" if real else name
        # A whiteout hides only what lower layers made, never this layer's own entries.
        if name in children and path not in self.unpacked:
            self.remove(real, children, name)

    def finish_opaque(self) -> None:
        """Drop what lower layers left inside this layer's opaque directories."""
        for top in self.opaque:
            node = self.tree.get(top)
            stack = [(top, node)] if node is not None and node.kind is Kind.DIR else []
            while stack:
                path, directory = stack.pop()
                children = _children(directory)
                for name, child in list(children.items()):
                    child_path = f"{path}/{name}" if path else name
                    if child_path not in self.unpacked:
                        self.remove(path, children, name)
                    elif child.kind is Kind.DIR:
                        stack.append((child_path, child))

    def finish(self) -> None:
        """Set directory owners, modes, xattrs and mtimes, now that nothing changes."""
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.set_meta_fd(self.root_fd, self.tree.root, 0o700)
        stack: list[tuple[int, Node]] = [(os.dup(self.root_fd), self.tree.root)]
        try:
            while stack:
                fd, node = stack.pop()
                try:
                    for name, child in _children(node).items():
                        if child.kind is Kind.DIR:
                            stack.append((os.open(name, _DIR_FLAGS, dir_fd=fd), child))
                            self.set_meta_fd(stack[-1][0], child, 0o700)
                finally:
                    os.close(fd)
        finally:
            for fd, _ in stack:
                os.close(fd)


def _children(node: Node) -> dict[str, Node]:
    if node.children is None:
        raise CorruptLayerError(f"{node.kind.value} used as a directory")
    return node.children


def _update_dir(node: Node, entry: TarEntry) -> None:
    node.mode = entry.mode & 0o7777
    node.uid, node.gid, node.mtime_ns = entry.uid, entry.gid, entry.mtime_ns
    node.xattrs = entry.xattrs

