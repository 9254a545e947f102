"""The verbs of a booted workspace: boot, status, halt, stop, kill, resume.

:func:`boot_workspace` (``start``; a pending setup then runs: workspace/start.py) checks
the host, installs the default kernel if missing, records ``starting``
and spawns the supervisor (``python -m microagent.vm._supervise NAME``) detached, then waits
for the supervisor to report ``running`` or a failure. The other verbs talk to the
supervisor over its control socket (:mod:`microagent.vm.control`). State is always derived
(:func:`microagent.state.runtime.runtime_state`), so a dead supervisor never leaves a workspace
looking alive. ``paused`` (QEMU stopped the vCPUs, e.g. on a full host disk) is derived
the same way, from the supervisor's ``paused`` event, or from the supervisor itself when
that event could not be written yet (the disk is full).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

from microagent.config import validate_name
from microagent.errors import (
    ConflictError,
    HostError,
    MicroagentError,
    PausedError,
    UnresponsiveError,
)
from microagent.errors import StartError as StartError
from microagent.events import append_event, read_events
from microagent.layout import StateLayout
from microagent.progress import NullProgress, Progress
from microagent.state.records import (
    BrokenWorkspaceError,
    Workspace,
    get_workspace,
    require_workspace,
)
from microagent.state.runtime import (
    ADOPTABLE,
    RuntimeState,
    runtime_state,
    same_process_alive,
    supervisor_alive,
    wait_exited,
)
from microagent.store import ensure_dir, file_lock
from microagent.workspace.supervisors import (
    DEFAULT_START_TIMEOUT,
    spawn_supervisor,
    supervisor_of,
    until_supervising,
    wait_started,
)

RUNNING = frozenset({"starting", "running", "halting"})
STATUS_WAIT = 30.0  # the supervisor's status probe is bounded well within this
HALTABLE = frozenset({"running", "quarantined", "paused"})


def stderr_sink(data: bytes) -> None:
    """Write ``data`` to stderr at once (the default for setup output)."""
    sys.stderr.buffer.write(data)
    sys.stderr.buffer.flush()


def boot_workspace(layout: StateLayout, name: str, *, timeout: float = DEFAULT_START_TIMEOUT,
                   progress: Progress | None = None, from_snapshot: str | None = None,
                   cold: bool = False) -> RuntimeState:
    """Boot ``name`` and return once the guest is ready for exec (``start`` without a
    pending setup: workspace/start.py). A suspended workspace, or a fork's first start,
    resumes from its memory instead (not with ``cold``); ``from_snapshot`` restores the
    snapshot of that tag (workspace/snapshots.py ``plan_resume``). A workspace whose VM
    ran on without its supervisor gets one again instead (:func:`reattach`)."""
    progress = progress or NullProgress()
    validate_name(name)
    with file_lock(layout.lock_file("workspace", name), what=f"workspace {name}", timeout=30):
        current = runtime_state(layout, name)
        skip = len(read_events(layout.workspace_events(name)))
        if current.orphaned and from_snapshot is None and not cold:
            supervisor = spawn_supervisor(layout, name, timeout, adopt=True)
            ok = ADOPTABLE
        else:
            supervisor = _boot_locked(layout, name, current, timeout, progress,
                                      from_snapshot, cold)
            skip, ok = skip + 1, frozenset({"running"})  # after its `starting`
        until_supervising(layout, name, supervisor)
    return wait_started(layout, name, supervisor, skip, timeout, ok=ok)


def _boot_locked(layout: StateLayout, name: str, current: RuntimeState, timeout: float,
                 progress: Progress, from_snapshot: str | None,
                 cold: bool) -> subprocess.Popen[bytes]:
    """:func:`boot_workspace`'s checks, under the workspace's lock, and the supervisor
    spawned (its ``starting`` event recorded first)."""
    from microagent.disks.attachments import check_before_start
    from microagent.guest import agent_binary
    from microagent.network import check_ports_free, has_network
    from microagent.vm.backends.base import choose_accel
    from microagent.vm.backends.qemu import QemuBackend
    from microagent.vm.launch import workspace_kernel
    from microagent.vm.passt import passt_problems
    from microagent.vm.snapshot import write_order
    from microagent.workspace.snapshots import plan_resume

    workspace = get_workspace(layout, name)
    paused = supervisor_pause(layout, name, current) if current.state in RUNNING else None
    if paused is not None:  # not in its events yet: the disk is full
        raise ConflictError(f"workspace {name} is paused: {paused}; it runs already",
                            hint=f"resume it: microagent resume {name}")
    if current.state in RUNNING:
        raise ConflictError(f"workspace {name} is already running", hint=(
            f"halt it first (microagent halt {name}): a restore replaces its memory and "
            "its disk" if from_snapshot is not None else ""))
    if current.state == "quarantined":
        raise ConflictError(f"workspace {name} is quarantined",
                            hint="halt, stop or kill it first")
    if current.state == "paused":
        raise ConflictError(f"workspace {name} is paused: {current.detail}; it runs "
                            "already", hint=f"resume it: microagent resume {name}")
    if current.vmm_alive and not current.supervisor_alive and current.event is not None \
            and current.event.state == "starting":
        _end_unfinished_start(layout, name, current)  # its supervisor died booting it
        current = runtime_state(layout, name)
    if current.has_live_process:
        raise ConflictError(f"workspace {name} still has a VM process "
                            f"(pid {current.vmm_pid})", hint=f"microagent kill {name}")
    # volumes there (never re-created) and not held elsewhere; --disk and bundle files
    check_before_start(layout, name, workspace.disks)
    check_ports_free(workspace.ports)  # a taken --publish port, before QEMU says so
    problems = QemuBackend().check_host()
    if has_network(workspace.network):
        problems += passt_problems()
    if problems:
        raise HostError("; ".join(problems))
    workspace_kernel(layout, workspace, install_if_missing=True)  # default: on first use
    agent_binary()
    order = plan_resume(layout, workspace, current.state, from_snapshot=from_snapshot,
                        cold=cold, progress=progress)
    accel = choose_accel()
    if accel.accel == "tcg" and not os.environ.get("MICROAGENT_ACCEL"):
        progress.step(f"notice: {accel.reason}")
    files = layout.run_files(name)
    shutil.rmtree(files.dir, ignore_errors=True)
    ensure_dir(files.dir)
    if order is not None:
        write_order(files.resume_order, order)
    how = "boot" if order is None else {"restored": f"restore from {order.label}",
                                        "forked": f"fork from {order.label}"}.get(
        order.kind, "resume from its suspended memory")
    append_event(layout.workspace_events(name), "starting", f"{how} ({accel.accel})")
    return spawn_supervisor(layout, name, timeout)


def _end_unfinished_start(layout: StateLayout, name: str, state: RuntimeState) -> None:
    """The VM of a start whose supervisor died before it was running (booting, loading a
    memory image): nothing can take it over; ended, so that this start boots again."""
    from microagent.vm.memory import sweep_memory_files

    pid, started = state.vmm_pid, state.status.get("vmm_start_time")
    if pid and same_process_alive(pid, started):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_exited(pid, started, 10)
        append_event(layout.workspace_events(name), "failed",
                     f"the unfinished start's VM process {pid} was ended (its supervisor "
                     "was gone)")
    sweep_memory_files()


def require_running(layout: StateLayout, name: str, verb: str) -> RuntimeState:
    """The runtime state of ``name`` if it is running, else a clear refusal."""
    validate_name(name)
    get_workspace(layout, name)
    state = runtime_state(layout, name)
    _refuse_unless_running(name, verb, state.state, state.detail)
    return state


def running_record(layout: StateLayout, name: str, verb: str) -> Workspace:
    """The record of ``name`` if it is running, else the refusal of
    :func:`require_running` (one read of the record and of the state: exec's path)."""
    validate_name(name)
    ws = get_workspace(layout, name)
    _refuse_unless_running(name, verb, ws.state,
                           ws.last_event.detail if ws.last_event is not None else "")
    return ws


def _refuse_unless_running(name: str, verb: str, state: str, detail: str) -> None:
    if state == "paused":
        raise PausedError(name, detail)
    if state == "quarantined" and verb in ("exec", "cp", "connect"):
        raise ConflictError(f"workspace {name} is quarantined: {verb} is refused",
                            hint="halt, stop or kill it to end the quarantine")
    if state != "running":
        raise ConflictError(f"workspace {name} is not running (state {state})",
                            hint=f"start it first: microagent start {name}")


def halt_workspace(layout: StateLayout, name: str, *, grace_ms: int = 10_000) -> str:
    """The clean, disk-preserving shutdown; returns the final state."""
    validate_name(name)
    require_workspace(layout, name)  # a broken record will do: only processes matter
    state = runtime_state(layout, name)
    if state.state == "suspended":
        from microagent.workspace.snapshots import discard_suspended

        with file_lock(layout.lock_file("workspace", name), what=f"workspace {name}",
                       timeout=30):  # not while a start resumes from it
            if runtime_state(layout, name).state == "suspended":
                discard_suspended(layout, name)
                append_event(layout.workspace_events(name), "halted",
                             "its suspended memory was discarded; the next start boots "
                             "its disk (its journal is replayed)")
                return "halted"
        state = runtime_state(layout, name)
    if state.state not in HALTABLE:
        raise ConflictError(f"workspace {name} is not running (state {state.state})")
    answer = supervisor_of(layout, name).request(
        "halt", timeout=grace_ms / 1000 + 60, grace_ms=grace_ms)
    _wait_supervisor_gone(layout, name, 30)
    final = str(answer.get("state", "halted"))
    if final != "halted":
        raise MicroagentError(f"workspace {name} did not halt cleanly: "
                              f"{answer.get('detail', final)}")
    return final


def stop_workspace(layout: StateLayout, name: str) -> str:
    """Ask the guest to shut down; ``stopped`` within five seconds, else ``failed``."""
    validate_name(name)
    require_workspace(layout, name)  # a broken record will do: only processes matter
    state = runtime_state(layout, name)
    if state.state not in HALTABLE:
        raise ConflictError(f"workspace {name} is not running (state {state.state})")
    answer = supervisor_of(layout, name).request("stop", timeout=30)
    if answer.get("state") != "stopped":
        raise MicroagentError(f"workspace {name} did not stop within 5 seconds; "
                              "it is marked failed and its VM is left running",
                              hint=f"end it with: microagent kill {name}")
    _wait_supervisor_gone(layout, name, 30)
    return "stopped"


def pause_workspace(layout: StateLayout, name: str) -> str:
    """``running`` → ``paused``: the vCPUs stop; the VM, its sockets and memory stay
    (exec, cp and console input are refused until ``resume``)."""
    validate_name(name)
    get_workspace(layout, name)
    state = runtime_state(layout, name)
    if state.state == "paused":
        raise ConflictError(f"workspace {name} is already paused ({state.detail})")
    if state.state != "running":
        raise ConflictError(f"workspace {name} is not running (state {state.state})",
                            hint="pause stops a running workspace's vCPUs")
    supervisor_of(layout, name).request("pause", timeout=30)
    return "paused"


def resume_workspace(layout: StateLayout, name: str) -> str:
    """``paused`` → ``running``: the vCPUs run again (after a host pause QEMU retries the
    disk writes that failed). Refused when it is not paused; an error when it pauses again
    at once (the host disk is still full)."""
    validate_name(name)
    get_workspace(layout, name)
    state = runtime_state(layout, name)
    if state.state != "paused" and supervisor_pause(layout, name, state) is None:
        raise ConflictError(f"workspace {name} is not paused (state {state.state})")
    supervisor_of(layout, name).request("resume", timeout=30)
    return "running"


def supervisor_pause(layout: StateLayout, name: str, state: RuntimeState) -> str | None:
    """Why the VM is paused, when the supervisor knows of a pause that its event could not
    record yet (a full disk); None when it is not."""
    if not state.supervisor_alive or state.state != "running":
        return None
    with contextlib.suppress(MicroagentError, OSError):
        answer = supervisor_of(layout, name).request("status", timeout=10)
        paused = answer.get("status", {}).get("paused")
        if isinstance(paused, dict):
            return str(paused.get("reason", "paused"))
    return None


def kill_workspace(layout: StateLayout, name: str) -> str:
    """End the VM process at once; state ``stopped``."""
    from microagent.vm.memory import sweep_memory_files

    validate_name(name)
    require_workspace(layout, name)  # a broken record will do: only processes matter
    state = runtime_state(layout, name)
    sweep_memory_files()  # a SIGKILLed supervisor's RAM file, if any
    if state.supervisor_alive:
        with contextlib.suppress(MicroagentError):
            supervisor_of(layout, name).request("kill", timeout=30)
        if _wait_supervisor_gone(layout, name, 30):
            return "stopped"
        if state.supervisor_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(state.supervisor_pid, signal.SIGKILL)
    if state.vmm_alive and state.vmm_pid:
        started = state.status.get("vmm_start_time")
        with contextlib.suppress(ProcessLookupError):
            os.kill(state.vmm_pid, signal.SIGKILL)
        wait_exited(state.vmm_pid, started, 10)
        sweep_memory_files()  # its RAM file, whose lock it held
        append_event(layout.workspace_events(name), "stopped",
                     f"killed VM process {state.vmm_pid} (its supervisor was gone)")
        return "stopped"
    if state.supervisor_alive:
        append_event(layout.workspace_events(name), "stopped", "killed")
        return "stopped"
    raise ConflictError(f"workspace {name} has no live VM process to kill "
                        f"(state {state.state})")


def _wait_supervisor_gone(layout: StateLayout, name: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while supervisor_alive(layout.run_files(name)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def workspace_status(layout: StateLayout, name: str, *, probe: bool = True) -> dict[str, Any]:
    """One workspace in full: record, derived state, pids, readiness, last events; for a
    broken workspace, its name, state ``broken``, the error and its last events."""
    try:
        ws = get_workspace(layout, name)
    except BrokenWorkspaceError as e:
        return {**e.workspace.to_json(), "detail": e.hint, "last_events": [
            x.to_json() for x in read_events(layout.workspace_events(name))[-5:]]}
    state = runtime_state(layout, name)
    status = state.status
    current, detail = state.state, state.detail
    if state.supervisor_alive and state.state in ("running", "paused"):
        try:
            status = supervisor_of(layout, name).request(
                "status", timeout=STATUS_WAIT, probe=probe)["status"]
        except UnresponsiveError as e:  # a frozen supervisor: say so, from its record
            status = {**status, "readiness": {**status.get("readiness", {}), "execReady": {
                "ok": False, "detail": e.message}}}
        except (MicroagentError, OSError):
            pass
        paused = status.get("paused")
        if isinstance(paused, dict):  # perhaps not in the events yet: the disk is full
            current, detail = "paused", str(paused.get("reason", ""))
    live = current in RUNNING | {"quarantined", "paused"}
    readiness = status.get("readiness", {}) if live else {}

    def signal_of(key: str) -> dict[str, Any]:
        value = readiness.get(key)
        if isinstance(value, dict):
            return value
        return {"ok": False, "detail": "not yet" if live else f"workspace is {current}"}

    document = ws.to_json()
    document.update(
        state=current,
        detail=detail,
        pid=state.vmm_pid if state.vmm_alive else None,
        supervisor_pid=state.supervisor_pid if state.supervisor_alive else None,
        uptime_seconds=_uptime(status) if state.vmm_alive else None,
        accel=status.get("accel"),
        kernel=status.get("kernel"),
        guestReady=signal_of("guestReady"),
        execReady=signal_of("execReady"),
        consoleReady=signal_of("consoleReady"),
        networkReady=signal_of("networkReady"),
        network_info=status.get("network", {}),
        guest_address=_guest_address(status) if live else None,
        last_events=[e.to_json() for e in read_events(layout.workspace_events(name))[-5:]],
    )
    from microagent.state.setup import read_setup
    from microagent.state.snapshots import list_snapshots, resume_manifest

    setup = read_setup(layout, name)
    document["setup"] = setup.to_json() if setup is not None else None
    document["snapshots"] = len(list_snapshots(layout, name))
    document["resumes_from_memory"] = resume_manifest(layout, name) is not None
    document["memory_backing"] = status.get("memory") if live else None
    return document


def _guest_address(status: dict[str, Any]) -> str | None:
    """The guest's IPv4 address as its agent reported it (without the prefix length)."""
    net = status.get("network")
    if not isinstance(net, dict) or not net.get("configured") or not net.get("address"):
        return None
    return str(net["address"]).split("/")[0]


def _uptime(status: dict[str, Any]) -> float | None:
    import datetime as dt

    started = status.get("boot_started")
    if not started:
        return None
    with contextlib.suppress(ValueError):
        begun = dt.datetime.fromisoformat(started)
        return round((dt.datetime.now(dt.UTC) - begun).total_seconds(), 1)
    return None
