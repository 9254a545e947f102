"""watch.py: following events and waiting for a state, on real files and real processes.

A workspace here is a record written as ``create`` writes it (no image, no disk: nothing
here boots). A live supervisor is a child process holding ``run/supervisor.lock``, which
is all the host looks at to tell whether one runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent.errors import NotFoundError, RetryableError, UsageError
from microagent.events import append_event
from microagent.layout import StateLayout
from microagent.store import file_lock
from microagent.workspace.watch import (
    EventTail,
    WaitTimeoutError,
    follow_events,
    settled,
    wait_for_state,
)
from tests.support.workspaces import LockHolder, later, make_workspace


@pytest.fixture
def holders() -> Iterator[list[LockHolder]]:
    """Lock-holding children, ended after the test."""
    started: list[LockHolder] = []
    yield started
    for holder in started:
        holder.release()


def supervisor(layout: StateLayout, name: str, holders: list[LockHolder]) -> LockHolder:
    holder = LockHolder(layout.run_files(name).lock)
    holders.append(holder)
    return holder


def test_event_tail_keeps_a_torn_line_until_it_is_complete(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    tail = EventTail(path)
    assert tail.read_new() == []  # no file yet
    path.write_bytes(b'{"time": "t1", "state": "starting", "detail": "boot"}\n'
                     b'{"time": "t2", "sta')
    assert [e.state for e in tail.read_new()] == ["starting"]
    assert tail.read_new() == []
    with path.open("ab") as f:
        f.write(b'te": "running", "detail": ""}\nnot json\n{"state": "no time"}\n')
    (event,) = tail.read_new()
    assert (event.time, event.state, event.detail) == ("t2", "running", "")


def test_events_of_a_settled_workspace_end_at_once(layout: StateLayout) -> None:
    make_workspace(layout, "w")
    append_event(layout.workspace_events("w"), "starting", "boot (tcg)")
    append_event(layout.workspace_events("w"), "failed", "could not boot")
    started = time.monotonic()
    states = [e.state for e in follow_events(layout, "w")]
    assert states == ["prepared", "starting", "failed"]
    assert time.monotonic() - started < 1


def test_follow_events_until_terminal_and_supervisor_gone(
        layout: StateLayout, holders: list[LockHolder]) -> None:
    make_workspace(layout, "w")
    events = layout.workspace_events("w")
    append_event(events, "starting", "boot (tcg)")
    holder = supervisor(layout, "w", holders)
    seen: list[str] = []

    def supervisor_life() -> None:
        append_event(events, "running", "ready")
        time.sleep(0.3)
        append_event(events, "failed", "the guest panicked")
        time.sleep(0.3)  # a restart policy: the supervisor lives on and boots again
        append_event(events, "starting", "restart 1 (policy always) after 1s")
        append_event(events, "running", "ready")
        time.sleep(0.3)
        append_event(events, "halted", "halted")
        time.sleep(0.3)
        holder.release()

    thread = later(0.2, supervisor_life)
    for event in follow_events(layout, "w", poll=0.02):
        seen.append(event.state)
    thread.join()
    assert seen == ["prepared", "starting", "running", "failed", "starting", "running",
                    "halted"]


def test_follow_events_ends_when_the_supervisor_dies_without_a_word(
        layout: StateLayout, holders: list[LockHolder]) -> None:
    make_workspace(layout, "w")
    append_event(layout.workspace_events("w"), "running", "ready")
    holder = supervisor(layout, "w", holders)
    thread = later(0.3, holder.release)
    states = [e.state for e in follow_events(layout, "w", poll=0.02)]
    thread.join()
    assert states == ["prepared", "running"]


def test_settled_waits_for_a_start_that_holds_the_workspace_lock(
        layout: StateLayout, holders: list[LockHolder]) -> None:
    make_workspace(layout, "w")
    append_event(layout.workspace_events("w"), "starting", "boot (tcg)")
    assert settled(layout, "w")  # derived: failed, the supervisor is gone
    holders.append(LockHolder(layout.lock_file("workspace", "w")))
    assert not settled(layout, "w")


def test_wait_for_the_default_terminal_states(
        layout: StateLayout, holders: list[LockHolder]) -> None:
    make_workspace(layout, "w")
    events = layout.workspace_events("w")
    append_event(events, "running", "ready")
    holder = supervisor(layout, "w", holders)

    def halt() -> None:
        append_event(events, "halting", "halt requested")
        time.sleep(0.2)
        append_event(events, "halted", "the guest powered off")
        time.sleep(0.2)
        holder.release()

    thread = later(0.2, halt)
    state = wait_for_state(layout, "w", timeout=20)
    thread.join()
    assert (state.state, state.detail) == ("halted", "the guest powered off")
    # returned once the supervisor was gone, so that a delete would not be refused
    assert not state.supervisor_alive


def test_wait_for_a_live_state(layout: StateLayout, holders: list[LockHolder]) -> None:
    make_workspace(layout, "w")
    supervisor(layout, "w", holders)
    thread = later(0.2, lambda: append_event(layout.workspace_events("w"), "running", "ok"))
    assert wait_for_state(layout, "w", ["running"], timeout=20).state == "running"
    thread.join()


def test_wait_times_out_naming_both_states(layout: StateLayout,
                                          holders: list[LockHolder]) -> None:
    make_workspace(layout, "w")
    append_event(layout.workspace_events("w"), "running", "ready")
    supervisor(layout, "w", holders)
    started = time.monotonic()
    with pytest.raises(WaitTimeoutError) as info:
        wait_for_state(layout, "w", ["halted"], timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 2
    assert isinstance(info.value, RetryableError) and info.value.exit_code == 75
    assert "is running" in info.value.message and "not halted" in info.value.message


def test_wait_reports_a_deleted_workspace(layout: StateLayout) -> None:
    from microagent.state.records import delete_workspace

    make_workspace(layout, "w")
    thread = later(0.2, lambda: delete_workspace(layout, "w"))
    with pytest.raises(NotFoundError) as info:
        wait_for_state(layout, "w", ["running"], timeout=20)
    thread.join()
    assert "was deleted while waiting" in info.value.message


def test_wait_does_not_take_a_start_in_progress_for_a_failure(
        layout: StateLayout, holders: list[LockHolder]) -> None:
    make_workspace(layout, "w")
    events = layout.workspace_events("w")
    with file_lock(layout.lock_file("workspace", "w"), what="workspace w"):
        append_event(events, "starting", "boot (tcg)")  # the supervisor is not up yet
        with pytest.raises(WaitTimeoutError):
            wait_for_state(layout, "w", timeout=0.2)


def test_bad_states_names_and_unknown_workspaces(layout: StateLayout) -> None:
    make_workspace(layout, "w")
    with pytest.raises(UsageError) as info:
        wait_for_state(layout, "w", ["runing"])
    assert "quarantined" in info.value.hint and "'runing'" in info.value.message
    for call in (lambda n: wait_for_state(layout, n, timeout=0),
                 lambda n: list(follow_events(layout, n))):
        with pytest.raises(UsageError):
            call("../w")
        with pytest.raises(NotFoundError):
            call("nope")
