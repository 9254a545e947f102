"""Supervisors spawned and reached: the one place a command starts a supervisor
(``start``'s boot, or one that re-attaches to a VM whose supervisor was lost:
vm/adopt.py) and waits for its first settled event, and the control socket's client
that re-attaches one before it asks (:func:`supervisor_of`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from typing import Any

from microagent.errors import StartError
from microagent.events import read_events
from microagent.layout import PRIVATE_UMASK, RunFiles, StateLayout
from microagent.state.runtime import (
    ADOPTABLE,
    RuntimeState,
    runtime_state,
    supervisor_alive,
)
from microagent.store import file_lock, open_private
from microagent.vm.control import SupervisorClient, connect_unix
from microagent.workspace.logs import capture_tail

DEFAULT_START_TIMEOUT = 120.0
SETTLED = frozenset({"running", "failed", "stopped", "halted"})
SUPERVISOR_END_WAIT = 5.0  # after a failed boot's final event


def until_supervising(layout: StateLayout, name: str,
                       supervisor: subprocess.Popen[bytes]) -> None:
    """Until the new supervisor holds its lock (or exited), within 10 s: the caller's
    workspace lock may be let go then."""
    deadline = time.monotonic() + 10
    while not supervisor_alive(layout.run_files(name)) and supervisor.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.01)


def reattach(layout: StateLayout, name: str, timeout: float = DEFAULT_START_TIMEOUT) -> bool:
    """A supervisor for the VM that ``name``'s lost supervisor left running (vm/adopt.py):
    True once there is one to ask, False when there is none to take over. A supervisor
    still dying, or another command's just starting, is waited for first. Raises
    StartError when the VM cannot be taken over (it is ended then)."""
    files = layout.run_files(name)
    deadline = time.monotonic() + timeout
    while True:
        with file_lock(layout.lock_file("workspace", name), what=f"workspace {name}",
                       timeout=30):
            state = runtime_state(layout, name)
            if state.orphaned:
                skip = len(read_events(layout.workspace_events(name)))
                supervisor = spawn_supervisor(layout, name, timeout, adopt=True)
                until_supervising(layout, name, supervisor)
                break
        if not state.supervisor_alive:
            return False  # no VM left to take over
        if not state.status.get("attaching") and _answers(files):
            return True  # another command's is there now
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)  # one dying (its lock not dropped yet), or one attaching
    wait_started(layout, name, supervisor, skip, timeout, ok=ADOPTABLE)
    return True


def _answers(files: RunFiles) -> bool:
    """The supervisor's control socket takes a connection."""
    try:
        connect_unix(files.dir, files.control_socket, timeout=1).close()
    except OSError:
        return False
    return True


def supervisor_of(layout: StateLayout, name: str) -> SupervisorClient:
    """The control socket's client for ``name``; one that re-attaches a supervisor to a
    VM that lost its own (:func:`reattach`) before it asks."""
    return SupervisorClient(layout.run_files(name), name,
                            reattach=lambda: reattach(layout, name))


def spawn_supervisor(layout: StateLayout, name: str, timeout: float,
                      adopt: bool = False) -> subprocess.Popen[bytes]:
    log = layout.workspace_supervisor_log(name)
    with os.fdopen(open_private(log, os.O_WRONLY | os.O_APPEND), "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "microagent.vm._supervise", "--state-dir", str(layout.root),
             "--timeout", str(timeout), *(["--adopt"] if adopt else []), name],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
            close_fds=True, cwd="/", umask=PRIVATE_UMASK,
        )


def wait_started(layout: StateLayout, name: str, supervisor: subprocess.Popen[bytes],
                  skip: int, timeout: float,
                  ok: frozenset[str] = frozenset({"running"})) -> RuntimeState:
    """Until the supervisor's first settled event after ``skip``: a state of ``ok`` (a
    re-attached VM may be paused or quarantined), else the boot's failure."""
    deadline = time.monotonic() + timeout + 30
    while time.monotonic() < deadline:
        events = read_events(layout.workspace_events(name))[skip:]
        settled = [e for e in events if e.state in SETTLED | ok]
        if settled and settled[0].state in ok:
            return runtime_state(layout, name)
        if settled:
            _wait_supervisor_end(layout, name, supervisor, skip + events.index(settled[0]))
            raise _boot_failure(layout, name, settled[0].detail)
        if supervisor.poll() is not None and not supervisor_alive(layout.run_files(name)):
            state = runtime_state(layout, name)
            if state.state in ok and not state.orphaned:
                return state
            raise _boot_failure(layout, name, "the supervisor exited: " +
                                _tail(layout.workspace_supervisor_log(name), 5))
        time.sleep(0.01)  # a few small reads per poll: start returns as soon as it can
    raise _boot_failure(layout, name, "timed out waiting for the supervisor")


def _wait_supervisor_end(layout: StateLayout, name: str,
                         supervisor: subprocess.Popen[bytes], failed_at: int) -> None:
    """After a failed boot the supervisor still cleans up (sockets, held volumes) for a
    moment: return once it has exited, so that the caller may delete the workspace at
    once; or when a restart policy boots again (a newer ``starting`` event)."""
    deadline = time.monotonic() + SUPERVISOR_END_WAIT
    while supervisor.poll() is None and time.monotonic() < deadline:
        later = read_events(layout.workspace_events(name))[failed_at + 1:]
        if any(e.state == "starting" for e in later):
            return
        time.sleep(0.01)


def _tail(path: Any, lines: int) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def _boot_failure(layout: StateLayout, name: str, detail: str) -> StartError:
    tail = capture_tail(layout.workspace_serial_log(name), 25)
    message = f"workspace {name} failed to start: {detail}\nlast console lines:\n"
    message += ("\n".join(f"  {x}" for x in tail.splitlines()) if tail.strip()
                else "  (none: the guest printed nothing on its console yet)")
    return StartError(message, hint=f"the full console is in `microagent logs {name}`")


