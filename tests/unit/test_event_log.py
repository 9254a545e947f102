"""events.EventLog: the supervisor's events outlive a full disk, in order, whole lines."""

from __future__ import annotations

from pathlib import Path

from microagent.events import EventLog, append_event, read_events


def test_events_wait_for_room_and_keep_their_order_and_time(tmp_path: Path) -> None:
    real = tmp_path / "events.jsonl"
    append_event(real, "running", "ready")
    log = EventLog(Path("/dev/full"))  # every write: ENOSPC
    paused = log.append("paused", "host disk full in /x")
    resumed = log.append("running", "resumed")
    assert log.flush() is False and len(log.backlog) == 2
    log.path = real  # room again
    assert log.flush() is True and log.backlog == []
    assert read_events(real)[1:] == [paused, resumed]


def test_a_line_cut_short_by_a_full_disk_costs_only_itself(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    append_event(path, "running", "ready")
    with path.open("ab") as f:
        f.write(b'{"detail": "host disk fu')  # what ENOSPC let through of a line
    log = EventLog(path)
    log.torn = True  # as a failed write leaves it
    log.append("paused", "host disk full")
    assert [e.state for e in read_events(path)] == ["running", "paused"]
    assert path.read_bytes().endswith(b"\n")
