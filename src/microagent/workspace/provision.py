"""``create --setup``: commands run once in a workspace before its first start.

The commands are recorded in ``workspaces/NAME/setup.json`` with ``pending: true`` when
the workspace is created. :func:`provision_at_create` boots the workspace, runs each with
``/bin/sh -c`` (output streamed with a ``[setup i/n]`` prefix), and halts it cleanly so
what they installed is on the disk; then the workspace is ``prepared`` again. A failing
command stops there: its exit code and the tail of its output are recorded, the
workspace is halted with setup still pending, and the error carries the command's exit
code (create exits with it). ``start`` of a workspace whose setup is pending runs the
commands again after booting (:func:`run_pending_setup`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from microagent.errors import MicroagentError
from microagent.errors import SetupFailedError as SetupFailedError
from microagent.events import append_event
from microagent.layout import StateLayout
from microagent.state.setup import SetupState, read_setup, write_setup

OUTPUT_TAIL = 4096  # bytes of a failed command's output kept for status
Sink = Callable[[bytes], object]


class PrefixedLines:
    """Writes output to ``sink`` line by line, each line behind a prefix."""

    def __init__(self, prefix: bytes, sink: Sink) -> None:
        self.prefix = prefix
        self.sink = sink
        self.partial = b""
        self.tail = bytearray()

    def feed(self, data: bytes) -> None:
        self.tail += data
        del self.tail[:-OUTPUT_TAIL]
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        if lines:
            self.sink(b"".join(self.prefix + line + b"\n" for line in lines))

    def flush(self) -> None:
        if self.partial:
            self.sink(self.prefix + self.partial + b"\n")
            self.partial = b""


def run_pending_setup(layout: StateLayout, name: str, output: Sink) -> None:
    """Run the pending setup commands in the running workspace ``name``, in order.

    Marks the setup done when all succeed; on the first failure records it and raises
    :class:`SetupFailedError`.
    """
    from microagent.workspace.execution import ExecOptions, run_exec

    state = read_setup(layout, name)
    if state is None or not state.pending:
        return
    total = len(state.commands)
    for index, command in enumerate(state.commands, 1):
        prefix = f"[setup {index}/{total}] ".encode()
        output(prefix + b"$ " + command.encode() + b"\n")
        lines = PrefixedLines(prefix, output)
        result = run_exec(layout, name, ExecOptions(argv=("/bin/sh", "-c", command)),
                          stdout=lines.feed, stderr=lines.feed)
        lines.flush()
        code = result.host_exit_code
        if code != 0:
            failure = {"index": index, "command": command, "exit_code": code,
                       "output": bytes(lines.tail).decode("utf-8", errors="replace")}
            write_setup(layout.workspace_setup(name),
                        SetupState(state.commands, True, failure))
            raise SetupFailedError(
                f"setup command {index} of {total} failed with exit code {code}: {command}",
                code, hint=f"the workspace keeps its setup pending; fix the cause and "
                           f"`microagent start {name}` runs it again, or delete it")
    write_setup(layout.workspace_setup(name), SetupState(state.commands, False))


def provision_at_create(layout: StateLayout, name: str, output: Sink, *,
                        progress: Any = None, timeout: float = 300.0) -> None:
    """Boot ``name``, run its setup, halt it cleanly; ``prepared`` again on success."""
    from microagent.state.runtime import runtime_state
    from microagent.workspace.lifecycle import boot_workspace, halt_workspace

    state = read_setup(layout, name)
    if state is None or not state.pending:
        return
    boot_workspace(layout, name, timeout=timeout, progress=progress)
    try:
        run_pending_setup(layout, name, output)
    except BaseException:
        if runtime_state(layout, name).state in ("running", "quarantined"):
            with contextlib.suppress(MicroagentError):
                halt_workspace(layout, name)
        raise
    halt_workspace(layout, name)
    append_event(layout.workspace_events(name), "prepared",
                 f"setup done ({len(state.commands)} command"
                 f"{'s' if len(state.commands) != 1 else ''})")
