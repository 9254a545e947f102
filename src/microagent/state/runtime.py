"""Runtime state of a workspace, derived: record + last event + process liveness.

The supervisor holds an flock on ``run/supervisor.lock`` for its whole life, so "is the
supervisor alive" is a lock probe, immune to pid reuse; the kernel drops the lock when
the process dies, however it dies. ``run/status.json`` is the supervisor's own record
(pids, readiness). A workspace whose last event says it is running but whose supervisor
is gone is shown as ``failed``, never stuck as ``running``; unless its VM runs on (QEMU
outlives its supervisor: vm/adopt.py): then it keeps its state, ``orphaned``, until the
next command re-attaches a supervisor (workspace/lifecycle.reattach).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microagent.events import Event, last_event
from microagent.layout import RunFiles, StateLayout
from microagent.store import read_json

LIVE_STATES = frozenset({"starting", "running", "halting", "quarantined", "paused"})
ADOPTABLE = frozenset({"running", "quarantined", "paused"})  # a VM a new supervisor takes


@dataclass(frozen=True)
class RuntimeState:
    """What a workspace is doing now, as far as the host can tell."""

    state: str
    detail: str
    event: Event | None
    supervisor_alive: bool
    supervisor_pid: int | None = None
    vmm_pid: int | None = None
    vmm_alive: bool = False
    status: dict[str, Any] = field(default_factory=dict)
    orphaned: bool = False  # its VM runs on without a supervisor: one can re-attach

    @property
    def has_live_process(self) -> bool:
        """A supervisor or a VMM process still runs."""
        return self.supervisor_alive or self.vmm_alive


def supervisor_alive(files: RunFiles) -> bool:
    """True while some process holds the supervisor lock."""
    return lock_held(files.lock)


def lock_held(path: Path) -> bool:
    """True while some process holds the flock on ``path`` (a probe that never waits)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def process_start_time(pid: int) -> int | None:
    """The start time (clock ticks since boot) of ``pid``, or None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def same_process_alive(pid: int | None, start_time: int | None) -> bool:
    """``pid`` exists, is not a zombie, and is the process that started at ``start_time``."""
    if not pid:
        return False
    now = process_start_time(pid)
    if now is None or (start_time is not None and now != start_time):
        return False
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return False


def wait_exited(pid: int, start_time: int | None, timeout: float) -> bool:
    """Wait until ``pid`` (the process that started at ``start_time``) has exited, every
    thread of it: its descriptors and locks are released then (a zombie leader alone
    does not say so). True when it has; works for a process that is not a child."""
    import select

    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return True  # gone already
    try:
        if start_time is not None and process_start_time(pid) != start_time:
            return True  # another process has that pid now: ours is gone
        ready, _, _ = select.select([pidfd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(pidfd)


def read_status(files: RunFiles) -> dict[str, Any]:
    """The supervisor's runtime record, or {} when there is none."""
    try:
        return read_json(files.status)
    except (FileNotFoundError, ValueError):
        return {}
    except Exception:  # a torn or foreign record must not break status
        return {}


def runtime_state(layout: StateLayout, name: str) -> RuntimeState:
    """Derive the state of ``name`` from its last event and the liveness of its processes."""
    files = layout.run_files(name)
    event = last_event(layout.workspace_events(name))
    recorded = event.state if event else "prepared"
    alive = supervisor_alive(files)
    status = read_status(files) if files.dir.is_dir() else {}
    vmm_pid = status.get("vmm_pid")
    vmm_alive = same_process_alive(vmm_pid, status.get("vmm_start_time"))
    detail = event.detail if event else ""
    state = recorded
    orphaned = False
    if recorded in LIVE_STATES and not alive:
        if vmm_alive and recorded in ADOPTABLE and isinstance(status.get("launch"), dict):
            orphaned = True
            detail = (f"its supervisor is gone; the VM (pid {vmm_pid}) runs on: the next "
                      "command re-attaches one")
        else:
            state = "failed"
            detail = (f"the supervisor is gone; the VM process {vmm_pid} still runs: kill it"
                      if vmm_alive else "the supervisor is gone (killed or crashed)")
    return RuntimeState(state=state, detail=detail, event=event, supervisor_alive=alive,
                        supervisor_pid=status.get("supervisor_pid"), vmm_pid=vmm_pid,
                        vmm_alive=vmm_alive, status=status, orphaned=orphaned)
