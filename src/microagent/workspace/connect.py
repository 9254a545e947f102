"""``microagent connect``: the serial console's shell, interactively or one line at a time.

Both go through the supervisor, which owns the console (:mod:`microagent.vm.console`):
``attach_console`` puts the local terminal in raw mode and relays bytes both ways until
Ctrl-] (the workspace keeps running) or until the VM goes away; ``send_line`` types one
line and returns only what the command printed. One session holds the console at a time.
"""

from __future__ import annotations

import base64
import contextlib
import os
import selectors
import signal
import sys
from dataclasses import dataclass
from types import FrameType

from microagent.errors import ConflictError, MicroagentError, UsageError
from microagent.errors import ConsoleTimeoutError as ConsoleTimeoutError
from microagent.layout import StateLayout
from microagent.workspace.execution import local_terminal, terminal_size
from microagent.workspace.lifecycle import require_running
from microagent.workspace.supervisors import supervisor_of

ESCAPE = 0x1D  # Ctrl-], as telnet and virsh console
MAX_LINE = 256 * 1024
DEFAULT_SEND_TIMEOUT = 10.0


@dataclass(frozen=True)
class ConsoleAnswer:
    """What the console shell printed for one line, and the line's exit status."""

    output: bytes
    exit_code: int | None


def check_line(line: str) -> None:
    """One non-empty line of text: no newline, no other control character."""
    if not line.strip():
        raise UsageError("--send needs a command line; it was empty")
    controls = sorted({f"U+{ord(c):04X}" for c in line if ord(c) < 0x20 or ord(c) == 0x7F})
    if controls:
        raise UsageError(f"--send takes one line of text; this one contains control "
                         f"characters ({', '.join(controls)})",
                         hint="for a script of several lines, use: microagent exec NAME -- "
                              "sh -c '...'")
    if len(line.encode()) > MAX_LINE:
        raise UsageError(f"--send line is longer than {MAX_LINE // 1024} KiB",
                         hint="copy a script into the workspace and run it with exec")


def send_line(layout: StateLayout, name: str, line: str,
              timeout: float = DEFAULT_SEND_TIMEOUT) -> ConsoleAnswer:
    """Type ``line`` into the console shell of ``name``; return what it printed."""
    check_line(line)
    if timeout <= 0:
        raise UsageError("--timeout must be positive")
    _require_shell(layout, name)
    answer = supervisor_of(layout, name).request(
        "console-send", timeout=timeout + 15, line=line, wait=timeout, pid=os.getpid())
    output = base64.b64decode(answer.get("output", ""))
    if answer.get("incomplete"):
        raise UsageError("--send line is incomplete: the console shell asked for a "
                         "continuation (an unclosed quote, if, case or loop?); it was "
                         "interrupted with Ctrl-C")
    if answer.get("timed_out"):
        captured = output.decode("utf-8", errors="replace").rstrip()
        raise ConsoleTimeoutError(
            f"the console of {name} did not finish the line within {timeout:g}s; it was "
            f"interrupted with Ctrl-C" + (f". Captured so far:\n{captured}" if captured
                                          else "; nothing was printed"),
            hint="raise --timeout, or use exec for long-running commands")
    code = answer.get("exit_code")
    return ConsoleAnswer(output, int(code) if code is not None else None)


def attach_console(layout: StateLayout, name: str) -> str:
    """Relay the local terminal to the console until Ctrl-] or the VM ends.

    Returns ``"detached"`` or ``"closed"``.
    """
    _require_shell(layout, name)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    if not os.isatty(stdin):
        raise UsageError("connect needs a terminal on standard input",
                         hint=f'for scripts, send one line: microagent connect {name} '
                              f'--send "COMMAND"')
    client = supervisor_of(layout, name)
    rows, cols = terminal_size()
    sock = client.open_console(rows, cols)
    sys.stderr.write(f"Connected to the console of {name}. Detach with Ctrl-]; "
                     f"press Enter for a prompt.\r\n")
    sys.stderr.flush()
    resized = False

    def on_resize(_signum: int, _frame: FrameType | None) -> None:
        nonlocal resized
        resized = True

    ended = "closed"
    previous = signal.signal(signal.SIGWINCH, on_resize)
    try:
        with sock, local_terminal(True), selectors.DefaultSelector() as selector:
            selector.register(stdin, selectors.EVENT_READ)
            selector.register(sock, selectors.EVENT_READ)
            while True:
                if resized:
                    resized = False
                    rows, cols = terminal_size()
                    with contextlib.suppress(MicroagentError):
                        client.request("console-size", timeout=5, rows=rows, cols=cols)
                for key, _ in selector.select(timeout=0.5):
                    if key.fileobj == sock:
                        data = sock.recv(65536)
                        if not data:
                            return ended
                        _write_all(stdout, data)
                        continue
                    typed = os.read(stdin, 4096)
                    if not typed:
                        return ended
                    if ESCAPE in typed:
                        sock.sendall(typed[: typed.index(ESCAPE)])
                        ended = "detached"
                        return ended
                    sock.sendall(typed)
    except (ConnectionError, OSError) as e:
        if isinstance(e, ConnectionError):
            return ended
        raise MicroagentError(f"the console session broke: {e.strerror or e}") from e
    finally:
        signal.signal(signal.SIGWINCH, previous)


def _require_shell(layout: StateLayout, name: str) -> None:
    """Running, and with a shell on its console (the agent reports one at boot)."""
    state = require_running(layout, name, "connect")
    console = state.status.get("readiness", {}).get("consoleReady", {})
    if "no shell" in str(console.get("detail", "")):
        raise ConflictError(f"the console of {name} has no shell: the image has neither "
                            f"/bin/bash nor /bin/sh",
                            hint=f"use exec to run programs: microagent exec {name} -- ...")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
