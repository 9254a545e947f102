"""Directory trees through a running guest's exec: tar both ways.

The agent's ``get`` and ``put`` move single regular files; a tree (and a lone symlink
or fifo) travels as a tar stream through exec instead, since every image that has a
shell has a tar (busybox's or GNU's):

- out of the guest, ``tar -cf - -C PARENT BASE`` writes to exec's stdout, which a
  thread feeds to :class:`~microagent.images.tarstream.TarReader`; :func:`extract_tar` checks
  every name (relative, no ``..``, under ``BASE``) and writes it with
  :class:`~microagent.disks.hostfiles.HostWriter`, which never follows a symlink;
- into the guest, :func:`write_tar` serialises the host tree (lstat, files opened with
  ``O_NOFOLLOW``, numeric owners, no user names) into a pipe that exec forwards as
  ``tar -xf - -C DIR``'s stdin.
"""

from __future__ import annotations

import os
import queue
import stat
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO

from microagent.disks.hostfiles import HostEntry, HostWriter, Meta, UnsafeCopyError
from microagent.errors import MicroagentError
from microagent.images.tarstream import CorruptLayerError, TarReader
from microagent.vm.agent import AgentClient, ExecRequest, ExecResult

GUEST_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_QUEUE_DEPTH = 16


def archive_parts(name: str, base: str) -> tuple[str, ...]:
    """The components of archive member ``name`` below ``base`` (``""``: no prefix).

    Raises UnsafeCopyError for an absolute name, a ``..`` component or a member outside
    ``base``: the guest's tar is not trusted.
    """
    if name.startswith("/") or "\0" in name:
        raise UnsafeCopyError(f"refusing the guest's archive entry {name!r}: an absolute name")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeCopyError(f"refusing the guest's archive entry {name!r}: it climbs out "
                              "of the destination with '..'")
    if not base:
        return tuple(parts)
    if not parts or parts[0] != base:
        raise UnsafeCopyError(f"refusing the guest's archive entry {name!r}: it is not "
                              f"under {base!r}")
    return tuple(parts[1:])


def extract_tar(chunks: Iterator[bytes], writer: HostWriter, base: str) -> list[str]:
    """Write the members of the tar stream ``chunks`` with ``writer``; return the names
    skipped (devices, sockets: not copied)."""
    reader = TarReader(chunks)
    skipped: list[str] = []
    try:
        for entry in reader.entries():
            parts = archive_parts(entry.name, base)
            meta = Meta(entry.mode & 0o7777, entry.uid, entry.gid, entry.mtime_ns)
            if entry.type == "5":
                writer.directory(parts, meta)
            elif entry.type in "07":
                def fill(fd: int, meta: Meta = meta) -> Meta:
                    reader.copy_body(fd)
                    return meta
                writer.file(parts, fill)
            elif entry.type == "2":
                writer.symlink(parts, entry.linkname, meta)
            elif entry.type == "1":
                writer.hard_link(parts, archive_parts(entry.linkname, base))
            elif entry.type == "6":
                writer.fifo(parts, meta)
            else:
                skipped.append(entry.name)
    except CorruptLayerError as e:
        raise MicroagentError(f"the guest's tar stream is malformed: {e}") from e
    return skipped


def tar_from_guest(client: AgentClient, parent: str, base: str, writer: HostWriter
                   ) -> list[str]:
    """``tar -cf - -C parent base`` in the guest, extracted safely by ``writer``."""
    chunks: queue.Queue[bytes | None] = queue.Queue(_QUEUE_DEPTH)
    stop = threading.Event()
    outcome: dict[str, object] = {}
    stderr = bytearray()

    def sink(data: bytes) -> None:
        while not stop.is_set():
            try:
                chunks.put(data, timeout=0.2)
                return
            except queue.Full:
                continue
        raise _Stopped

    def run() -> None:
        try:
            outcome["result"] = client.exec(ExecRequest(
                argv=("tar", "-cf", "-", "-C", parent, base or "."), env=(GUEST_PATH,)),
                stdout=sink, stderr=stderr.extend)
        except BaseException as e:  # handed to the main thread
            outcome["error"] = e
        finally:
            while not stop.is_set():
                try:
                    chunks.put(None, timeout=0.2)
                    break
                except queue.Full:
                    continue

    def stream() -> Iterator[bytes]:
        while (chunk := chunks.get()) is not None:
            yield chunk

    thread = threading.Thread(target=run, name="cp-tar", daemon=True)
    thread.start()
    try:
        source = stream()
        skipped = extract_tar(source, writer, base)
        for _ in source:  # a tar may pad after its end marker
            pass
    finally:
        stop.set()
        thread.join()
    error = outcome.get("error")
    if isinstance(error, BaseException) and not isinstance(error, _Stopped):
        raise error
    check_tar(outcome.get("result"), stderr, "tar -c")
    return skipped


class _Stopped(Exception):
    """The extraction ended early; the exec is abandoned."""


def check_tar(result: object, stderr: bytes | bytearray, what: str) -> None:
    """Raise a clear error when the guest's tar could not run or failed."""
    if not isinstance(result, ExecResult):
        raise MicroagentError(f"{what} in the guest did not finish")
    if result.error is not None and result.error.get("code") == "ENOENT":
        raise MicroagentError("the workspace has no tar: copying a directory needs tar "
                              "(and sh) in the image",
                              hint="copy single files, or install tar in the workspace")
    if result.host_exit_code != 0:
        detail = bytes(stderr).decode(errors="replace").strip()[-500:] or \
            str(result.error or f"exit {result.host_exit_code}")
        raise MicroagentError(f"{what} in the guest failed: {detail}")


def write_tar(entries: Iterable[HostEntry], top: str, out: BinaryIO, *,
              keep_owners: bool, skipped: list[str]) -> tuple[int, int]:
    """Serialise ``entries`` as members ``top/...`` into ``out``; (files, bytes)."""
    files = size = 0
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo("/".join((top, *entry.parts)))
            st = entry.st
            info.mode = stat.S_IMODE(st.st_mode)
            info.uid, info.gid = (st.st_uid, st.st_gid) if keep_owners else (0, 0)
            info.uname = info.gname = ""  # numeric owners, whatever the guest's passwd says
            info.mtime = int(st.st_mtime)
            if stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                with os.fdopen(fd, "rb") as f:
                    info.size = os.fstat(fd).st_size
                    tar.addfile(info, f)
                files += 1
                size += info.size
            elif stat.S_ISLNK(st.st_mode):
                info.type, info.linkname = tarfile.SYMTYPE, entry.target
                tar.addfile(info)
                files += 1
            elif stat.S_ISFIFO(st.st_mode):
                info.type = tarfile.FIFOTYPE
                tar.addfile(info)
                files += 1
            else:
                skipped.append(str(entry.path))
    return files, size


def tar_into_guest(client: AgentClient, directory: str,
                   produce: Callable[[BinaryIO], tuple[int, int]]) -> tuple[int, int]:
    """``tar -xf - -C directory`` in the guest, fed by ``produce(pipe)`` in a thread."""
    read_fd, write_fd = os.pipe()
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            with os.fdopen(write_fd, "wb", buffering=1 << 16) as pipe:
                outcome["counts"] = produce(pipe)
        except BrokenPipeError:
            pass  # the guest's tar ended early: its exit status says why
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=run, name="cp-tar", daemon=True)
    stderr = bytearray()
    thread.start()
    try:
        result = client.exec(ExecRequest(
            argv=("tar", "-xf", "-", "-C", directory), env=(GUEST_PATH,), stdin=True),
            stdout=stderr.extend, stderr=stderr.extend, stdin_fd=read_fd)
    finally:
        os.close(read_fd)  # unblocks a producer the guest stopped reading
        thread.join()
    error = outcome.get("error")
    if isinstance(error, BaseException):
        raise error
    check_tar(result, stderr, "tar -x")
    counts = outcome.get("counts")
    return counts if isinstance(counts, tuple) else (0, 0)
