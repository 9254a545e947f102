"""The supervisor's part of ``quarantine`` (the CLI side: workspace/quarantine.py).

:func:`sever_network`: the guest's link goes down through QMP (``set_link`` on the netdev
also takes the NIC's link down, so the guest sees no carrier and QEMU drops every frame
both ways), then the relay to passt stops and passt is ended by its pid, which closes the
published ports: they refuse connections instead of accepting into a dead link.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from microagent.network import has_network
from microagent.state.records import Workspace
from microagent.vm.backends.qmp import QmpClient, QmpError

NETDEV = "net0"  # the -netdev id of backends/qemu.py's qemu_argv


class Severable(Protocol):
    """The network outside QEMU that quarantine ends (:class:`~.passt.NetworkHelper`)."""

    def stop(self) -> None:
        """End it; its published ports refuse connections once this returns."""


async def sever_network(qmp: QmpClient | None, helper: Severable | None,
                        workspace: Workspace) -> str:
    """Cut the guest off the network; returns what was done, in words.

    Raises :class:`~microagent.vm.backends.qmp.QmpError` when there is no QMP connection or
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
