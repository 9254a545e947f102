"""A small asynchronous QMP client: capabilities, commands, and the SHUTDOWN event.

The supervisor uses QMP to ask the guest to power down (``system_powerdown``, the ACPI
power button) and to learn why QEMU is shutting down: with ``-no-reboot`` a guest reboot
or a panic (``panic=-1``) ends QEMU with status 0 just like a power-off, and only the
SHUTDOWN event's ``reason`` tells ``guest-shutdown`` from ``guest-reset``. Every event is
also handed to ``on_event`` as it arrives: the supervisor learns from STOP, RESUME and
BLOCK_IO_ERROR that the VM was paused (QEMU stops a VM whose disk write found the host
disk full: ``werror=enospc``, its default) and why (:mod:`microagent.vm.vmm`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Callable
from typing import Any

from microagent.errors import MicroagentError


class QmpError(MicroagentError):
    """QEMU's monitor refused a command or went away."""

    kind = "vmm"


class QmpClient:
    """One QMP connection; events are collected while commands run."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.reader = reader
        self.writer = writer
        self.on_event = on_event
        self.shutdown_reason: str | None = None
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.pump: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, path: str,
                      on_event: Callable[[dict[str, Any]], None] | None = None) -> QmpClient:
        """Connect to QMP at ``path``, read the greeting and enable commands; events go
        to ``on_event`` too."""
        reader, writer = await asyncio.open_unix_connection(path)
        client = cls(reader, writer, on_event)
        greeting = await client._read()
        if "QMP" not in greeting:
            raise QmpError(f"unexpected QMP greeting: {greeting}")
        client.pump = asyncio.create_task(client._pump())
        await client.execute("qmp_capabilities")
        return client

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout: float = 10.0) -> Any:
        """Run one command; return its ``return`` value or raise QmpError."""
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self.writer.write(json.dumps(message).encode() + b"\n")
        await self.writer.drain()
        reply = await asyncio.wait_for(self.replies.get(), timeout)
        if "error" in reply:
            raise QmpError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    async def _read(self) -> dict[str, Any]:
        line = await self.reader.readline()
        if not line:
            raise QmpError("QMP connection closed")
        value = json.loads(line)
        if not isinstance(value, dict):
            raise QmpError(f"unexpected QMP message: {value!r}")
        return value

    async def _pump(self) -> None:
        try:
            while True:
                message = await self._read()
                if "event" in message:
                    if message["event"] == "SHUTDOWN":
                        self.shutdown_reason = str(message.get("data", {}).get("reason", ""))
                    self._hand_over(message)
                    await self.events.put(message)
                else:
                    await self.replies.put(message)
        except (QmpError, ConnectionError, ValueError):
            return

    def _hand_over(self, message: dict[str, Any]) -> None:
        """``on_event(message)``; its failure is logged, and the replies keep flowing."""
        handler = self.on_event
        if handler is None:
            return
        try:
            handler(message)
        except Exception as e:
            with contextlib.suppress(OSError):  # stderr may be on the full disk itself
                print(f"microagent supervisor: QMP event {message.get('event')}: {e!r}",
                      file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.pump is not None:
            self.pump.cancel()
        self.writer.close()
