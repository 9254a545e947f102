"""``quarantine``: containment of a running workspace, not a shutdown.

The CLI side (:func:`quarantine_workspace`) checks that the workspace is running and
sends the supervisor a ``quarantine`` control request. The supervisor then severs the
network (:func:`sever_network`): the guest's link goes down through QMP (``set_link`` on
the netdev also takes the NIC's link down, so the guest sees no carrier and QEMU drops
every frame both ways), then the relay to passt stops and passt is ended by its pid, which
closes the published ports: they refuse connections instead of accepting into a dead
link. From then on it refuses relayed exec/cp channels and console sessions, keeps
serving status, halt, stop and kill, and never restarts the VM. The VM process, its disk,
``serial.log`` and the events stay as they are; ``quarantined`` is appended to the events.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from microagent.backends.qmp import QmpClient, QmpError
from microagent.config import validate_name
from microagent.control import SupervisorClient
from microagent.errors import ConflictError
from microagent.layout import StateLayout
from microagent.network import has_network
from microagent.runtime import runtime_state
from microagent.workspaces import Workspace, get_workspace

NETDEV = "net0"  # the -netdev id of backends/qemu.py's qemu_argv


class Severable(Protocol):
    """The network outside QEMU that quarantine ends (:class:`microagent.passt.NetworkHelper`)."""

    def stop(self) -> None:
        """End it; its published ports refuse connections once this returns."""


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
    answer = SupervisorClient(layout.run_files(name), name).request("quarantine", timeout=60)
    return str(answer.get("state", "quarantined"))


async def sever_network(qmp: QmpClient | None, helper: Severable | None,
                        workspace: Workspace) -> str:
    """Cut the guest off the network; returns what was done, in words.

    Raises :class:`~microagent.backends.qmp.QmpError` when there is no QMP connection or
    QEMU refused to take the link down; nothing else has been done then.
    """
    if not has_network(workspace.network):
        return "no network to sever (network none)"
    if qmp is None:
        raise QmpError("the VMM's monitor (QMP) is not connected")
    await qmp.execute("set_link", {"name": NETDEV, "up": False})
    if helper is not None:  # passt, ended by pid: its listening sockets go with it
        await asyncio.to_thread(helper.stop)
    count = len(workspace.ports)
    return f"network severed (link down, {count} published port{'s' if count != 1 else ''} closed)"
