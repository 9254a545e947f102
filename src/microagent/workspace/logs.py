"""The console log of a workspace, for ``logs``: read it whole, or follow it.

The supervisor captures the serial console into ``serial.log``, rotated to
``serial.log.1`` past a size limit (:class:`microagent.vm.console.ConsoleCapture`); each boot
starts afresh and moves the boot before it to ``serial.previous.log`` (and ``.1``), read
by ``logs --previous``. The capture stays after the VM is gone, so a failed boot can be
read, and after a restart by policy so can the boot that failed. The console speaks a
terminal's CR LF: it is given back with LF line ends (a lone CR is kept) and otherwise
byte for byte.

Following reads the current file through an open descriptor and notices, by inode, when
the path names another file: a rotation (the old file became ``serial.log.1``; what was
written to it last is drained through the descriptor) or a new boot (a new capture, whose
first half may already be in a new ``serial.log.1``). It ends once the workspace has
settled (:func:`microagent.workspace.watch.settled`), after draining what is left.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from microagent.layout import StateLayout
from microagent.state.captures import previous_capture, rotated
from microagent.workspace.watch import POLL, deleted_error, exists, require_workspace, settled

READ_SIZE = 1 << 20


def read_capture(path: Path) -> bytes:
    """The whole bounded capture: the rotated half, then the current file."""
    data = b""
    for part in (rotated(path), path):
        with contextlib.suppress(FileNotFoundError):
            data += part.read_bytes()
    return data


def capture_tail(path: Path, lines: int = 30) -> str:
    """The capture's last ``lines`` lines, for error messages."""
    text = read_capture(path).decode("utf-8", errors="replace").replace("\r", "")
    return "\n".join(text.splitlines()[-lines:])


def normalise(data: bytes) -> bytes:
    """The console's CR LF line ends as LF; a lone CR stays."""
    return data.replace(b"\r\n", b"\n")


def last_lines(data: bytes, count: int) -> bytes:
    """The last ``count`` lines of ``data`` (an unterminated last line counts as one)."""
    if count <= 0:
        return b""
    end = len(data) - 1 if data.endswith(b"\n") else len(data)
    start = end
    for _ in range(count):
        start = data.rfind(b"\n", 0, start)
        if start < 0:
            return data
    return data[start + 1:]


def read_log(layout: StateLayout, name: str, *, tail: int | None = None,
             previous: bool = False) -> bytes:
    """The captured console of ``name``'s last boot (with ``previous``, of the boot
    before it), or its last ``tail`` lines.

    Empty when the workspace has never booted (or booted once, with ``previous``).
    Raises UsageError for a bad name and NotFoundError for an unknown workspace.
    """
    require_workspace(layout, name)
    path = layout.workspace_serial_log(name)
    data = normalise(read_capture(previous_capture(path) if previous else path))
    return data if tail is None else last_lines(data, tail)


class LineEnds:
    """Turns CR LF into LF across chunk boundaries: a CR at a chunk's end waits."""

    def __init__(self) -> None:
        self.held = b""

    def feed(self, data: bytes) -> bytes:
        """The normalised text of ``data``, minus a trailing CR kept for the next chunk."""
        data = self.held + data
        self.held = b"\r" if data.endswith(b"\r") else b""
        return normalise(data[:len(data) - len(self.held)])

    def flush(self) -> bytes:
        """Whatever is held back (a CR that no LF followed)."""
        held, self.held = self.held, b""
        return held


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, READ_SIZE):
        chunks.append(chunk)
    return b"".join(chunks)


def _open(path: Path) -> tuple[int, int] | None:
    """A read descriptor on ``path`` and its inode, or None when it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    return fd, os.fstat(fd).st_ino


class CaptureReader:
    """Reads a rotating, re-created capture file from where the last read stopped.

    The descriptor of the file being read stays open, so its inode cannot be reused by
    a new file while it is compared with the one the path names.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self.inode: int | None = None

    def read_new(self) -> bytes:
        """Everything written since the previous call (the whole capture at first)."""
        data = b"" if self.fd is None else _read_all(self.fd)
        try:
            inode = os.stat(self.path).st_ino
        except FileNotFoundError:
            return data  # between a new boot's unlink and create: look again later
        if inode == self.inode:
            return data
        # The path names another file: a rotation or a new capture. The writer closed
        # ours before renaming or unlinking it, so what it wrote since the read above is
        # there now. An older half we have not read (a new boot's, or the whole capture
        # at first) comes next.
        if self.fd is not None:
            data += _read_all(self.fd)
        older = _open(rotated(self.path))
        if older is not None:
            older_fd, older_inode = older
            try:
                if older_inode != self.inode:
                    data += _read_all(older_fd)
            finally:
                os.close(older_fd)
        self.close()
        opened = _open(self.path)
        if opened is not None:
            self.fd, self.inode = opened
            data += _read_all(self.fd)
        return data

    def close(self) -> None:
        """Let go of the file being read."""
        if self.fd is not None:
            os.close(self.fd)
        self.fd = self.inode = None


def follow_log(layout: StateLayout, name: str, *, tail: int | None = None,
               poll: float = POLL) -> Iterator[bytes]:
    """The console of ``name`` (or its last ``tail`` lines), then what it prints next.

    Ends once the workspace has settled, after what was written until then; at once for
    a workspace that is not running. Raises NotFoundError for an unknown workspace, or
    one deleted while followed.
    """
    require_workspace(layout, name)
    reader = CaptureReader(layout.workspace_serial_log(name))
    ends = LineEnds()
    try:
        first = ends.feed(reader.read_new())
        yield first if tail is None else last_lines(first, tail)
        while True:
            done = settled(layout, name)  # looked at before the read: nothing is lost
            data = ends.feed(reader.read_new())
            if data:
                yield data
            if done:
                break
            time.sleep(poll)
        yield ends.flush()
    finally:
        reader.close()
    if not exists(layout, name):
        raise deleted_error(name, "its log was followed")
