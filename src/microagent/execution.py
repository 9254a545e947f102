"""``microagent exec``: run a command in a running workspace, streaming its output.

Builds the :class:`~microagent.agent.ExecRequest` from the image config and the user's
flags (the image's Env and WorkingDir apply unless overridden), opens a relayed channel
through the supervisor and runs it. With ``-t`` the local terminal goes raw for the
duration and size changes follow; without a terminal, SIGINT, SIGTERM, SIGHUP and
SIGQUIT are forwarded to the guest command.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from types import FrameType

from microagent.agent import AgentClient, ExecRequest, ExecResult
from microagent.control import SupervisorClient
from microagent.errors import UsageError
from microagent.layout import StateLayout
from microagent.lifecycle import require_running
from microagent.workspaces import get_workspace

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
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


def build_request(layout: StateLayout, name: str, options: ExecOptions,
                  tty_size: tuple[int, int] | None) -> ExecRequest:
    """The request for ``options`` with the image's defaults applied."""
    if not math.isfinite(options.timeout) or options.timeout < 0:
        raise UsageError(f"invalid exec timeout {options.timeout}",
                         hint="a number of seconds, 0 for no limit")
    ws = get_workspace(layout, name)
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
             stdout: Callable[[bytes], None], stderr: Callable[[bytes], None]) -> ExecResult:
    """Run one command in ``name``; stream its output; return how it ended."""
    require_running(layout, name, "exec")
    if options.tty and not any(item.startswith("TERM=") for item in options.env):
        # like docker: a pty session gets the local terminal's type
        options = replace(options, env=(f"TERM={os.environ.get('TERM') or 'xterm'}",
                                        *options.env))
    request = build_request(layout, name, options, terminal_size() if options.tty else None)
    sock, stdout_port = SupervisorClient(layout.run_files(name), name).open_channel_with_port(
        not options.tty)
    client = AgentClient(sock)
    try:
        client.hello()
        pending: list[bytes] = []
        stdin_fd = sys.stdin.fileno() if options.interactive else None
        with local_terminal(options.tty and stdin_fd is not None and os.isatty(stdin_fd)), \
                _forwarding(client, pending, options.tty):
            return client.exec(request, stdout=stdout, stderr=stderr, stdin_fd=stdin_fd,
                               poll=lambda: _drain(pending), stdout_port=stdout_port)
    finally:
        client.close()
        if stdout_port is not None:
            stdout_port.close()


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


def _drain(pending: list[bytes]) -> list[bytes]:
    frames = pending[:]
    pending.clear()
    return frames


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


@contextlib.contextmanager
def _forwarding(client: AgentClient, pending: list[bytes], tty: bool) -> Iterator[None]:
    """Forward signals (no pty) or window size changes (pty) to the guest command."""
    previous: dict[int, object] = {}

    def forward(signum: int, _frame: FrameType | None) -> None:
        pending.append(client.signal_frame(signum))

    def resize(_signum: int, _frame: FrameType | None) -> None:
        rows, cols = terminal_size()
        pending.append(client.resize_frame(rows, cols))

    handlers: dict[int, Callable[[int, FrameType | None], None]] = \
        {signal.SIGWINCH: resize} if tty else dict.fromkeys(FORWARDED_SIGNALS, forward)
    for signum, handler in handlers.items():
        previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)  # type: ignore[arg-type]
