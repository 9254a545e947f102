"""``Process``: a handle on one background process of a workspace (``ws.spawn``,
``ws.processes()``, ``ws.process(id)``).

The process belongs to the guest agent: it goes on after the Python process (or CLI)
that started it exits, and any later handle with its id reaches it. Its stdout and
stderr are kept in the guest under ``/run/microagent/proc/ID/``, bounded: the first MiB
and the last MiB (to 1 MiB + 64 KiB) of each; what lies between is dropped, and reads
say how much (``docs/protocol.md``, background processes).
"""

from __future__ import annotations

import signal as signals
from typing import TYPE_CHECKING

from microagent.api.results import ExecResult

if TYPE_CHECKING:
    from microagent.layout import StateLayout
    from microagent.vm.agentprocs import ProcessInfo, ProcessOutput


class Process:
    """One background process of the workspace ``name``, by its id (stable for the
    guest's life). Made by ``ws.spawn``, ``ws.processes()`` and ``ws.process(id)``."""

    def __init__(self, layout: StateLayout, name: str, process_id: int) -> None:
        self._layout = layout
        self.name = name
        self.id = process_id

    def __repr__(self) -> str:
        return f"Process({self.name!r}, {self.id})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Process) and (other._layout.root, other.name, other.id) == \
            (self._layout.root, self.name, self.id)

    def __hash__(self) -> int:
        return hash((self.name, self.id))

    def info(self) -> ProcessInfo:
        """What the agent knows of it now: pid, argv, state, exit code, output sizes."""
        from microagent.workspace.processes import process_info

        return process_info(self._layout, self.name, self.id)

    def poll(self) -> int | None:
        """None while it runs; then its exit code, or -N after signal N (as
        ``subprocess.Popen.poll``)."""
        info = self.info()
        if info.running:
            return None
        return info.exit_code if info.signal is None else -info.signal

    def wait(self, timeout: float | None = None, *, output: bool = True) -> ExecResult:
        """Wait for it to end and return how it did with its output (what the guest kept:
        with more than 2 MiB on a stream, its head and tail only; ``output=False``: none
        read, stdout and stderr empty). WaitTimeoutError after ``timeout`` seconds (it
        goes on running)."""
        import math

        from microagent.errors import UsageError, WaitTimeoutError
        from microagent.workspace.processes import wait_process

        if timeout is not None and (isinstance(timeout, bool) or
                                    not isinstance(timeout, int | float) or
                                    not math.isfinite(timeout) or timeout < 0):
            raise UsageError(f"invalid wait timeout {timeout!r}: a number of seconds")
        try:
            info = wait_process(self._layout, self.name, self.id, timeout)
        except TimeoutError as e:
            raise WaitTimeoutError(f"process {self.id} of {self.name} still runs "
                                   f"after {timeout:g}s") from e
        stdout, stderr = (self.output("stdout"), self.output("stderr")) if output \
            else (b"", b"")
        duration = ((info.finished_ms or info.started_ms) - info.started_ms) / 1000
        return ExecResult(exit_code=info.exit_code, stdout=stdout, stderr=stderr,
                          signal=info.signal, duration_s=duration)

    def read(self, since: int = 0, wait_s: float = 0.0, *, stream: str = "stdout",
             max_bytes: int | None = None) -> ProcessOutput:
        """Output from offset ``since`` (up to ``max_bytes``, at most 1 MiB), waiting up
        to ``wait_s`` seconds when there is none yet: ``.data``, ``.next`` (the offset to
        read from next), ``.skipped`` (bytes dropped before ``.offset``), ``.eof``,
        ``.process``."""
        from microagent.errors import UsageError
        from microagent.vm.agentprocs import READ_MAX
        from microagent.workspace.processes import read_output

        if stream not in ("stdout", "stderr"):
            raise UsageError(f"invalid stream {stream!r}: \"stdout\" or \"stderr\"")
        if isinstance(since, bool) or not isinstance(since, int) or since < 0:
            raise UsageError(f"invalid offset {since!r}: a byte offset, 0 or more")
        limit = READ_MAX if max_bytes is None else max_bytes
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= READ_MAX:
            raise UsageError(f"invalid max_bytes {max_bytes!r}: 0 to {READ_MAX}")
        return read_output(self._layout, self.name, self.id, since,
                           stream=stream, max_bytes=limit, wait_s=wait_s)

    def output(self, stream: str = "stdout") -> bytes:
        """Everything the guest kept of ``stream`` so far, read from offset 0."""
        data, offset = bytearray(), 0
        while True:
            chunk = self.read(offset, stream=stream)
            data += chunk.data
            offset = chunk.next
            if not chunk.data:
                return bytes(data)

    def write(self, data: bytes | str, *, close: bool = False) -> int:
        """Write to its stdin (a str as UTF-8), then close it with ``close``; the bytes
        written. ConflictError once stdin is closed."""
        from microagent.workspace.processes import write_input

        content = data.encode() if isinstance(data, str) else bytes(data)
        return write_input(self._layout, self.name, self.id, content, close=close)

    def close_stdin(self) -> None:
        """Close its stdin (it reads end of file)."""
        from microagent.workspace.processes import write_input

        write_input(self._layout, self.name, self.id, b"", close=True)

    def signal(self, sig: int | str) -> None:
        """Send ``sig`` (a number, or a name such as "TERM" or "SIGTERM") to its
        process group. ConflictError once it has ended."""
        from microagent.workspace.processes import signal_process

        signal_process(self._layout, self.name, self.id,
                       signal_number(sig))

    def kill(self) -> None:
        """SIGKILL to its process group."""
        self.signal(signals.SIGKILL)


def signal_number(sig: int | str) -> int:
    """A signal's number from a number or a name ("TERM", "SIGTERM", "9"); UsageError."""
    from microagent.errors import UsageError

    if (isinstance(sig, int) and not isinstance(sig, bool)) or \
            (isinstance(sig, str) and sig.isdigit()):
        number = int(sig)
    elif isinstance(sig, str):
        name = sig.upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        member = getattr(signals.Signals, name, None) if name.isidentifier() else None
        if member is None:
            raise UsageError(f"invalid signal {sig!r}", hint="a number or a name like TERM")
        number = int(member)
    else:
        raise UsageError(f"invalid signal {sig!r}", hint="a number or a name like TERM")
    if not 1 <= number <= 64:
        raise UsageError(f"invalid signal {sig!r}: 1 to 64")
    return number
