"""Commands as background processes for the MCP tools: ``exec`` that yields, the output
of a process read from offsets and bounded, and ``timeout_s`` kept by the server.

``exec`` starts its command with ``ws.spawn`` and waits up to ``yield_s``; a command
still running then stays a background process of the guest (``process_output``
continues it). The guest's processes have no deadline of their own, so the server keeps
``timeout_s``: it SIGKILLs the process group when it passes (a timer while the process
runs in the background) and remembers which it killed, to say ``timed_out``.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from microagent.errors import MicroagentError, WaitTimeoutError
from microagent.mcpserver.bounded import BoundedSink

if TYPE_CHECKING:
    from microagent.api.processes import Process
    from microagent.vm.agentprocs import ProcessInfo

KILL_WAIT_S = 10.0  # how long a killed process may take to be reaped


def wait_ended(process: Process, timeout: float) -> bool:
    """Whether ``process`` ended within ``timeout`` seconds (its output is not read)."""
    if timeout <= 0:
        return process.poll() is not None
    try:
        process.wait(timeout, output=False)
    except WaitTimeoutError:
        return False
    return True


class Deadlines:
    """``timeout_s`` of the processes ``exec`` started: a timer each that SIGKILLs the
    process group when it passes, and the set of those it killed. Timers die with the
    server (the process then runs on). A process is known by its workspace, id and start
    time: ids begin at 1 again at every boot and go back with a restored snapshot, and a
    timer must not kill another process that has the id now."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._timers: dict[tuple[str, int, int], threading.Timer] = {}
        self._killed: set[tuple[str, int, int]] = set()

    def arm(self, process: Process, after_s: float) -> None:
        """Kill ``process`` in ``after_s`` seconds unless it ended by then."""
        try:
            started_ms = process.info().started_ms
        except MicroagentError:  # gone already: nothing to time
            return
        timer = threading.Timer(max(after_s, 0.0), self.expire, args=(process, started_ms))
        timer.daemon = True
        with self._lock:
            self._timers[(process.name, process.id, started_ms)] = timer
        timer.start()

    def expire(self, process: Process, started_ms: int | None = None) -> None:
        """Its deadline passed: SIGKILL it (nothing when it ended already, or when the id
        is another process's now)."""
        try:
            info = process.info()
        except MicroagentError:  # the workspace is gone, or halted
            return
        if started_ms is not None and info.started_ms != started_ms:
            return
        key = (process.name, process.id, info.started_ms)
        with self._lock:
            self._timers.pop(key, None)
        try:
            process.kill()
        except MicroagentError:  # it ended, or the workspace is gone
            return
        with self._lock:
            self._killed.add(key)

    def timed_out(self, process: Process, info: ProcessInfo) -> bool:
        """Whether the server killed ``process`` (``info``: as it is now) at its deadline."""
        with self._lock:
            return (process.name, process.id, info.started_ms) in self._killed


def read_bounded(process: Process, stream: str, since: int, limit: int
                 ) -> tuple[BoundedSink, int, ProcessInfo]:
    """The output of ``stream`` from offset ``since``, bounded to ``limit`` bytes (its
    head, and its newest tail): the sink, the offset to read from next, and the process
    as it was at the first read. At most two reads of the guest, each at most ``limit``."""
    sink = BoundedSink(limit)
    first = process.read(since, stream=stream, max_bytes=limit)
    sink.skip(first.skipped)
    sink(first.data)
    info = first.process
    size = info.stdout_size if stream == "stdout" else info.stderr_size
    end = first.next
    if end < size:  # more than the bound: jump to the newest tail
        tail_from = max(end, size - sink.tail_limit)
        tail = process.read(tail_from, stream=stream, max_bytes=sink.tail_limit)
        sink.skip(tail.offset - end)
        sink(tail.data)
        end = tail.next
    return sink, end, info


def process_data(process: Process, limit: int, since: int = 0, since_stderr: int = 0,
                 deadlines: Deadlines | None = None) -> dict[str, Any]:
    """The result of ``exec`` and ``process_output``: status (running, exited, signaled,
    timed_out), exit code, the new output of both streams bounded, and the offsets to go
    on from. The status is the process's at the stdout read, so a process that ended
    after it is still ``running`` here and no output is left unread."""
    out, out_next, info = read_bounded(process, "stdout", since, limit)
    err, err_next, _ = read_bounded(process, "stderr", since_stderr, limit)
    if info.running:
        status = "running"
    elif deadlines is not None and deadlines.timed_out(process, info):
        status = "timed_out"
    else:
        status = "signaled" if info.signal else "exited"
    duration = None if info.finished_ms is None else info.finished_ms - info.started_ms
    return {
        "status": status, "exit_code": None if status == "timed_out" else info.exit_code,
        "signal": info.signal, "process_id": process.id,
        "stdout": out.text(f"{info.directory}/stdout"),
        "stderr": err.text(f"{info.directory}/stderr"),
        "stdout_bytes": out.total, "stderr_bytes": err.total,
        "truncated": out.truncated or err.truncated, "duration_ms": duration,
        "next_since": out_next, "next_since_stderr": err_next}


def render(data: dict[str, Any]) -> str:
    """The short text of an ``exec`` or ``process_output`` result."""
    status = data["status"]
    if status == "running":
        how = (f"running as process {data['process_id']}: process_output with since="
               f"{data['next_since']} (since_stderr={data['next_since_stderr']}) goes on")
    elif status == "timed_out":
        how = "timed out, killed"
    elif status == "signaled":
        how = f"killed by signal {data['signal']}"
    else:
        how = f"exit {data['exit_code']}"
    parts = [f"[{how}]"]
    if data["stdout"]:
        parts.append(data["stdout"])
    if data["stderr"]:
        parts.append(f"[stderr]\n{data['stderr']}")
    return "\n".join(parts)
