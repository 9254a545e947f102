"""Watching a workspace from the CLI: follow its events, wait for a state.

Both poll files the supervisor writes (``events.jsonl``) and the derived state
(:func:`microagent.state.runtime.runtime_state`); nothing here talks to the supervisor, so they
work the same on a workspace that is running, halted, or whose supervisor crashed.

A workspace *has settled* when nothing is left to watch: its derived state is not live,
no supervisor runs (with a restart policy the supervisor outlives a ``failed`` boot and
starts the VM again) and no command holds its workspace lock. The lock matters during
``start``: the event ``starting`` is written before the supervisor takes its own lock, and
in between the derived state reads ``failed`` ("the supervisor is gone").
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Collection, Iterator
from pathlib import Path

from microagent.errors import NotFoundError, UsageError
from microagent.errors import WaitTimeoutError as WaitTimeoutError
from microagent.events import Event
from microagent.layout import StateLayout
from microagent.state import records
from microagent.state.runtime import LIVE_STATES, RuntimeState, lock_held, runtime_state

STATES = ("prepared", "starting", "running", "halting", "halted", "stopped", "failed",
          "quarantined", "paused")
TERMINAL_STATES = ("halted", "stopped", "failed")
POLL = 0.1  # seconds between looks at the files
SUPERVISOR_EXIT_GRACE = 5.0  # how long wait lets a supervisor finish after a final event


def require_workspace(layout: StateLayout, name: str) -> None:
    """Refuse a bad name (usage) or an unknown workspace (not found); a broken record
    will do: its console, events and state are still there to read."""
    records.require_workspace(layout, name)


def deleted_error(name: str, doing: str) -> NotFoundError:
    """The error of a workspace deleted while a command was watching it."""
    return NotFoundError(f"workspace {name} was deleted while {doing}")


def settled(layout: StateLayout, name: str, state: RuntimeState | None = None) -> bool:
    """Nothing more will happen to ``name`` unless a command starts it again."""
    state = state or runtime_state(layout, name)
    return (state.state not in LIVE_STATES and not state.supervisor_alive
            and not lock_held(layout.lock_file("workspace", name)))


def exists(layout: StateLayout, name: str) -> bool:
    """The workspace's record is (still) there."""
    return layout.workspace_record(name).is_file()


def _parse_event(line: bytes) -> Event | None:
    """One line of ``events.jsonl``, or None when it is not a well-formed event."""
    try:
        raw = json.loads(line)
        return Event(str(raw["time"]), str(raw["state"]), str(raw.get("detail", "")))
    except (ValueError, KeyError, TypeError):
        return None


class EventTail:
    """Reads the events appended to ``events.jsonl`` since the last look.

    A line is only parsed once its newline is there: a writer caught mid-line (or a torn
    last line) stays pending until it is complete. Malformed lines are skipped, as
    :func:`microagent.events.read_events` does.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.pending = b""

    def read_new(self) -> list[Event]:
        """The complete events written since the previous call."""
        try:
            with self.path.open("rb") as f:
                if os.fstat(f.fileno()).st_size < self.offset:  # replaced: read it afresh
                    self.offset, self.pending = 0, b""
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        lines = (self.pending + data).split(b"\n")
        self.pending = lines.pop()
        return [event for line in lines if (event := _parse_event(line)) is not None]


def follow_events(layout: StateLayout, name: str, *, follow: bool = True,
                  poll: float = POLL) -> Iterator[Event]:
    """The events of ``name`` so far, then (with ``follow``) new ones as they are written.

    Following ends once the workspace has settled (see the module docstring), after the
    events written up to then are yielded. Raises NotFoundError when the workspace does
    not exist, or is deleted while being followed.
    """
    require_workspace(layout, name)
    tail = EventTail(layout.workspace_events(name))
    yield from tail.read_new()
    while follow:
        done = settled(layout, name)  # looked at before the read: nothing written is lost
        yield from tail.read_new()
        if done:
            if not exists(layout, name):
                raise deleted_error(name, "its events were followed")
            return
        time.sleep(poll)


def parse_states(states: Collection[str] | None) -> frozenset[str]:
    """The states to wait for (default: any terminal state); UsageError for unknown ones."""
    if not states:
        return frozenset(TERMINAL_STATES)
    unknown = sorted(set(states) - set(STATES))
    if unknown:
        raise UsageError(f"unknown state {', '.join(map(repr, unknown))}",
                         hint=f"valid states: {', '.join(STATES)}")
    return frozenset(states)


def wait_for_state(layout: StateLayout, name: str, states: Collection[str] | None = None, *,
                   timeout: float | None = None, poll: float = POLL / 2) -> RuntimeState:
    """Block until the derived state of ``name`` is one of ``states``; return it.

    ``states`` defaults to the terminal ones (halted, stopped, failed). A terminal state
    reached while the supervisor still runs is returned once the supervisor is gone, or
    once it moved on (a restart policy), or after a short grace: so that ``wait`` then
    ``delete`` works. Raises WaitTimeoutError after ``timeout`` seconds, NotFoundError
    when the workspace does not exist or is deleted while waiting.
    """
    targets = parse_states(states)
    require_workspace(layout, name)
    deadline = None if timeout is None else time.monotonic() + timeout
    wanted = " or ".join(s for s in STATES if s in targets)
    while True:
        state = runtime_state(layout, name)
        if not exists(layout, name):
            raise deleted_error(name, f"waiting for it to be {wanted}")
        transition = (not state.supervisor_alive
                      and lock_held(layout.lock_file("workspace", name)))
        if state.state in targets and not transition:
            return _let_supervisor_finish(layout, name, state, targets)
        if deadline is not None and time.monotonic() >= deadline:
            detail = f" ({state.detail})" if state.detail else ""
            raise WaitTimeoutError(
                f"workspace {name} is {state.state}{detail}, not {wanted}, "
                f"after {timeout:g}s", hint="wait longer with --timeout S")
        time.sleep(poll if deadline is None else max(0.0, min(poll,
                                                             deadline - time.monotonic())))


def _let_supervisor_finish(layout: StateLayout, name: str, state: RuntimeState,
                           targets: frozenset[str]) -> RuntimeState:
    """Give a supervisor that just wrote a final event a moment to exit."""
    if state.state not in TERMINAL_STATES or not state.supervisor_alive:
        return state
    deadline = time.monotonic() + SUPERVISOR_EXIT_GRACE
    while time.monotonic() < deadline:
        time.sleep(0.01)
        now = runtime_state(layout, name)
        if now.state not in targets:
            return state  # restarted: it was in the state, and has moved on
        state = now
        if not now.supervisor_alive:
            break
    return state
