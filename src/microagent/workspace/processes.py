"""Background processes of a running workspace: the public API's ``ws.spawn`` and
``Process`` handles, the CLI's ``exec -d``, ``top``, ``exec --attach`` and ``--signal``.

Each call opens a relayed channel through the supervisor (as ``workspace/guestfiles.py``
does), says hello and runs one operation of ``vm/agentprocs.py``. The processes belong to
the guest agent, so they outlive the channel, the CLI or Python process that started them
and the supervisor's relay; any later call finds them by id. ``spawn`` applies the
image's Env, WorkingDir and User as ``exec`` does. What the guest refuses is the error
tree's class: NotFoundError (no such process), ConflictError (it ended; its stdin is
closed), UsageError; else AgentFileError.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from microagent.errors import (
    AgentFileError,
    CommandNotExecutableError,
    CommandNotFoundError,
    ConflictError,
    MicroagentError,
    NotFoundError,
    ProtocolError,
)
from microagent.layout import StateLayout
from microagent.state.runtime import lock_held
from microagent.vm import agentprocs
from microagent.vm.agent import AgentClient
from microagent.vm.agentfiles import as_api_error
from microagent.vm.agentprocs import ProcessInfo, ProcessOutput
from microagent.workspace.execution import merge_env
from microagent.workspace.guestfiles import agent_session
from microagent.workspace.lifecycle import running_record

T = TypeVar("T")
SUPERVISOR_GONE_WAIT = 10.0

__all__ = ["ProcessInfo", "ProcessOutput", "list_processes", "process_info",
           "read_output", "signal_process", "spawn_process", "wait_process", "write_input"]


def _api_error(error: AgentFileError, name: str, process_id: int | None) -> MicroagentError:
    if error.code in ("ESRCH", "EPIPE"):
        return ConflictError(error.message)
    if error.code == "ENOENT" and process_id is not None:
        return NotFoundError(f"workspace {name} has no background process {process_id}",
                             hint=f"microagent top {name}")
    return as_api_error(error)


@contextlib.contextmanager
def _session(layout: StateLayout, name: str, doing: str, process_id: int | None = None
             ) -> Iterator[AgentClient]:
    """A hello'd agent client; what the guest refuses as the error tree's class (an
    unknown ``process_id``: NotFoundError naming it)."""
    with agent_session(layout, name, doing) as client:
        try:
            yield client
        except AgentFileError as e:
            raise _api_error(e, name, process_id) from e


def spawn_process(layout: StateLayout, name: str, argv: tuple[str, ...], *,
                  env: tuple[str, ...] = (), cwd: str = "", user: str = "") -> ProcessInfo:
    """Start ``argv`` in the background in ``name``, with the image's defaults."""
    ws = running_record(layout, name, "spawn")
    config = ws.image_config
    with agent_session(layout, name, "starting a background process") as client:
        try:
            return agentprocs.spawn(client, argv, env=merge_env(config.env, ws.env, env),
                                    cwd=cwd or config.working_dir or "/",
                                    user=user or config.user)
        except AgentFileError as e:
            if e.code == "ENOENT":
                raise CommandNotFoundError(e.message, e.hint) from e
            if e.code in ("EACCES", "ENOEXEC"):
                raise CommandNotExecutableError(e.code, e.message, e.hint) from e
            raise _api_error(e, name, None) from e


def _asked_again(layout: StateLayout, name: str, ask: Callable[[], T]) -> T:
    """``ask()``, and once more if its channel broke because the supervisor died under it
    (killed: the VM and the process run on, and the second call re-attaches a new one).
    Only for what only reads (list, describe, read output)."""
    try:
        return ask()
    except TimeoutError:  # an OSError, but the guest's answer: it still runs
        raise
    except (ProtocolError, OSError):
        lock = layout.run_files(name).lock
        deadline = time.monotonic() + SUPERVISOR_GONE_WAIT
        while lock_held(lock) and time.monotonic() < deadline:
            time.sleep(0.01)  # a dying supervisor: its lock goes last
        if lock_held(lock):
            raise
    return ask()


def list_processes(layout: StateLayout, name: str) -> list[ProcessInfo]:
    """The background processes of ``name``, in the order they were started."""
    def ask() -> list[ProcessInfo]:
        with _session(layout, name, "listing processes") as client:
            return agentprocs.list_processes(client)
    return _asked_again(layout, name, ask)


def process_info(layout: StateLayout, name: str, process_id: int) -> ProcessInfo:
    """One background process of ``name``; NotFoundError for an unknown id."""
    def ask() -> ProcessInfo:
        with _session(layout, name, "describing a process", process_id) as client:
            return agentprocs.process_info(client, process_id)
    return _asked_again(layout, name, ask)


def read_output(layout: StateLayout, name: str, process_id: int, offset: int = 0, *,
                stream: str = "stdout", max_bytes: int = agentprocs.READ_MAX,
                wait_s: float = 0.0) -> ProcessOutput:
    """Output of a background process from ``offset``, waiting up to ``wait_s`` (asked
    again of a new supervisor if the one relaying it dies meanwhile)."""
    deadline = time.monotonic() + wait_s

    def ask() -> ProcessOutput:
        left = max(deadline - time.monotonic(), 0.0)
        with _session(layout, name, "reading a process's output", process_id) as client:
            return agentprocs.read_output(client, process_id, offset, stream=stream,
                                          max_bytes=max_bytes, wait_s=left)
    return _asked_again(layout, name, ask)


def write_input(layout: StateLayout, name: str, process_id: int, data: bytes, *,
                close: bool = False) -> int:
    """Write to a background process's stdin (and close it); the bytes written."""
    with _session(layout, name, "writing to a process", process_id) as client:
        return agentprocs.write_input(client, process_id, data, close=close)


def signal_process(layout: StateLayout, name: str, process_id: int, signum: int) -> None:
    """Send ``signum`` to a background process's group."""
    with _session(layout, name, "signalling a process", process_id) as client:
        agentprocs.signal_process(client, process_id, signum)


def wait_process(layout: StateLayout, name: str, process_id: int,
                 timeout: float | None) -> ProcessInfo:
    """Wait for a background process to end; TimeoutError after ``timeout`` (counted
    from this call, also when it is asked again of a new supervisor)."""
    deadline = None if timeout is None else time.monotonic() + timeout

    def ask() -> ProcessInfo:
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        with _session(layout, name, "waiting for a process", process_id) as client:
            return agentprocs.wait_process(client, process_id, left)
    return _asked_again(layout, name, ask)
