"""logs.py: reading and following the console capture, written by the real ConsoleCapture.

Captures are written with :class:`microagent.vm.console.ConsoleCapture` and a small limit,
so rotation and the fresh capture of a new boot happen as the supervisor makes them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from microagent.errors import NotFoundError, UsageError
from microagent.events import append_event
from microagent.layout import StateLayout
from microagent.state.captures import rotated
from microagent.vm.console import ConsoleCapture
from microagent.workspace.logs import CaptureReader, LineEnds, follow_log, last_lines, read_log
from tests.support.workspaces import LockHolder, later, make_workspace


def test_last_lines() -> None:
    assert last_lines(b"a\nb\nc\n", 2) == b"b\nc\n"
    assert last_lines(b"a\nb\nc", 2) == b"b\nc"
    assert last_lines(b"a\nb\n", 5) == b"a\nb\n"
    assert last_lines(b"a\nb\n", 0) == b""
    assert last_lines(b"", 3) == b""
    assert last_lines(b"\n\n\n", 2) == b"\n\n"


def test_line_ends_across_chunks() -> None:
    ends = LineEnds()
    out = ends.feed(b"one\r") + ends.feed(b"\ntwo\r") + ends.feed(b"progress\r\n\r")
    assert out + ends.flush() == b"one\ntwo\rprogress\n\r"
    assert ends.flush() == b""


def test_read_log_both_halves_crlf_and_tail(layout: StateLayout) -> None:
    make_workspace(layout, "w")
    assert read_log(layout, "w") == b""  # never booted
    capture = ConsoleCapture(layout.workspace_serial_log("w"), limit=64)
    lines = [f"[    0.{i:06d}] line {i}\r\n".encode() for i in range(10)]
    for line in lines:
        capture.write(line)
    capture.write(b"\xff\xfe raw\r")
    assert rotated(layout.workspace_serial_log("w")).exists()
    expected = b"".join(lines).replace(b"\r\n", b"\n") + b"\xff\xfe raw\r"
    everything = read_log(layout, "w")
    # rotation keeps at least the limit: the start may be gone, the end is all there
    assert expected.endswith(everything) and len(everything) >= 64
    assert read_log(layout, "w", tail=2) == b"[    0.000009] line 9\n\xff\xfe raw\r"


def test_bad_and_unknown_names(layout: StateLayout) -> None:
    for call in (lambda n: read_log(layout, n), lambda n: list(follow_log(layout, n))):
        with pytest.raises(UsageError):
            call("a/b")
        with pytest.raises(NotFoundError) as info:
            call("nope")
        assert "no workspace named nope" in info.value.message


def test_reader_follows_rotation_and_new_boots(tmp_path: Path) -> None:
    path = tmp_path / "serial.log"
    reader = CaptureReader(path)
    assert reader.read_new() == b""  # nothing captured yet
    capture = ConsoleCapture(path, limit=100)
    capture.write(b"a" * 60)
    assert reader.read_new() == b"a" * 60
    capture.write(b"b" * 30)  # fits
    capture.write(b"c" * 30)  # rotates: the a's and b's move to serial.log.1
    assert reader.read_new() == b"b" * 30 + b"c" * 30
    capture.write(b"d" * 10)
    # a new boot: both files unlinked, a fresh capture, which rotates before we look
    second = ConsoleCapture(path, limit=100)
    second.write(b"e" * 80)
    second.write(b"f" * 40)
    assert reader.read_new() == b"d" * 10 + b"e" * 80 + b"f" * 40
    assert reader.read_new() == b""
    reader.close()


def test_reader_keeps_what_was_written_just_before_a_rotation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "serial.log"
    capture = ConsoleCapture(path, limit=100)
    capture.write(b"a" * 10)
    reader = CaptureReader(path)
    assert reader.read_new() == b"a" * 10
    real_stat = os.stat
    raced = []

    def stat_after_a_race(target: object, **kwargs: object) -> os.stat_result:
        if not raced:  # the writer runs between the reader's read and its look at the path
            raced.append(True)
            capture.write(b"b" * 80)
            capture.write(b"c" * 50)  # rotates: the b's end up in serial.log.1
        return real_stat(target, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", stat_after_a_race)
    assert reader.read_new() == b"b" * 80 + b"c" * 50
    reader.close()


def test_follow_until_the_workspace_stops(layout: StateLayout) -> None:
    make_workspace(layout, "w")
    events = layout.workspace_events("w")
    path = layout.workspace_serial_log("w")
    first = ConsoleCapture(path, limit=400)
    first.write(b"old boot\r\n")
    append_event(events, "running", "ready")
    holder = LockHolder(layout.run_files("w").lock)
    written: list[bytes] = []

    def console() -> None:
        capture = first
        for boot in range(2):
            if boot:  # a restart: a fresh capture
                capture = ConsoleCapture(path, limit=400)
            for i in range(40):
                line = f"boot {boot} line {i:02d}\r\n".encode()
                capture.write(line[:5])  # CR LF split between writes sometimes
                capture.write(line[5:])
                written.append(line)
                time.sleep(0.005)
        capture.write(b"no newline at the end\r")
        append_event(events, "halted", "halted")
        holder.release()

    try:
        thread = later(0.2, console)
        out = b"".join(follow_log(layout, "w", poll=0.01))
        thread.join()
    finally:
        holder.release()
    expected = b"".join(written).replace(b"\r\n", b"\n") + b"no newline at the end\r"
    assert out == b"old boot\n" + expected


def test_follow_a_stopped_workspace_prints_and_ends(layout: StateLayout) -> None:
    make_workspace(layout, "w")
    capture = ConsoleCapture(layout.workspace_serial_log("w"))
    for i in range(5):
        capture.write(f"line {i}\r\n".encode())
    append_event(layout.workspace_events("w"), "failed", "could not boot")
    started = time.monotonic()
    assert b"".join(follow_log(layout, "w", tail=2)) == b"line 3\nline 4\n"
    assert time.monotonic() - started < 1


def test_follow_reports_a_deleted_workspace(layout: StateLayout, tmp_path: Path) -> None:
    make_workspace(layout, "w")
    ConsoleCapture(layout.workspace_serial_log("w")).write(b"hello\r\n")
    append_event(layout.workspace_events("w"), "running", "ready")
    holder = LockHolder(layout.run_files("w").lock)

    def delete() -> None:  # as delete_workspace does, at the moment the supervisor ends
        layout.workspace_dir("w").rename(tmp_path / "deleted")
        holder.release()

    thread = later(0.2, delete)
    chunks = []
    try:
        with pytest.raises(NotFoundError) as info:
            for chunk in follow_log(layout, "w", poll=0.01):
                chunks.append(chunk)
    finally:
        thread.join()
        holder.release()
    assert b"".join(chunks) == b"hello\n"
    assert "was deleted" in info.value.message


def test_previous_is_the_boot_before_the_last_one_both_halves(layout: StateLayout) -> None:
    """``logs --previous``: a boot is the unit, however often its capture rotated."""
    make_workspace(layout, "w")
    path = layout.workspace_serial_log("w")
    assert read_log(layout, "w", previous=True) == b""  # never booted
    first = ConsoleCapture(path, limit=64)
    for i in range(6):
        first.write(f"first boot line {i}\r\n".encode())
    first.write(b"Kernel panic - not syncing\r\n")
    assert rotated(path).exists()
    assert read_log(layout, "w", previous=True) == b""  # booted once: no previous yet
    second = ConsoleCapture(path, limit=64)  # the restart
    second.write(b"second boot\r\n")
    previous = read_log(layout, "w", previous=True)
    assert previous.endswith(b"Kernel panic - not syncing\n") and b"second" not in previous
    assert b"first boot line" in previous  # the older half came along
    assert read_log(layout, "w") == b"second boot\n"
    assert not rotated(path).exists()  # the new boot has not rotated yet
    ConsoleCapture(path, limit=64)  # a third boot: the second is previous now, alone
    assert read_log(layout, "w", previous=True) == b"second boot\n"
    assert read_log(layout, "w") == b""


def test_capture_outlives_a_full_disk_and_says_what_it_lost(tmp_path: Path) -> None:
    """Writes that fail (here on /dev/full, which answers ENOSPC) are counted, not raised;
    the log says how much was lost once writes work again."""
    path = tmp_path / "serial.log"
    capture = ConsoleCapture(path)
    capture.write(b"before\r\n")
    kept = capture.fd
    capture.fd = os.open("/dev/full", os.O_WRONLY)
    capture.write(b"lost 1\r\n")
    capture.write(b"lost 2\r\n")
    os.close(capture.fd)
    capture.fd = kept
    capture.write(b"after\r\n")
    assert path.read_bytes() == (b"before\r\n\r\n[microagent: 16 bytes of console output "
                                 b"were lost: No space left on device]\r\nafter\r\n")
