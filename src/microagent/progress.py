"""Progress of long work on stderr: bars on a terminal, plain lines otherwise.

CLI.md: long work shows progress on stderr when stderr is a TTY, and nothing decorative
otherwise. :class:`TerminalProgress` redraws one bar per layer in place;
:class:`LineProgress` prints one quiet line when each layer is done. Both are safe to call
from the threads that download layers in parallel.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Protocol, TextIO


class Progress(Protocol):
    """What long-running library calls report to. All methods are thread-safe."""

    def step(self, message: str) -> None:
        """A phase begins ("building root disk")."""

    def item_started(self, key: str, label: str, total: int | None) -> None:
        """An item (a layer) begins; ``total`` bytes when known."""

    def item_advanced(self, key: str, amount: int) -> None:
        """``amount`` more bytes of the item are done."""

    def item_done(self, key: str, note: str) -> None:
        """The item is finished; ``note`` says how ("downloaded", "cached")."""


class NullProgress:
    """Reports nothing (library use, ``--json``)."""

    def step(self, message: str) -> None:
        pass

    def item_started(self, key: str, label: str, total: int | None) -> None:
        pass

    def item_advanced(self, key: str, amount: int) -> None:
        pass

    def item_done(self, key: str, note: str) -> None:
        pass


def format_size(size: float) -> str:
    """Decimal sizes as docker prints them: ``532B``, ``28.4MB``, ``1.2GB``."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1000
    return f"{size:.1f}GB"


class LineProgress:
    """One plain line per phase and per finished item; for logs and pipes."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.lock = threading.Lock()
        self.labels: dict[str, tuple[str, int | None]] = {}

    def _write(self, line: str) -> None:
        with self.lock:
            self.stream.write(line + "\n")
            self.stream.flush()

    def step(self, message: str) -> None:
        self._write(message)

    def item_started(self, key: str, label: str, total: int | None) -> None:
        with self.lock:
            self.labels[key] = (label, total)

    def item_advanced(self, key: str, amount: int) -> None:
        pass

    def item_done(self, key: str, note: str) -> None:
        label, total = self.labels.get(key, (key, None))
        size = f" ({format_size(total)})" if total is not None else ""
        self._write(f"{label}: {note}{size}")


class TerminalProgress:
    """A bar per item, redrawn in place at most ten times a second."""

    WIDTH = 30

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.lock = threading.Lock()
        self.order: list[str] = []
        self.items: dict[str, list[object]] = {}  # key -> [label, total, done, note]
        self.drawn = 0
        self.last_draw = 0.0

    def step(self, message: str) -> None:
        with self.lock:
            self._redraw(force=True)
            self.stream.write(message + "\n")
            self.drawn = 0
            self.order = [k for k in self.order if not self.items[k][3]]
            self._redraw(force=True)

    def item_started(self, key: str, label: str, total: int | None) -> None:
        with self.lock:
            if key not in self.items:
                self.order.append(key)
            self.items[key] = [label, total, 0, ""]
            self._redraw(force=True)

    def item_advanced(self, key: str, amount: int) -> None:
        with self.lock:
            item = self.items.get(key)
            if item is not None:
                item[2] = int(str(item[2])) + amount
            self._redraw(force=False)

    def item_done(self, key: str, note: str) -> None:
        with self.lock:
            item = self.items.get(key)
            if item is not None:
                item[3] = note
            self._redraw(force=True)

    def _line(self, key: str) -> str:
        label, total, done, note = self.items[key]
        done_n = int(str(done))
        if note:
            return f"{label}: {note}"
        if isinstance(total, int) and total > 0:
            filled = min(self.WIDTH, done_n * self.WIDTH // total)
            bar = "=" * filled + (">" if filled < self.WIDTH else "")
            return (f"{label}: [{bar:<{self.WIDTH}}] "
                    f"{format_size(done_n)}/{format_size(total)}")
        return f"{label}: {format_size(done_n)}"

    def _redraw(self, *, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self.last_draw < 0.1:
            return
        self.last_draw = now
        if self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F")
        for key in self.order:
            self.stream.write("\x1b[2K" + self._line(key) + "\n")
        self.drawn = len(self.order)
        self.stream.flush()


def progress_for(stream: TextIO, *, quiet: bool = False) -> Progress:
    """Bars when ``stream`` is a terminal, plain lines otherwise, nothing when quiet."""
    if quiet:
        return NullProgress()
    if stream.isatty():
        return TerminalProgress(stream)
    return LineProgress(stream)
