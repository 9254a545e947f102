"""Reading layer blobs: decompression (gzip, zstd, none) and a streaming tar reader.

A layer is decompressed in a background thread while the caller consumes tar entries,
so the two overlap. The compression is chosen by the media type and confirmed by the
blob's magic bytes (``docker save`` archives label gzip layers as plain tar). Anything
that is not a whole, valid tar stream raises :class:`CorruptLayerError`; the caller turns
it into an IntegrityError naming the layer.

Bounded work: the uncompressed stream is hashed as it is read when the layer has a
``diff_id`` (:class:`LayerDigestError` at its end if it differs); a :class:`TarReader`
stops past a byte budget (:class:`ReadLimitError`), and refuses PAX or long-name headers
over :data:`MAX_META_BYTES` and more than :data:`MAX_TRAILER_BYTES` after the archive's
end marker (both would otherwise be read for nothing, the first into memory).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import queue
import struct
import threading
import urllib.parse
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

_CHUNK = 1 << 20
_ZSTD_READ = 4096  # small inputs bound what one call may inflate to (zstd reaches 32000:1)
_ZERO_BLOCK = bytes(512)
MAX_META_BYTES = 1 << 20  # one PAX or GNU long-name header: names and xattrs, never data
MAX_TRAILER_BYTES = 1 << 20  # after the end marker: tar pads to a 10 KiB record at most


@dataclass(frozen=True)
class LayerFile:
    """One verified layer blob: where it is, its media type, its digest (for messages).

    ``diff_id`` is the digest the uncompressed stream must have (the image config's
    ``rootfs.diff_ids``); empty for an archive that has none (a bundle). ``label`` names
    it in messages instead of ``layer I/N DIGEST``.
    """

    path: Path
    media_type: str
    digest: str
    diff_id: str = ""
    label: str = ""


class CorruptLayerError(Exception):
    """The layer's bytes are not a whole, valid (compressed) tar."""


class LayerDigestError(Exception):
    """The uncompressed layer does not hash to its ``diff_id``; ``actual`` is what it hashes to."""

    def __init__(self, actual: str) -> None:
        super().__init__(f"the uncompressed layer hashes to {actual}")
        self.actual = actual


class ReadLimitError(Exception):
    """A tar stream went on past the bytes its reader was allowed to read."""


@contextlib.contextmanager
def open_layer(layer: LayerFile) -> Iterator[Iterator[bytes]]:
    """The layer's uncompressed bytes as chunks, decompressed in a background thread.

    With a ``diff_id``, the chunks are hashed as they are decompressed and the last one is
    followed by LayerDigestError if the stream does not match (a consumer that reads to
    the end sees it).
    """
    with layer.path.open("rb") as f:
        head = f.read(6)
        f.seek(0)
        plain = False
        if head.startswith(b"\x1f\x8b"):
            source = _gunzip(f)
        elif head.startswith(b"\x28\xb5\x2f\xfd"):
            source = _unzstd(f)
        elif head.startswith((b"\xfd7zXZ\x00", b"BZh")):
            raise CorruptLayerError("xz and bzip2 layers are not supported")
        elif layer.media_type.endswith(("+gzip", ".gzip")):
            source = _gunzip(f)
        elif layer.media_type.endswith("+zstd"):
            source = _unzstd(f)
        else:
            source, plain = _plain(f), True
        # An uncompressed blob is its own diff: the cache verified its digest already.
        if layer.diff_id and not (plain and layer.diff_id == layer.digest):
            source = _hashed(source, layer.diff_id)
        prefetch = _Prefetch(source)
        try:
            yield prefetch
        finally:
            prefetch.close()


def _plain(f: BinaryIO) -> Iterator[bytes]:
    while chunk := f.read(_CHUNK):
        yield chunk


def _hashed(source: Iterator[bytes], expected: str) -> Iterator[bytes]:
    """``source``, hashed on the way (in the decompressing thread: hashlib drops the GIL)."""
    algorithm = expected.partition(":")[0]
    if algorithm not in ("sha256", "sha512"):
        raise CorruptLayerError(f"the image config gives the unsupported diff_id {expected!r}")
    hasher = hashlib.new(algorithm)
    for chunk in source:
        hasher.update(chunk)
        yield chunk
    actual = f"{algorithm}:{hasher.hexdigest()}"
    if actual != expected:
        raise LayerDigestError(actual)


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
                    raise CorruptLayerError("the gzip stream ends early")
    except zlib.error as e:
        raise CorruptLayerError(f"bad gzip data ({e})") from e


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
        raise CorruptLayerError(f"bad zstd data ({e})") from e
    if in_frame:
        raise CorruptLayerError("the zstd stream ends early")
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
class TarEntry:
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


class TarReader:
    """A streaming reader of ustar, GNU and PAX archives over chunks of bytes.

    ``limit`` bounds the bytes it reads (ReadLimitError past it); ``consumed`` counts them.
    """

    def __init__(self, chunks: Iterator[bytes], *, limit: int | None = None) -> None:
        self.chunks = chunks
        self.limit = limit
        self.consumed = 0
        self.buf = b""
        self.pos = 0
        self.body = 0  # unread bytes of the current entry's body
        self.skip_after = 0  # bytes to skip before the next header (body + padding)

    def _take(self, chunk: bytes) -> None:
        self.buf, self.pos = chunk, 0
        self.consumed += len(chunk)
        if self.limit is not None and self.consumed > self.limit:
            raise ReadLimitError(f"the archive goes on past {self.limit} bytes")

    def _next_chunk(self) -> None:
        """Move to the next chunk; the archive must go on. Decompression errors pass."""
        for chunk in self.chunks:
            if chunk:
                self._take(chunk)
                return
        raise CorruptLayerError("the archive ends early")

    def _at_end(self) -> bool:
        if self.pos < len(self.buf):
            return False
        for chunk in self.chunks:
            if chunk:
                self._take(chunk)
                return False
        return True

    def _drain(self) -> None:
        """Read past the end marker to the stream's end, so the decompressor checks its
        trailer and a digest covers the whole stream; a little padding only."""
        trailer = len(self.buf) - self.pos
        for chunk in self.chunks:
            trailer += len(chunk)
            if trailer > MAX_TRAILER_BYTES:
                raise CorruptLayerError(f"more than {MAX_TRAILER_BYTES} bytes follow the "
                                        "end of the archive")
        self.buf, self.pos = b"", 0

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

    def entries(self) -> Iterator[TarEntry]:
        """Every member, with PAX and GNU long names folded in; stops at the end marker."""
        global_pax: dict[str, bytes] = {}
        pax: dict[str, bytes] = {}
        long_name = long_link = b""
        while True:
            self.skip(self.skip_after)
            self.skip_after = self.body = 0
            if self._at_end():
                if pax or long_name or long_link:
                    raise CorruptLayerError("the archive ends inside an entry")
                return
            block = self.read(512)
            if block == _ZERO_BLOCK:
                self._drain()
                return
            _check_header(block)
            kind = chr(block[156]) if block[156] else "0"
            size = _number(block[124:136])
            if kind in "xgLK":
                if size > MAX_META_BYTES:
                    raise CorruptLayerError(f"a PAX or long-name header of {size} bytes "
                                            f"(more than {MAX_META_BYTES})")
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
                long_name: bytes, long_link: bytes) -> TarEntry:
    if kind == "S" or any(key.startswith("GNU.sparse.") for key in fields):
        raise CorruptLayerError("sparse tar members are not supported")
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
        entry = TarEntry(
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
        raise CorruptLayerError(f"bad PAX value in the header of {os.fsdecode(name)!r}") from e
    # What ext4 can hold: 32-bit owners, Linux's 12-bit major and 20-bit minor numbers.
    if not (0 <= entry.uid < 1 << 32 and 0 <= entry.gid < 1 << 32 and entry.size >= 0
            and 0 <= entry.devmajor < 1 << 12 and 0 <= entry.devminor < 1 << 20):
        raise CorruptLayerError(f"entry {entry.name!r} has an owner, size or device number "
                            "out of range")
    return entry


def _check_header(block: bytes) -> None:
    try:
        want = _number(block[148:156])
    except CorruptLayerError:
        want = -1
    if want == sum(block) - sum(block[148:156]) + 256:
        return
    if want == sum(struct.unpack("148b8x356b", block)) + 256:  # old signed checksums
        return
    raise CorruptLayerError("a tar header has a bad checksum (not a tar, or corrupt)")


def _number(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256
        raw = int.from_bytes(field, "big")
        bits = 8 * len(field)
        return raw - (1 << bits) if field[0] & 0x40 else raw & ((1 << (bits - 1)) - 1)
    digits = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise CorruptLayerError(f"a tar header has a bad number {field!r}") from None


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
            raise CorruptLayerError("a PAX header is malformed")
        key, eq, value = data[space + 1:end - 1].partition(b"=")
        if not eq:
            raise CorruptLayerError("a PAX header is malformed")
        records[key.decode("utf-8", "surrogateescape")] = value
        pos = end
    return records
