"""``quarantine``: containment of a running workspace, not a shutdown.

The CLI side (:func:`quarantine_workspace`) checks that the workspace is running and
sends the supervisor a ``quarantine`` control request. The supervisor then severs the
network through QMP (:func:`sever_network`): the guest's link goes down (``set_link`` on
the user netdev also takes the NIC's link down, so the guest sees no carrier and QEMU
drops every frame both ways) and every host forward (published ports) is removed, so
those ports refuse connections instead of accepting into a dead link. From then on it
refuses relayed exec/cp channels and console sessions, keeps serving status, halt, stop
and kill, and never restarts the VM. The VM process, its disk, ``serial.log`` and the
events stay as they are; ``quarantined`` is appended to the events.
"""

from __future__ import annotations

import re

from microagent.backends.qmp import QmpClient, QmpError
from microagent.config import validate_name
from microagent.control import SupervisorClient
from microagent.errors import ConflictError
from microagent.layout import StateLayout
from microagent.runtime import runtime_state
from microagent.workspaces import get_workspace

NETDEV = "net0"  # the -netdev id of backends/qemu.py's qemu_argv
# a line of HMP `info usernet`: "  TCP[HOST_FORWARD]  11   127.0.0.1 45671   10.0.2.15 80 ..."
_HOST_FORWARD = re.compile(r"^\s*(TCP|UDP)\[HOST_FORWARD\]\s+-?\d+\s+(\S+)\s+(\d+)\s", re.M)


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


def host_forwards(usernet: str) -> list[str]:
    """The host forwarding rules in HMP ``info usernet`` output, as ``hostfwd_remove``
    arguments: ``tcp:127.0.0.1:8080``, or ``tcp::8080`` for a rule on every address."""
    rules = []
    for protocol, address, port in _HOST_FORWARD.findall(usernet):
        rules.append(f"{protocol.lower()}:{'' if address == '*' else address}:{port}")
    return rules


async def _hmp(qmp: QmpClient, command_line: str) -> str:
    return str(await qmp.execute("human-monitor-command", {"command-line": command_line}))


async def sever_network(qmp: QmpClient | None, network: str) -> str:
    """Cut the guest off the network; returns what was done, in words.

    Raises :class:`~microagent.backends.qmp.QmpError` when there is no QMP connection,
    QEMU refused a step, or a host forward is still there afterwards.
    """
    if network == "none":
        return "no network to sever (network none)"
    if qmp is None:
        raise QmpError("the VMM's monitor (QMP) is not connected")
    await qmp.execute("set_link", {"name": NETDEV, "up": False})
    rules = host_forwards(await _hmp(qmp, "info usernet"))
    for rule in rules:
        said = await _hmp(qmp, f"hostfwd_remove {NETDEV} {rule}")
        if "removed" not in said:
            raise QmpError(f"hostfwd_remove {rule}: {said.strip()}")
    left = host_forwards(await _hmp(qmp, "info usernet"))
    if left:
        raise QmpError(f"host forwards still present: {', '.join(left)}")
    ports = f"{len(rules)} published port{'s' if len(rules) != 1 else ''} closed"
    return f"network severed (link down, {ports})"
