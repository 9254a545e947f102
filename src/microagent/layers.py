"""Apply OCI image layers, in order, to a staging directory.

The staging directory holds the content (files, directories, symlinks, hard links, fifos)
and :class:`Tree` holds what the tar headers asked for that the disk may not: owners, real
modes, device numbers and xattrs, since an ordinary user can neither chown nor mknod.
:mod:`microagent.rootfs` turns the two into an ext4 image.

Safety: every name is cleaned and resolved against the Tree, never the host file system;
a symlink in a parent path is followed only when its target is relative and stays inside
the tree; every file is created relative to a directory opened component by component
with ``O_NOFOLLOW``, and with ``O_EXCL``, so nothing a layer planted can redirect a write.
Layers are streamed: a thread decompresses while the main thread writes.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import os
import queue
import shutil
import stat
import struct
import threading
import urllib.parse
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from microagent.errors import HostError, IntegrityError, UnsafeImageError

_CHUNK = 1 << 20
_ZSTD_READ = 4096  # small inputs bound what one call may inflate to (zstd reaches 32000:1)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_SYMLINK_HOPS = 40
_CACHED_DIR_FDS = 64
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_AUFS_META = ".wh..wh."
_ZERO_BLOCK = bytes(512)


@dataclass(frozen=True)
class LayerFile:
    """One verified layer blob: where it is, its media type, its digest (for messages)."""

    path: Path
    media_type: str
    digest: str


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


# -- decompression -------------------------------------------------------------------


class _CorruptError(Exception):
    """The layer's bytes are not a whole, valid (compressed) tar."""


@contextlib.contextmanager
def _open_layer(layer: LayerFile) -> Iterator[Iterator[bytes]]:
    """The layer's uncompressed bytes as chunks, decompressed in a background thread."""
    with layer.path.open("rb") as f:
        head = f.read(6)
        f.seek(0)
        if head.startswith(b"\x1f\x8b"):
            source = _gunzip(f)
        elif head.startswith(b"\x28\xb5\x2f\xfd"):
            source = _unzstd(f)
        elif head.startswith((b"\xfd7zXZ\x00", b"BZh")):
            raise _CorruptError("xz and bzip2 layers are not supported")
        elif layer.media_type.endswith(("+gzip", ".gzip")):
            source = _gunzip(f)
        elif layer.media_type.endswith("+zstd"):
            source = _unzstd(f)
        else:
            source = _plain(f)
        prefetch = _Prefetch(source)
        try:
            yield prefetch
        finally:
            prefetch.close()


def _plain(f: BinaryIO) -> Iterator[bytes]:
    while chunk := f.read(_CHUNK):
        yield chunk


def _gunzip(f: BinaryIO) -> Iterator[bytes]:
    d = zlib.decompressobj(31)
    in_member = False
    data = f.read(_CHUNK)
    try:
        while True:
            if not in_member:
                data = data.lstrip(b"\0")  # zero padding after the last member
                if not data:
                    data = f.read(_CHUNK)
                    if not data:
                        return
                    continue
                in_member = True
            out = d.decompress(data, _CHUNK)
            if out:
                yield out
            if d.eof:
                data, d, in_member = d.unused_data, zlib.decompressobj(31), False
                continue
            data = d.unconsumed_tail
            if not data and len(out) < _CHUNK:
                data = f.read(_CHUNK)
                if not data:
                    raise _CorruptError("the gzip stream ends early")
    except zlib.error as e:
        raise _CorruptError(f"bad gzip data ({e})") from e


def _unzstd(f: BinaryIO) -> Iterator[bytes]:
    import zstandard

    new = zstandard.ZstdDecompressor().decompressobj
    d = new()
    in_frame = False
    pending: list[bytes] = []
    size = 0
    try:
        while data := f.read(_ZSTD_READ):
            while data:
                in_frame = True
                out = d.decompress(data)
                data = b""
                if d.eof:
                    data, d, in_frame = d.unused_data, new(), False
                if out:
                    pending.append(out)
                    size += len(out)
                    if size >= _CHUNK:
                        yield b"".join(pending)
                        pending, size = [], 0
    except zstandard.ZstdError as e:
        raise _CorruptError(f"bad zstd data ({e})") from e
    if in_frame:
        raise _CorruptError("the zstd stream ends early")
    if pending:
        yield b"".join(pending)


class _Prefetch:
    """Runs a chunk generator in a thread (zlib and zstd release the GIL), bounded queue."""

    def __init__(self, source: Iterator[bytes], depth: int = 8) -> None:
        self.queue: queue.Queue[bytes | BaseException | None] = queue.Queue(depth)
        self.stop = threading.Event()
        self.done = False
        self.thread = threading.Thread(target=self._run, args=(source,), daemon=True,
                                       name="layer-decompress")
        self.thread.start()

    def _run(self, source: Iterator[bytes]) -> None:
        try:
            for chunk in source:
                if not self._put(chunk):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)
            return
        self._put(None)

    def _put(self, item: bytes | BaseException | None) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self.done:
            raise StopIteration
        item = self.queue.get()
        if isinstance(item, bytes):
            return item
        self.done = True
        if item is None:
            raise StopIteration
        raise item

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


# -- tar -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    name: str
    type: str
    linkname: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int
    devmajor: int
    devminor: int
    xattrs: dict[str, bytes]


class _TarReader:
    """A streaming reader of ustar, GNU and PAX archives over chunks of bytes."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.buf = b""
        self.pos = 0
        self.body = 0  # unread bytes of the current entry's body
        self.skip_after = 0  # bytes to skip before the next header (body + padding)

    def _next_chunk(self) -> None:
        """Move to the next chunk; the archive must go on. Decompression errors pass."""
        for chunk in self.chunks:
            if chunk:
                self.buf, self.pos = chunk, 0
                return
        raise _CorruptError("the archive ends early")

    def _at_end(self) -> bool:
        if self.pos < len(self.buf):
            return False
        for chunk in self.chunks:
            if chunk:
                self.buf, self.pos = chunk, 0
                return False
        return True

    def read(self, n: int) -> bytes:
        end = self.pos + n
        if end <= len(self.buf):
            data = self.buf[self.pos:end]
            self.pos = end
            return data
        parts = [self.buf[self.pos:]]
        need = n - len(parts[0])
        while need:
            self._next_chunk()
            take = min(need, len(self.buf))
            parts.append(self.buf[:take])
            self.pos, need = take, need - take
        return b"".join(parts)

    def skip(self, n: int) -> None:
        while n:
            if self.pos >= len(self.buf):
                self._next_chunk()
            take = min(n, len(self.buf) - self.pos)
            self.pos += take
            n -= take

    def copy_body(self, fd: int) -> None:
        """Write the current entry's body to ``fd``."""
        n = self.body
        while n:
            if self.pos >= len(self.buf):
                self._next_chunk()
            take = min(n, len(self.buf) - self.pos)
            with memoryview(self.buf) as view:
                done = 0
                while done < take:
                    done += os.write(fd, view[self.pos + done:self.pos + take])
            self.pos += take
            n -= take
        self.skip_after -= self.body
        self.body = 0

    def entries(self) -> Iterator[_Entry]:
        """Every member, with PAX and GNU long names folded in; stops at the end marker."""
        global_pax: dict[str, bytes] = {}
        pax: dict[str, bytes] = {}
        long_name = long_link = b""
        while True:
            self.skip(self.skip_after)
            self.skip_after = self.body = 0
            if self._at_end():
                if pax or long_name or long_link:
                    raise _CorruptError("the archive ends inside an entry")
                return
            block = self.read(512)
            if block == _ZERO_BLOCK:
                for _ in self.chunks:  # drain, so the decompressor checks the trailer
                    pass
                return
            _check_header(block)
            kind = chr(block[156]) if block[156] else "0"
            size = _number(block[124:136])
            if kind in "xgLK":
                data = self.read((size + 511) & ~511)[:size]
                if kind == "x":
                    pax.update(_parse_pax(data))
                elif kind == "g":
                    global_pax.update(_parse_pax(data))
                elif kind == "L":
                    long_name = data.split(b"\0", 1)[0]
                else:
                    long_link = data.split(b"\0", 1)[0]
                continue
            fields = {**global_pax, **pax} if global_pax else pax
            entry = _make_entry(block, kind, size, fields, long_name, long_link)
            pax, long_name, long_link = {}, b"", b""
            # Like Go's archive/tar: links, directories, devices and fifos carry no data,
            # whatever their size field says.
            self.body = entry.size if entry.type in "07" else 0
            self.skip_after = (self.body + 511) & ~511
            yield entry


def _make_entry(block: bytes, kind: str, size: int, fields: dict[str, bytes],
                long_name: bytes, long_link: bytes) -> _Entry:
    if kind == "S" or any(key.startswith("GNU.sparse.") for key in fields):
        raise _CorruptError("sparse tar members are not supported")
    name = block[:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\0":
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    name = fields.get("path") or long_name or name
    link = fields.get("linkpath") or long_link or block[157:257].split(b"\0", 1)[0]
    if kind == "0" and name.endswith(b"/"):
        kind = "5"  # pre-POSIX archives mark directories with a trailing slash
    xattrs: dict[str, bytes] = {}
    try:
        for key, value in fields.items():
            if key.startswith("SCHILY.xattr."):
                xattrs[key[13:]] = value
            elif key.startswith("LIBARCHIVE.xattr."):
                xattrs[urllib.parse.unquote(key[17:])] = base64.b64decode(value + b"==")
        entry = _Entry(
            name=os.fsdecode(name), type=kind, linkname=os.fsdecode(link),
            mode=_number(block[100:108]),
            uid=int(fields["uid"]) if "uid" in fields else _number(block[108:116]),
            gid=int(fields["gid"]) if "gid" in fields else _number(block[116:124]),
            mtime_ns=(_decimal_ns(fields["mtime"]) if "mtime" in fields
                      else _number(block[136:148]) * 1_000_000_000),
            size=int(fields["size"]) if "size" in fields else size,
            devmajor=_number(block[329:337]), devminor=_number(block[337:345]),
            xattrs=xattrs,
        )
    except ValueError as e:
        raise _CorruptError(f"bad PAX value in the header of {os.fsdecode(name)!r}") from e
    # What ext4 can hold: 32-bit owners, Linux's 12-bit major and 20-bit minor numbers.
    if not (0 <= entry.uid < 1 << 32 and 0 <= entry.gid < 1 << 32 and entry.size >= 0
            and 0 <= entry.devmajor < 1 << 12 and 0 <= entry.devminor < 1 << 20):
        raise _CorruptError(f"entry {entry.name!r} has an owner, size or device number "
                            "out of range")
    return entry


def _check_header(block: bytes) -> None:
    try:
        want = _number(block[148:156])
    except _CorruptError:
        want = -1
    if want == sum(block) - sum(block[148:156]) + 256:
        return
    if want == sum(struct.unpack("148b8x356b", block)) + 256:  # old signed checksums
        return
    raise _CorruptError("a tar header has a bad checksum (not a tar, or corrupt)")


def _number(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256
        raw = int.from_bytes(field, "big")
        bits = 8 * len(field)
        return raw - (1 << bits) if field[0] & 0x40 else raw & ((1 << (bits - 1)) - 1)
    digits = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise _CorruptError(f"a tar header has a bad number {field!r}") from None


def _decimal_ns(value: bytes) -> int:
    text = value.decode("ascii")
    negative = text.startswith("-")
    whole, _, fraction = text.lstrip("-").partition(".")
    ns = int(whole or "0") * 1_000_000_000 + int((fraction + "000000000")[:9])
    return -ns if negative else ns


def _parse_pax(data: bytes) -> dict[str, bytes]:
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data) and data[pos]:
        space = data.find(b" ", pos)
        length = data[pos:space]
        end = pos + int(length) if space > 0 and length.isdigit() else -1
        if end <= space or end > len(data) or data[end - 1] != 0x0A:
            raise _CorruptError("a PAX header is malformed")
        key, eq, value = data[space + 1:end - 1].partition(b"=")
        if not eq:
            raise _CorruptError("a PAX header is malformed")
        records[key.decode("utf-8", "surrogateescape")] = value
        pos = end
    return records


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
            with _open_layer(layer) as chunks:
                reader = _TarReader(chunks)
                for entry in reader.entries():
                    self.entry = entry.name
                    self.apply_entry(entry, reader)
            self.entry = ""
            self.finish_opaque()
        except _CorruptError as e:
            where = f" (at entry {self.entry!r})" if self.entry else ""
            raise IntegrityError(
                f"layer {layer.digest} is truncated or corrupt{where}: {e}",
                hint="remove the image and pull it again",
            ) from e
        except OSError as e:
            where = f", entry {self.entry!r}" if self.entry else ""
            raise HostError(
                f"cannot apply layer {layer.digest}{where}: {e.strerror or e}") from e

    def apply_entry(self, entry: _Entry, reader: _TarReader) -> None:
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
            raise _CorruptError(f"entry {entry.name!r} has unsupported type {entry.type!r}")
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
            raise _CorruptError(f"entry {name!r} has a NUL byte in its name")
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
                raise _CorruptError(f"entry {self.entry!r} has a parent {path!r} that is "
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

    def hard_link(self, entry: _Entry, real: str, children: dict[str, Node],
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
            raise _CorruptError(f"entry {self.entry!r} is a whiteout of nothing")
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
        raise _CorruptError(f"{node.kind.value} used as a directory")
    return node.children


def _update_dir(node: Node, entry: _Entry) -> None:
    node.mode = entry.mode & 0o7777
    node.uid, node.gid, node.mtime_ns = entry.uid, entry.gid, entry.mtime_ns
    node.xattrs = entry.xattrs

