"""Apply OCI image layers, in order, to a staging directory.

The staging directory holds the content (files, directories, symlinks, hard links, fifos)
and :class:`Tree` holds what the tar headers asked for that the disk may not: owners, real
modes, device numbers and xattrs, since an ordinary user can neither chown nor mknod.
:mod:`microagent.disks.rootfs` turns the two into an ext4 image.

Safety: every name is cleaned and resolved against the Tree, never the host file system;
a symlink in a parent path is followed only when its target is relative and stays inside
the tree; every file is created relative to a directory opened component by component
with ``O_NOFOLLOW``, and with ``O_EXCL``, so nothing a layer planted can redirect a write.
Layers are streamed (:mod:`microagent.images.tarstream`): a thread decompresses (and hashes,
against the config's ``diff_id``) while the main thread writes.

Bounded work: no path is deeper than :data:`MAX_DEPTH`. With ``max_bytes`` (what the
target disk can hold) the content is counted as ext4 would store it, as it is staged.
With ``measure``, from the entry that takes it past the limit on, no file body is
written but the headers are still applied (empty files), so that
:class:`ExtractLimitError` carries the whole Tree and the caller can say how much the
image needs; without, extraction stops at that entry. Reading stops for good when the
inodes alone exceed the limit or when :data:`READ_FACTOR` times the limit has been read
from the layers in all (files replaced or deleted by later entries count there).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from microagent.errors import DiskTooSmallError, HostError, IntegrityError, UnsafeImageError
from microagent.images.imagetree import BLOCK_SIZE, INODE_SIZE, Kind, Node, Tree, node_blocks
from microagent.images.tarstream import (
    CorruptLayerError,
    LayerDigestError,
    LayerFile,
    ReadLimitError,
    TarEntry,
    TarReader,
    open_layer,
)
from microagent.store import write_error

__all__ = ["MAX_DEPTH", "ExtractLimitError", "Kind", "LayerFile", "Node", "Tree",
           "apply_layers"]

# mkfs.ext4 -d (e2fsprogs 1.47) corrupts its heap past ~1,010 nested directories, Python
# 3.11's shutil.rmtree recurses once per level (limit 1,000), and a path of 256 short
# names is near PATH_MAX already; real images stay under ~60 (node_modules).
MAX_DEPTH = 256
READ_FACTOR = 4

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_SYMLINK_HOPS = 40
_CACHED_DIR_FDS = 64
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_AUFS_META = ".wh..wh."
_SHOWN_NAME = 160  # longer entry names are shortened in messages


_KINDS = {"0": Kind.FILE, "7": Kind.FILE, "2": Kind.SYMLINK, "3": Kind.CHAR,
          "4": Kind.BLOCK, "5": Kind.DIR, "6": Kind.FIFO}


class ExtractLimitError(DiskTooSmallError):
    """The layers hold more than ``limit`` bytes; ``where`` is the entry that went past it.

    ``tree`` is the whole image's Tree (file sizes as the headers say, bodies not
    written past the limit) when every layer was read; None when reading stopped early.
    ``peak`` is the most the content took at any point, as ``(inodes, 4 KiB blocks)``:
    more than the final tree when a later layer deleted what an earlier one wrote.
    """

    def __init__(self, message: str, where: str, limit: int, tree: Tree | None = None,
                 peak: tuple[int, int] = (0, 0)) -> None:
        super().__init__(message)
        self.where, self.limit, self.tree, self.peak = where, limit, tree, peak


def apply_layers(layers: Sequence[LayerFile], root: Path, *,
                 max_bytes: int | None = None, measure: bool = True) -> Tree:
    """Apply ``layers`` in order into the empty directory ``root``; return the Tree.

    ``root`` should be private (0700, as ``tempfile.mkdtemp`` makes it): as root, staged
    files keep their setuid bits and device nodes are real. ``max_bytes`` bounds the
    content, ``measure`` says whether to go on measuring past it (see the module's
    docstring).

    Raises UnsafeImageError if any entry would write outside ``root`` or nests deeper than
    MAX_DEPTH (naming the layer and the entry), IntegrityError if a layer is truncated or
    corrupt or does not match its ``diff_id``, ExtractLimitError past ``max_bytes``,
    HostError if the host file system fails. The caller removes ``root``.
    """
    try:
        if any(root.iterdir()):
            raise HostError(f"staging directory {root} is not empty")
    except OSError as e:
        raise HostError(f"cannot use staging directory {root}: {e.strerror}") from e
    stager = _Stager(root, max_bytes, measure)
    try:
        for index, layer in enumerate(layers, start=1):
            stager.apply_layer(layer, layer.label or f"layer {index}/{len(layers)} "
                                                     f"{layer.digest}")
        if stager.over:
            raise stager.limit_error("", stager.tree)
        try:
            stager.finish()
        except OSError as e:
            raise write_error(e, "cannot set the staged directories' metadata", root) from e
    finally:
        stager.close()
    return stager.tree


# -- staging -------------------------------------------------------------------------


class _Stager:
    """Applies entries to the staging directory and the Tree, keeping the two equal."""

    def __init__(self, root: Path, max_bytes: int | None, measure: bool) -> None:
        self.tree = Tree()
        self.root = root
        self.privileged = os.geteuid() == 0
        self.root_fd = os.open(root, _DIR_FLAGS)
        self.fds: OrderedDict[str, int] = OrderedDict()
        self.label = ""
        self.entry = ""
        self.unpacked: set[str] = set()
        self.opaque: list[str] = []
        self.max_bytes = max_bytes
        self.measure = measure
        self.read_left = None if max_bytes is None else READ_FACTOR * max_bytes
        self.inodes = 1  # the root
        self.blocks = 1
        self.over = ""  # where the content went past max_bytes: no body is written since
        self.peak = (self.inodes, self.blocks)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        os.close(self.root_fd)

    def unsafe(self, reason: str) -> UnsafeImageError:
        return UnsafeImageError(
            f"{self.label}: entry {_shown(self.entry)} {reason}; the image is refused",
            hint="the image is malformed or malicious; nothing from it was used",
        )

    def apply_layer(self, layer: LayerFile, label: str) -> None:
        self.label, self.entry = label, ""
        self.unpacked, self.opaque = {""}, []
        reader: TarReader | None = None
        try:
            with open_layer(layer) as chunks:
                reader = TarReader(chunks, limit=self.read_left)
                for entry in reader.entries():
                    self.entry = entry.name
                    self.apply_entry(entry, reader)
            self.entry = ""
            self.finish_opaque()
        except LayerDigestError as e:
            raise IntegrityError(
                f"{label} does not match the image config: uncompressed it hashes to "
                f"{e.actual}, and the config's diff_id for it is {layer.diff_id}; the "
                "image is refused",
                hint="the image's config belongs to other layers (tampered or broken); "
                "nothing from it was cached",
            ) from e
        except ReadLimitError as e:
            that = "that" if self.over else f"the limit of {(self.max_bytes or 0) >> 20} MiB"
            raise self.limit_error(f"the layers decompress to more than {READ_FACTOR} times "
                                   f"{that}; extraction stopped") from e
        except CorruptLayerError as e:
            where = f" (at entry {_shown(self.entry)})" if self.entry else ""
            raise IntegrityError(
                f"{label} is truncated or corrupt{where}: {e}",
                hint="remove the image and pull it again",
            ) from e
        except OSError as e:
            where = f", entry {_shown(self.entry)}" if self.entry else ""
            raise write_error(e, f"cannot apply {label}{where}", self.root) from e
        if self.read_left is not None and reader is not None:
            self.read_left -= reader.consumed

    def _where(self) -> str:
        return f"{self.label} at entry {_shown(self.entry)}" if self.entry else self.label

    def limit_error(self, why: str, tree: Tree | None = None) -> ExtractLimitError:
        """The error for going past ``max_bytes`` (``over``), or else for ``why``."""
        limit = self.max_bytes or 0
        if self.over:
            message = f"{self.over} goes past the limit of {limit >> 20} MiB"
            message += f"; {why}" if why else ""
        else:
            message = f"{self._where()}: {why}"
        return ExtractLimitError(message, self.over or self._where(), limit, tree, self.peak)

    # what the content takes in ext4, counted as it is staged
    def charge(self, node: Node) -> None:
        """Count a new node: past the limit, bodies are no longer written (``over``);
        when its inodes alone go past it, the image is refused at once."""
        self.inodes += 1
        self.blocks += node_blocks(node)
        size = self.blocks * BLOCK_SIZE + self.inodes * INODE_SIZE
        if size > self.peak[1] * BLOCK_SIZE + self.peak[0] * INODE_SIZE:
            self.peak = (self.inodes, self.blocks)
        if self.max_bytes is None or self.over:
            if self.over and self.inodes * INODE_SIZE > (self.max_bytes or 0):
                raise self.limit_error("its entries alone would not fit; extraction "
                                       "stopped")
            return
        if size > self.max_bytes:
            self.over = self._where()
            if not self.measure:
                raise self.limit_error("extraction stopped")

    def release(self, top: Node) -> None:
        """Uncount ``top`` and what is under it, as far as no other path links to it."""
        stack = [top]
        while stack:
            node = stack.pop()
            node.links -= 1
            if node.links == 0:
                self.inodes -= 1
                self.blocks -= node_blocks(node)
            if node.children:
                stack.extend(node.children.values())

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
        if (real.count("/") + 2 if real else 1) > MAX_DEPTH:
            raise self.unsafe(f"is nested deeper than {MAX_DEPTH} directories")
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
                    size=entry.size if kind is Kind.FILE else 0,
                    target=entry.linkname if kind is Kind.SYMLINK else "",
                    devmajor=entry.devmajor, devminor=entry.devminor,
                    xattrs=entry.xattrs)
        self.charge(node)  # before anything is written
        if kind is Kind.FILE:
            fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=pfd)
            try:
                if not self.over:  # past the limit, the reader skips the body
                    reader.copy_body(fd)
                self.set_meta_fd(fd, node, 0o600)
            finally:
                os.close(fd)
        elif kind is Kind.DIR:
            node.children = {}
            os.mkdir(name, 0o700, dir_fd=pfd)
        elif kind is Kind.SYMLINK:
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
                if len(stack) > MAX_DEPTH:
                    raise self.unsafe(f"is nested deeper than {MAX_DEPTH} directories")
                child = Node(Kind.DIR, 0o755, 0, 0, mtime_ns, children={})
                self.charge(child)
                os.mkdir(name, 0o700, dir_fd=self.dirfd(real))
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
        node = children.pop(name)
        self.release(node)
        if node.kind is Kind.DIR:
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
        target.links += 1

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


def _shown(name: str) -> str:
    """``name`` quoted for a message, its middle cut out when it is very long."""
    if len(name) <= _SHOWN_NAME:
        return repr(name)
    return f"{name[:_SHOWN_NAME // 2]!r}...{name[-_SHOWN_NAME // 4:]!r} ({len(name)} bytes)"


def _children(node: Node) -> dict[str, Node]:
    if node.children is None:
        raise CorruptLayerError(f"{node.kind.value} used as a directory")
    return node.children


def _update_dir(node: Node, entry: TarEntry) -> None:
    node.mode = entry.mode & 0o7777
    node.uid, node.gid, node.mtime_ns = entry.uid, entry.gid, entry.mtime_ns
    node.xattrs = entry.xattrs

