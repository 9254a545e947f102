"""Background processes in the guest through its agent: the ``spawn``, ``procs``,
``proc_read``, ``proc_write`` and ``proc_signal`` operations of ``docs/protocol.md``
(feature ``procs``), one stream each over a hello'd
:class:`~microagent.vm.agent.AgentClient`.

A background process belongs to the guest agent, not to the connection: it goes on when
this side goes away, and any later connection sees it by its id. Its output is kept in
the guest, bounded (the first MiB and the last MiB or so); :func:`read_output` reads it
from an offset, :class:`ProcessOutput` says what was dropped. What the guest refuses is
an :class:`~microagent.errors.AgentFileError` with its errno name (``ENOENT`` for an
unknown id, ``ESRCH`` for a process that ended, ``EPIPE`` for a closed stdin).
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Any

from microagent.vm.agentfiles import (
    Channel,
    answer_operation,
    file_error,
    frame_of,
    open_operation,
    require_feature,
    send_contents,
)
from microagent.vm.protocol import FrameType, ProtocolError

MAX_WAIT_S = 50.0  # one proc_read waits at most this long (below the idle limit)
READ_MAX = 1 << 20  # the agent's bound on one proc_read


@dataclass(frozen=True)
class ProcessInfo:
    """One background process as the agent describes it (an entry of ``procs``)."""

    id: int
    pid: int
    argv: tuple[str, ...]
    state: str  # "running", "exited" or "signaled"
    exit_code: int | None
    signal: int | None
    started_ms: int  # the guest's wall clock, ms since the epoch
    finished_ms: int | None
    stdin_open: bool
    stdout_size: int
    stderr_size: int
    stdout_dropped: int  # bytes between the kept head and the kept tail
    stderr_dropped: int
    directory: str  # where the guest keeps stdout, stderr and meta

    @property
    def running(self) -> bool:
        """The process (or what it left holding its output) still runs."""
        return self.state == "running"

    @classmethod
    def from_json(cls, doc: Any) -> ProcessInfo:
        """The entry the agent's document describes; ProtocolError when malformed."""
        try:
            out, err = doc["stdout"], doc["stderr"]
            return cls(id=int(doc["id"]), pid=int(doc["pid"]),
                       argv=tuple(str(a) for a in doc["argv"]), state=str(doc["state"]),
                       exit_code=doc.get("exit_code"), signal=doc.get("signal"),
                       started_ms=int(doc["started_ms"]), finished_ms=doc.get("finished_ms"),
                       stdin_open=bool(doc["stdin"]), stdout_size=int(out["size"]),
                       stderr_size=int(err["size"]), stdout_dropped=int(out["dropped"]),
                       stderr_dropped=int(err["dropped"]), directory=str(doc["dir"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"the guest agent sent a malformed process entry: "
                                f"{doc!r:.200}") from e

    def to_json(self) -> dict[str, Any]:
        """The entry as ``top --json`` prints it."""
        return {"id": self.id, "pid": self.pid, "argv": list(self.argv), "state": self.state,
                "exit_code": self.exit_code, "signal": self.signal,
                "started_ms": self.started_ms, "finished_ms": self.finished_ms,
                "stdin_open": self.stdin_open,
                "stdout": {"size": self.stdout_size, "dropped": self.stdout_dropped},
                "stderr": {"size": self.stderr_size, "dropped": self.stderr_dropped},
                "directory": self.directory}


@dataclass(frozen=True)
class ProcessOutput:
    """What one read of a process's output returned: the bytes at ``[offset, next)``;
    ``skipped`` bytes before ``offset`` were dropped by the guest's bound (the read asked
    for an offset in the dropped middle); ``eof``: the output ended there."""

    data: bytes
    offset: int
    next: int
    skipped: int
    eof: bool
    process: ProcessInfo


def spawn(client: Channel, argv: tuple[str, ...], *, env: tuple[str, ...] = (),
          cwd: str = "", user: str = "") -> ProcessInfo:
    """Start ``argv`` in the background (stdin a pipe until closed); its entry."""
    require_feature(client, "procs")
    doc = answer_operation(client, {"op": "spawn", "argv": list(argv), "env": list(env), "cwd": cwd,
                           "user": user})
    return ProcessInfo.from_json(doc.get("proc"))


def list_processes(client: Channel) -> list[ProcessInfo]:
    """Every background process the agent knows, in the order they were started."""
    require_feature(client, "procs")
    doc = answer_operation(client, {"op": "procs"})
    procs = doc.get("procs")
    if not isinstance(procs, list):
        raise ProtocolError("the guest agent sent a malformed process list")
    return [ProcessInfo.from_json(p) for p in procs]


def process_info(client: Channel, process_id: int) -> ProcessInfo:
    """The entry of one process; AgentFileError ``ENOENT`` for an unknown id."""
    require_feature(client, "procs")
    return ProcessInfo.from_json(answer_operation(client, {"op": "procs", "id": process_id})
                                 .get("proc"))


def read_output(client: Channel, process_id: int, offset: int = 0, *,
                stream: str = "stdout", max_bytes: int = READ_MAX,
                wait_s: float = 0.0) -> ProcessOutput:
    """Up to ``max_bytes`` of the output from ``offset``, waiting up to ``wait_s`` (at
    most :data:`MAX_WAIT_S` per call) when there is nothing there yet."""
    require_feature(client, "procs")
    wait_ms = round(min(max(wait_s, 0.0), MAX_WAIT_S) * 1000)
    stream_id = open_operation(client, {"op": "proc_read", "id": process_id, "stream": stream,
                               "offset": offset, "max": max_bytes, "wait_ms": wait_ms})
    data = bytearray()
    while True:
        frame = frame_of(client, stream_id)
        if frame.type == FrameType.FILE:
            data += frame.payload  # at most a window: no credit to return
        elif frame.type == FrameType.EXIT:
            doc = frame.json()
            return ProcessOutput(bytes(data), int(doc["offset"]), int(doc["next"]),
                                 int(doc["skipped"]), bool(doc["eof"]),
                                 ProcessInfo.from_json(doc.get("proc")))
        elif frame.type == FrameType.ERROR:
            raise file_error(frame)


def write_input(client: Channel, process_id: int, data: bytes, *,
                close: bool = False) -> int:
    """Write ``data`` to the process's stdin (within the agent's credit), then close it
    with ``close``; the bytes written."""
    require_feature(client, "procs")
    stream_id = open_operation(client, {"op": "proc_write", "id": process_id, "close": close})
    done, _ = send_contents(client, stream_id, io.BytesIO(data).read)
    return int(done.json().get("written", 0))


def signal_process(client: Channel, process_id: int, signum: int) -> None:
    """Send ``signum`` to the process's group; AgentFileError ``ESRCH`` once it ended."""
    require_feature(client, "procs")
    answer_operation(client, {"op": "proc_signal", "id": process_id, "signal": signum})


def wait_process(client: Channel, process_id: int, timeout: float | None) -> ProcessInfo:
    """Wait until the process ends (its entry), or TimeoutError after ``timeout``: each
    turn waits in the guest for new output or the end, whichever comes first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    info = process_info(client, process_id)
    while info.running:
        remaining = MAX_WAIT_S if deadline is None else deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"process {process_id} still runs")
        wait = min(remaining, MAX_WAIT_S)
        answer = read_output(client, process_id, info.stdout_size, max_bytes=0, wait_s=wait)
        if answer.eof and answer.process.running:  # stdout ended: stderr, else a nap
            answer = read_output(client, process_id, info.stderr_size, stream="stderr",
                                 max_bytes=0, wait_s=wait)
            if answer.eof and answer.process.running:
                time.sleep(0.05)
        info = answer.process
    return info
