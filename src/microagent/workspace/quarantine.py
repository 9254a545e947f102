"""``quarantine``: containment of a running workspace, not a shutdown (the CLI side).

:func:`quarantine_workspace` checks that the workspace is running and sends the
supervisor a ``quarantine`` control request; the supervisor severs the network
(:mod:`microagent.vm.containment`), then refuses relayed exec/cp channels and console
sessions, keeps serving status, halt, stop and kill, and never restarts the VM. The VM
process, its disk, ``serial.log`` and the events stay as they are; ``quarantined`` is
appended to the events.
"""

from __future__ import annotations

from microagent.config import validate_name
from microagent.errors import ConflictError
from microagent.layout import StateLayout
from microagent.state.records import get_workspace
from microagent.state.runtime import runtime_state
from microagent.workspace.supervisors import supervisor_of


def quarantine_workspace(layout: StateLayout, name: str) -> str:
    """Quarantine the running workspace ``name``; returns the new state."""
    validate_name(name)
    get_workspace(layout, name)
    state = runtime_state(layout, name)
    if state.state == "quarantined":
        raise ConflictError(f"workspace {name} is already quarantined",
                            hint="halt, stop or kill it to end the quarantine")
    if state.state != "running":
        raise ConflictError(f"workspace {name} is not running (state {state.state})",
                            hint="only a running workspace can be quarantined")
    answer = supervisor_of(layout, name).request("quarantine", timeout=60)
    return str(answer.get("state", "quarantined"))
