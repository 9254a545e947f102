"""``start``: boot a workspace (workspace/lifecycle.py), then run the setup a failed
``create --setup`` left pending (workspace/provision.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from microagent.errors import MicroagentError
from microagent.layout import StateLayout
from microagent.progress import Progress
from microagent.state.runtime import RuntimeState, runtime_state
from microagent.state.setup import setup_pending
from microagent.workspace.lifecycle import boot_workspace, halt_workspace, stderr_sink
from microagent.workspace.provision import run_pending_setup
from microagent.workspace.supervisors import DEFAULT_START_TIMEOUT


def start_workspace(layout: StateLayout, name: str, *, timeout: float = DEFAULT_START_TIMEOUT,
                    progress: Progress | None = None, run_setup: bool = True,
                    setup_output: Callable[[bytes], object] | None = None,
                    from_snapshot: str | None = None, cold: bool = False) -> RuntimeState:
    """Boot ``name`` and return once the guest is ready for exec.

    A setup left pending by a failed ``create --setup`` runs first (output to
    ``setup_output``, default stderr); if it fails again the workspace is halted and the
    error raised. ``from_snapshot`` and ``cold``: see :func:`boot_workspace`.
    """
    state = boot_workspace(layout, name, timeout=timeout, progress=progress,
                           from_snapshot=from_snapshot, cold=cold)
    if run_setup and setup_pending(layout, name):
        try:
            run_pending_setup(layout, name, setup_output or stderr_sink)
        except BaseException:
            with contextlib.suppress(MicroagentError):
                halt_workspace(layout, name)
            raise
        state = runtime_state(layout, name)
    return state
