"""``microagent exec``: run a command in a running workspace, streaming its output.

Builds the :class:`~microagent.vm.agent.ExecRequest` from the image config and the user's
flags (the image's Env and WorkingDir apply unless overridden), opens a relayed channel
through the supervisor and runs it. With ``-t`` the local terminal goes raw for the
duration and size changes follow; without a terminal, SIGINT, SIGTERM, SIGHUP and
SIGQUIT are forwarded to the guest command.

Every wait is bounded on the host, for a guest that may be frozen: a signal the command
has not ended within :data:`SIGNAL_GRACE` (or a second signal) ends the exec with 128+N
(with ``-t``, SIGINT, SIGTERM and SIGHUP end it at once), and ``--timeout S`` is also a
host deadline, S + :data:`EXEC_GRACE`. A VM that goes away under the command (a power-off,
a panic, a halt) is microagent's failure (125), named with the workspace's new state, not
the command's.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from types import FrameType

from microagent.errors import (
    MicroagentError,
    PausedError,
    Terminated,
    UnresponsiveError,
    UsageError,
)
from microagent.events import now_iso, read_events
from microagent.layout import StateLayout
from microagent.state.records import Workspace
from microagent.state.runtime import runtime_state
from microagent.vm.agent import AgentClient, ExecRequest, ExecResult
from microagent.vm.protocol import ProtocolError
from microagent.workspace.lifecycle import running_record, supervisor_pause
from microagent.workspace.supervisors import supervisor_of

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
ENDING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # with -t: end at once
SIGNAL_GRACE = 3.0  # a forwarded signal: how long the command has to end before we do
EXEC_GRACE = 10.0  # past --timeout: how long the guest has to report the command's end
GONE_WAIT = 10.0  # the VM went away: how long to wait for its new state to be recorded
ENDED_STATES = ("halted", "stopped", "failed", "paused")
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class ExecOptions:
    """What the user asked ``exec`` for."""

    argv: tuple[str, ...]
    env: tuple[str, ...] = ()
    workdir: str = ""
    user: str = ""
    interactive: bool = False
    tty: bool = False
    timeout: float = 0.0


def merge_env(*layers: tuple[str, ...]) -> tuple[str, ...]:
    """KEY=VALUE lists merged in order, later keys replacing earlier ones."""
    merged: dict[str, str] = {}
    for layer in layers:
        for item in layer:
            key, _, value = item.partition("=")
            merged[key] = value
    if "PATH" not in merged:
        merged["PATH"] = DEFAULT_PATH.split("=", 1)[1]
    return tuple(f"{k}={v}" for k, v in merged.items())


def build_request(ws: Workspace, options: ExecOptions,
                  tty_size: tuple[int, int] | None) -> ExecRequest:
    """The request for ``options`` with the image's defaults (of ``ws``'s record) applied."""
    if not math.isfinite(options.timeout) or options.timeout < 0:
        raise UsageError(f"invalid exec timeout {options.timeout}",
                         hint="a number of seconds, 0 for no limit")
    config = ws.image_config
    return ExecRequest(
        argv=options.argv,
        env=merge_env(config.env, ws.env, options.env),
        cwd=options.workdir or config.working_dir or "/",
        user=options.user or config.user,
        tty=tty_size if options.tty else None,
        stdin=options.interactive,
        # rounded up: a timeout below 1 ms is still one, not "no limit" (0)
        timeout_ms=math.ceil(options.timeout * 1000),
    )


def run_exec(layout: StateLayout, name: str, options: ExecOptions, *,
             stdout: Callable[[bytes], object], stderr: Callable[[bytes], object],
             stdin_fd: int | None = None, forward_signals: bool = True) -> ExecResult:
    """Run one command in ``name``; stream its output; return how it ended.

    With ``options.interactive``, the command's stdin is read from ``stdin_fd`` (default:
    this process's). ``forward_signals`` (the CLI's) installs the signal handlers of the
    module docstring, which only the main thread may; the library runs without them.
    """
    ws = running_record(layout, name, "exec")
    if options.tty and not any(item.startswith("TERM=") for item in options.env):
        # like docker: a pty session gets the local terminal's type
        options = replace(options, env=(f"TERM={os.environ.get('TERM') or 'xterm'}",
                                        *options.env))
    request = build_request(ws, options, terminal_size() if options.tty else None)
    begun = now_iso()
    sock, stdout_port = supervisor_of(layout, name).open_channel_with_port(
        not options.tty)
    client = AgentClient(sock)
    try:
        client.hello()
        # signal handlers belong to the main thread: elsewhere, none are installed
        watch = (_SignalWatch(client, options.tty)
                 if forward_signals and threading.current_thread() is threading.main_thread()
                 else None)
        if not options.interactive:
            stdin_fd = None
        elif stdin_fd is None:
            stdin_fd = sys.stdin.fileno()
        deadline = (time.monotonic() + options.timeout + EXEC_GRACE if options.timeout > 0
                    else None)
        with local_terminal(options.tty and stdin_fd is not None and os.isatty(stdin_fd)), \
                (watch.installed() if watch is not None else contextlib.nullcontext()):
            try:
                result = client.exec(request, stdout=stdout, stderr=stderr,
                                     stdin_fd=stdin_fd,
                                     poll=watch.poll if watch is not None else None,
                                     stdout_port=stdout_port, deadline=deadline)
            except UnresponsiveError as e:
                raise _unanswered(layout, name, options.timeout) from e
            except ProtocolError as e:  # the relay broke: the supervisor is gone
                raise _went_away(layout, name, begun, e.message) from e
        if result.error is not None and result.error.get("code") == "ECONNRESET":
            raise _went_away(layout, name, begun, str(result.error.get("message", "")))
        return result
    finally:
        client.close()
        if stdout_port is not None:
            stdout_port.close()


def _unanswered(layout: StateLayout, name: str, timeout: float) -> MicroagentError:
    """The host deadline passed: say why, when the workspace knows (paused)."""
    state = runtime_state(layout, name)
    if state.state == "paused":
        return PausedError(name, state.detail)
    paused = supervisor_pause(layout, name, state)  # not in the events: the disk is full
    if paused is not None:
        return PausedError(name, paused)
    return UnresponsiveError(
        f"workspace {name} did not end the command: its --timeout of {timeout:g}s passed "
        f"{EXEC_GRACE:g}s ago without an answer from the guest; the VM is unresponsive "
        f"(frozen, or paused)", hint=f"microagent status {name} says more; microagent kill "
        f"{name} ends it")


def _went_away(layout: StateLayout, name: str, since: str, why: str) -> MicroagentError:
    """The VM (or its supervisor) went away under a command: the workspace's new state,
    once the supervisor has recorded it (a halt, a power-off, a panic)."""
    deadline = time.monotonic() + GONE_WAIT
    while True:
        later = [e for e in read_events(layout.workspace_events(name)) if e.time >= since]
        ended = next((e for e in later if e.state in ENDED_STATES), None)
        state = runtime_state(layout, name)
        if ended is not None or state.state in ENDED_STATES or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if ended is None:
        return MicroagentError(f"workspace {name} went away while the command ran ({why}); "
                               f"it is {state.state}" + (f": {state.detail}" if state.detail
                                                         else ""))
    now = f"; it is now {state.state}" if state.state != ended.state else ""
    return MicroagentError(f"workspace {name} stopped while the command ran: {ended.state} "
                           f"({ended.detail}){now}", hint=f"microagent logs {name} shows "
                           "its console")


def terminal_size() -> tuple[int, int]:
    """(rows, columns) of the local terminal, asked of the tty itself.

    Not ``shutil.get_terminal_size``: it prefers $LINES and $COLUMNS, which go stale
    when the window is resized.
    """
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            size = os.get_terminal_size(stream.fileno())
            return size.lines, size.columns
    return 24, 80


@contextlib.contextmanager
def local_terminal(raw: bool) -> Iterator[None]:
    """Put the local terminal (standard input) in raw mode when ``raw``; always restore it."""
    if not raw:
        yield
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class _SignalWatch:
    """Signals during an exec: forwarded to the guest command (no pty) or resizes (pty),
    and the host's bound on a guest that does not act on them (see the module docstring).
    The handlers only take note; :meth:`poll`, called between reads, acts."""

    def __init__(self, client: AgentClient, tty: bool) -> None:
        self.client = client
        self.tty = tty
        self.pending: list[bytes] = []
        self.first: int | None = None  # the first signal, and when to give up on it
        self.give_up_at = 0.0
        self.now: int | None = None  # end at once (a second signal; with -t, any)

    def poll(self) -> list[bytes]:
        """The frames to send; raises Terminated when the exec must end here."""
        if self.now is not None:
            raise Terminated(self.now)
        if self.first is not None and time.monotonic() > self.give_up_at:
            name = signal.Signals(self.first).name
            raise Terminated(self.first, f"the command did not end within {SIGNAL_GRACE:g}s "
                                          f"of {name}; gave up on it (is the workspace "
                                          "unresponsive? see microagent status)")
        frames = self.pending[:]
        self.pending.clear()
        return frames

    def _forward(self, signum: int, _frame: FrameType | None) -> None:
        if self.first is not None:
            self.now = signum
        else:
            self.first, self.give_up_at = signum, time.monotonic() + SIGNAL_GRACE
        self.pending.append(self.client.signal_frame(signum))

    def _end(self, signum: int, _frame: FrameType | None) -> None:
        self.now = signum

    def _resize(self, _signum: int, _frame: FrameType | None) -> None:
        rows, cols = terminal_size()
        self.pending.append(self.client.resize_frame(rows, cols))

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The handlers, for the exec's duration."""
        handlers: dict[int, Callable[[int, FrameType | None], None]] = (
            {signal.SIGWINCH: self._resize, **dict.fromkeys(ENDING_SIGNALS, self._end)}
            if self.tty else dict.fromkeys(FORWARDED_SIGNALS, self._forward))
        previous = {signum: signal.signal(signum, handler)
                    for signum, handler in handlers.items()}
        try:
            yield
        finally:
            for signum, old in previous.items():
                signal.signal(signum, old)
