"""The append-only lifecycle history of a workspace: ``events.jsonl``.

Each line is one JSON object ``{"time", "state", "detail"}``. Lines are appended with a
single ``write`` on an ``O_APPEND`` descriptor, so concurrent writers never interleave
within a line; a torn last line (a crash mid-write) is skipped by the reader.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Event:
    """One lifecycle event."""

    time: str
    state: str
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "state": self.state, "detail": self.detail}


def now_iso() -> str:
    """The current UTC time, ISO 8601 with milliseconds."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def _line(event: Event) -> bytes:
    return (json.dumps(event.to_json(), sort_keys=True) + "\n").encode()


def append_event(path: Path, state: str, detail: str = "") -> Event:
    """Append one event to ``path`` and return it."""
    event = Event(now_iso(), state, detail)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, _line(event))
    finally:
        os.close(fd)
    return event


class EventLog:
    """The supervisor's writer of ``events.jsonl``, which must outlive a full host disk.

    An event that cannot be written (ENOSPC, EDQUOT, any OSError) is kept and written
    before the next one, in order and with its own time, once the disk takes it again
    (:meth:`flush`). A line cut short by the full disk is ended before the next one, so
    that only it is lost to the reader, not the line after it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.backlog: list[Event] = []
        self.torn = False  # a write failed: the file may end inside a line

    def append(self, state: str, detail: str = "") -> Event:
        """Record one event now (or as soon as the disk takes it)."""
        event = Event(now_iso(), state, detail)
        self.backlog.append(event)
        self.flush()
        return event

    def flush(self) -> bool:
        """Write what is kept; whether nothing is left."""
        if not self.backlog:
            return True
        lines = [_line(event) for event in self.backlog]
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return False
        try:
            if self.torn and os.fstat(fd).st_size and os.pread(fd, 1, os.fstat(fd).st_size - 1) \
                    != b"\n":
                os.write(fd, b"\n")
            self.torn = False
            data = b"".join(lines)
            written = os.write(fd, data)
        except OSError:
            self.torn = True
            return False
        finally:
            os.close(fd)
        while self.backlog and written >= len(lines[0]):
            written -= len(lines.pop(0))
            self.backlog.pop(0)
        self.torn = bool(self.backlog)
        return not self.backlog


def read_events(path: Path) -> list[Event]:
    """All well-formed events in ``path`` (none if it does not exist)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    events = []
    for line in text.splitlines():
        try:
            raw = json.loads(line)
            events.append(Event(str(raw["time"]), str(raw["state"]), str(raw.get("detail", ""))))
        except (ValueError, KeyError, TypeError):
            continue
    return events


def last_event(path: Path) -> Event | None:
    """The most recent event, reading only the file's tail."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 8192))
            tail = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None
    for line in reversed(tail.splitlines()):
        try:
            raw = json.loads(line)
            return Event(str(raw["time"]), str(raw["state"]), str(raw.get("detail", "")))
        except (ValueError, KeyError, TypeError):
            continue
    return None
