"""The supervisor's control socket: one JSON line request, one JSON line answer, or a
relay (``docs/architecture.md``, "The path of start and exec").

:class:`ControlServer` serves the connections of one supervisor: ``channel`` (a relayed
agent channel for exec and cp, with the VM's output port lent when free), ``console``
(an interactive session) and ``console-send``, and the lifecycle requests, which it hands
to the supervisor (halt, stop, kill, quarantine, resume). ``status`` with ``probe`` asks
the guest first, within bounds: a PING the agent must answer in :data:`PING_TIMEOUT`
(else execReady says the guest is unresponsive, and whether the VM process is stopped),
then a no-op exec and the console shell. Exec, cp and console input are refused while the
VM is quarantined or paused; a paused refusal carries its reason (``kind: paused``) so
that the CLI can say why. :func:`send_answer` attaches a descriptor to the answer line.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from microagent.errors import BusyError, ConflictError, MicroagentError, PausedError
from microagent.events import now_iso
from microagent.vm.console import Holder
from microagent.vm.protocol import FrameType
from microagent.vm.vmm import process_stopped

if TYPE_CHECKING:
    from microagent.vm.supervisor import Supervisor

QUARANTINE_HINT = "halt, stop or kill it to end the quarantine"
CONSOLE_RECHECK_AFTER = 30.0  # status --json asks the shell again when older than this
PING_TIMEOUT = 5.0  # status --json: a guest agent that does not answer is unresponsive


class ControlServer:
    """The control connections of one supervisor."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.sup = supervisor
        self.out_lease: socket.socket | None = None  # lent to one client at a time

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One control connection: a JSON line request, a JSON line answer (or a relay)."""
        try:
            request = json.loads(await reader.readline() or b"{}")
            verb = request.get("request")
            if verb in ("channel", "console") and self.sup.pause.paused:
                await answer(writer, error=f"paused: {self.sup.pause.reason}", kind="paused",
                             reason=self.sup.pause.reason)
                return
            if verb == "channel":
                if self.sup.quarantined:
                    await answer(writer, error="quarantined: exec and cp are refused",
                                 kind="conflict", hint=QUARANTINE_HINT)
                    return
                if self.sup.channel is None or self.sup.channel.hello is None:
                    await answer(writer, error="the guest agent is not ready yet")
                    return
                lease = self._lend_out_port() if request.get("stdout_port") else None
                try:
                    # no drain: relay() reads from here on
                    send_answer(writer, answer_line(), lease)
                    self.sup.sessions.add(writer)
                    await self.sup.channel.relay(writer.transport)  # type: ignore[arg-type]
                finally:
                    self.sup.sessions.discard(writer)
                    if lease is not None:
                        self._end_out_port(lease)
                return
            if verb == "console":
                await self._attach_console(request, reader, writer)
                return
            sup = self.sup
            handlers = {"status": self.status, "halt": sup._halt, "stop": sup._stop,
                        "kill": sup._kill, "console-send": self._console_send,
                        "console-size": self._console_size,
                        "quarantine": sup._quarantine, "pause": sup._pause,
                        "resume": sup._resume, "snapshot": sup._snapshot,
                        "suspend": sup._suspend}
            handler = handlers.get(verb)
            if handler is None:
                await answer(writer, error=f"unknown request {verb!r}")
                return
            try:
                fields = await handler(request)
            except PausedError as e:
                await answer(writer, error=e.message, kind="paused", reason=e.reason)
                return
            except MicroagentError as e:
                await answer(writer, error=e.message, kind=e.kind, hint=e.hint)
                return
            await answer(writer, **fields)
        except (ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def status(self, request: dict[str, Any]) -> dict[str, Any]:
        """The supervisor's record; with ``probe``, readiness asked of the guest first."""
        # quarantined and paused: their readiness says why; a probe would not be answered
        if request.get("probe") and self.sup.outcome is None and self.sup.channel is not None \
                and not self.sup.quarantined and not self.sup.pause.paused \
                and await self.probe_alive():
            await self.sup.probe_exec(timeout=10)
            stale = time.monotonic() - self.sup.console_checked > CONSOLE_RECHECK_AFTER
            if self.sup.console_shell and stale and (self.sup.console_probe is None
                                                     or self.sup.console_probe.done()):
                await self.sup._probe_console(5.0)
        return {"status": self.sup.status}

    async def probe_alive(self) -> bool:
        """A PING answered within PING_TIMEOUT; else execReady says why not."""
        if self.sup.channel is None or self.sup.channel.closed.is_set() \
                or await self.sup.channel.ping(PING_TIMEOUT):
            return True  # a closed channel: probe_exec says so
        why = (f"the guest agent did not answer a ping within {PING_TIMEOUT:g}s: the guest "
               "is unresponsive")
        if self.sup.vmm is not None and process_stopped(self.sup.vmm.pid):
            why += (f" (the VM process {self.sup.vmm.pid} is stopped, e.g. by SIGSTOP: "
                    f"`kill -CONT {self.sup.vmm.pid}` lets it run)")
        else:
            why += " (hung, or too busy to answer)"
        self.sup._ready("execReady", False, why)
        return False

    def _lend_out_port(self) -> socket.socket | None:
        """A connection to the VM's output port for one client, if it is free
        (docs/protocol.md, "The output port"); None otherwise."""
        if self.out_lease is not None or self.sup.out_socket is None:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(1.0)  # QEMU listens; a connection waits in its backlog at most
            sock.connect(self.sup.out_socket)  # relative: the supervisor runs in run/
        except OSError:
            sock.close()
            return None
        self.out_lease = sock
        return sock

    def _end_out_port(self, sock: socket.socket) -> None:
        """Cut the lent connection (the client's copy too), so that the VMM sees the
        port's host go and the next lease starts clean."""
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        if self.out_lease is sock:
            self.out_lease = None

    # --- the console ------------------------------------------------------------------

    def _console_refusal(self) -> str | None:
        if self.sup.pause.paused:
            raise PausedError(self.sup.name, str(self.sup.pause.reason))
        if self.sup.quarantined:
            return "quarantined: console input is refused"
        if self.sup.console is None or self.sup.console.closed.is_set():
            return "the VM is not running"
        if self.sup.console_shell is False:
            return "the console has no shell (the image has none)"
        return None

    async def _attach_console(self, request: dict[str, Any], reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
        """An interactive session: after the ``ok`` line, raw bytes both ways."""
        refusal = self._console_refusal()
        if refusal is not None:
            await answer(writer, error=refusal)
            return
        holder = Holder("interactive", int(request.get("pid") or 0), now_iso())

        async def ready() -> None:
            await answer(writer)
            if request.get("rows") and request.get("cols"):
                await self._console_size(request)

        self.sup.sessions.add(writer)
        try:
            await self.sup.broker.attach(reader, writer, holder, ready)
        except BusyError as e:
            await answer(writer, error=e.message, kind=e.kind, hint=e.hint)
        finally:
            self.sup.sessions.discard(writer)

    async def _console_send(self, request: dict[str, Any]) -> dict[str, Any]:
        refusal = self._console_refusal()
        if refusal is not None:
            raise ConflictError(refusal)
        holder = Holder("send", int(request.get("pid") or 0), now_iso())
        result = await self.sup.broker.send_line(str(request["line"]),
                                                 float(request.get("wait") or 10), holder)
        if not result.timed_out:
            self.sup.console_checked = time.monotonic()
        return {"output": base64.b64encode(result.output).decode(),
                "exit_code": result.exit_code, "timed_out": result.timed_out,
                "incomplete": result.incomplete}

    async def _console_size(self, request: dict[str, Any]) -> dict[str, Any]:
        """Tell the agent the console's size (the shell gets SIGWINCH)."""
        if self.sup.channel is None or self.sup.channel.closed.is_set():
            return {"applied": False}
        operation = {"op": "console_size", "rows": int(request["rows"]),
                     "cols": int(request["cols"])}
        try:
            frame, _ = await self.sup.channel.request(operation, timeout=5)
        except Exception:
            return {"applied": False}
        return {"applied": frame.type == FrameType.EXIT}


async def answer(writer: asyncio.StreamWriter, error: str | None = None,
                 kind: str = "supervisor", hint: str = "", **fields: Any) -> None:
    """Write one answer line and wait for it to go out."""
    writer.write(answer_line(error, kind, hint, **fields))
    await writer.drain()


def send_answer(writer: asyncio.StreamWriter, line: bytes, lent: socket.socket | None) -> None:
    """Write the answer ``line``, with ``lent``'s descriptor attached when there is one."""
    if lent is None:
        writer.write(line)
        return
    transport_socket = writer.get_extra_info("socket")
    # The dup shares the transport's open file, O_NONBLOCK included: its mode is left as
    # it is (blocking it would block the event loop's later writes). A short first line
    # on a fresh connection goes out at once.
    with socket.socket(fileno=os.dup(transport_socket.fileno())) as sock:
        socket.send_fds(sock, [line], [lent.fileno()])


def answer_line(error: str | None = None, kind: str = "supervisor", hint: str = "",
                **fields: Any) -> bytes:
    """``{"ok": true, ...fields}``, or ``ok: false`` with the error's kind, message, hint."""
    document = {"ok": error is None, **fields}
    if error is not None:
        document["error"] = {"kind": kind, "message": error, "hint": hint}
    return json.dumps(document).encode() + b"\n"
