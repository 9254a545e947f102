"""The serial console: captured into ``serial.log``, bounded on disk.

The supervisor connects to the VMM's console socket and appends everything to
``serial.log``; past :data:`LOG_LIMIT` the file is rotated to ``serial.log.1`` (the older
one dropped), so the capture keeps at least the most recent ``LOG_LIMIT`` bytes and never
more than twice that. Each boot starts a fresh capture; the previous one stays readable
until the next boot, so a failed boot can be read afterwards.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

LOG_LIMIT = 4 * 1024 * 1024


def rotated(path: Path) -> Path:
    """The older half of a capture."""
    return path.with_name(path.name + ".1")


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


class ConsoleCapture:
    """Appends console output to a bounded log and reports each complete line."""

    def __init__(self, path: Path, limit: int = LOG_LIMIT) -> None:
        self.path = path
        self.limit = limit
        for part in (rotated(path), path):
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.size = 0
        self.partial = b""
        self.writer: asyncio.StreamWriter | None = None

    def write(self, data: bytes) -> None:
        """Append ``data``, rotating when the file passes the limit."""
        if self.size + len(data) > self.limit and self.size:
            os.close(self.fd)
            os.replace(self.path, rotated(self.path))
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                              0o600)
            self.size = 0
        os.write(self.fd, data)
        self.size += len(data)

    async def capture(self, socket_path: str, deadline: float,
                      on_line: Callable[[str], None]) -> None:
        """Read the console socket until it closes; write and scan every byte."""
        import asyncio

        while True:
            try:
                reader, self.writer = await asyncio.open_unix_connection(socket_path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    return
                await asyncio.sleep(0.05)
        try:
            while data := await reader.read(65536):
                self.write(data)
                lines = (self.partial + data).split(b"\n")
                self.partial = lines.pop()[-4096:]
                for line in lines:
                    on_line(line.decode("utf-8", errors="replace"))
        finally:
            os.close(self.fd)
            self.fd = os.open(os.devnull, os.O_WRONLY)
