"""``microagent run``: a scratch workspace for one command, removed afterwards.

:func:`run_once` creates a workspace with a generated, readable name, starts it (running
any ``--setup`` first), runs the command, or the image's Entrypoint and Cmd, with its
output streamed, and removes the workspace again: also when the command fails, when
anything on the way fails, and on Ctrl-C or SIGTERM (the VM is killed, not halted: its
disk is thrown away). ``keep=True`` halts it instead and leaves it for the user.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from types import FrameType

from microagent.errors import MicroagentError, Terminated, UsageError
from microagent.layout import StateLayout
from microagent.progress import Progress
from microagent.state.records import WorkspaceSpec
from microagent.vm.agent import ExecResult
from microagent.workspace.execution import ExecOptions

ADJECTIVES = ("amber", "bold", "brisk", "calm", "clever", "eager", "fuzzy", "gentle",
              "happy", "jolly", "keen", "lucky", "merry", "nimble", "quiet", "rapid",
              "shiny", "steady", "sunny", "swift", "tidy", "vivid", "witty", "zesty")
NOUNS = ("badger", "beaver", "comet", "falcon", "ferret", "gecko", "heron", "koala",
         "lemur", "lynx", "marten", "otter", "panda", "puffin", "quokka", "raven",
         "robin", "seal", "stoat", "tapir", "walrus", "wombat", "yak", "zebra")
CLEANUP_TIMEOUT = 60.0


@dataclass(frozen=True)
class RunOutcome:
    """How a one-shot run ended."""

    name: str
    result: ExecResult
    kept: bool


def scratch_name(layout: StateLayout) -> str:
    """``run-swift-otter-4821``: readable, and free in ``layout``."""
    while True:
        name = (f"run-{secrets.choice(ADJECTIVES)}-{secrets.choice(NOUNS)}-"
                f"{secrets.randbelow(10000):04d}")
        if not layout.workspace_dir(name).exists():
            return name


def command_of(spec_argv: tuple[str, ...], entrypoint: tuple[str, ...],
               cmd: tuple[str, ...]) -> tuple[str, ...]:
    """What runs: the user's argv replaces Cmd after the Entrypoint, as docker does."""
    argv = entrypoint + (spec_argv or cmd)
    if not argv:
        raise UsageError("nothing to run: give a command after the image, or use an image "
                         "with an Entrypoint or Cmd")
    return argv


def run_once(layout: StateLayout, spec: WorkspaceSpec, argv: tuple[str, ...],
             options: ExecOptions, *, stdout: Callable[[bytes], object],
             stderr: Callable[[bytes], object], keep: bool = False,
             progress: Progress | None = None, timeout: float = 120.0) -> RunOutcome:
    """Create, start, run, remove (or halt and keep with ``keep``)."""
    from microagent.state.records import create_workspace, get_workspace
    from microagent.workspace.execution import run_exec
    from microagent.workspace.start import start_workspace

    created = False
    kept = False
    try:
        with terminating_raises_interrupt():
            try:
                create_workspace(layout, spec, progress=progress)
            except KeyboardInterrupt:
                # interrupted after its final rename: the scratch workspace is there, and
                # it is ours (a name another had taken is a ConflictError, before that)
                created = layout.workspace_dir(spec.name).exists()
                raise
            created = True
            start_workspace(layout, spec.name, timeout=timeout, progress=progress,
                            setup_output=stderr)
            config = get_workspace(layout, spec.name).image_config
            command = command_of(argv, config.entrypoint, config.cmd)
            result = run_exec(layout, spec.name, replace(options, argv=command),
                              stdout=stdout, stderr=stderr)
        if keep:
            from microagent.workspace.lifecycle import halt_workspace

            halt_workspace(layout, spec.name)
            kept = True
        return RunOutcome(spec.name, result, kept)
    finally:
        if created and not kept:
            with ignoring_interrupts():
                discard_workspace(layout, spec.name)


def discard_workspace(layout: StateLayout, name: str,
                      timeout: float = CLEANUP_TIMEOUT) -> None:
    """Kill whatever still runs of ``name`` and delete it; waits out a start in progress."""
    from microagent.state.records import delete_workspace
    from microagent.state.runtime import runtime_state
    from microagent.workspace.lifecycle import kill_workspace

    deadline = time.monotonic() + timeout
    while True:
        try:
            state = runtime_state(layout, name)
            if state.has_live_process or state.state in ("starting", "halting"):
                with contextlib.suppress(MicroagentError):
                    kill_workspace(layout, name)
                state = runtime_state(layout, name)
                if state.has_live_process:  # e.g. QEMU still dying: look again
                    raise MicroagentError(f"workspace {name} still has a live process")
            delete_workspace(layout, name)
            return
        except MicroagentError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@contextlib.contextmanager
def terminating_raises_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP end the run like Ctrl-C does, so the scratch workspace goes
    (in the main thread, which alone receives signals; elsewhere, nothing changes)."""
    def interrupt(signum: int, _frame: FrameType | None) -> None:
        raise Terminated(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    previous = {signum: signal.signal(signum, interrupt)
                for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def ignoring_interrupts() -> Iterator[None]:
    """Cleanup runs to the end: a second Ctrl-C must not leave a VM behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN)
                for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
