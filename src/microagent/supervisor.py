"""The supervisor: one detached process per running workspace (``start`` spawns it).

It owns the VMM as its child (the child dies with it: PR_SET_PDEATHSIG), captures the
serial console into ``serial.log``, holds the agent channel, serves the control socket
(status, halt, stop, kill, quarantine, relayed exec streams, console sessions through
:class:`~microagent.console.ConsoleBroker`), computes readiness, appends the
lifecycle events, applies the restart policy and records the final state. Only the
supervisor starts or ends a VMM process; the CLI's ``kill`` reaches for the VMM itself
only when the supervisor is gone.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from microagent.attachments import remove_bundle_disks
from microagent.backends.qmp import QmpClient
from microagent.channel import AgentChannel
from microagent.console import ConsoleBroker, ConsoleCapture, Holder
from microagent.errors import BusyError, ConflictError, MicroagentError
from microagent.events import append_event, now_iso
from microagent.launch import FirstBoot, Launched, launch_vmm
from microagent.layout import StateLayout
from microagent.network import port_failure
from microagent.passt import NetworkHelper
from microagent.protocol import FrameType
from microagent.quarantine import sever_network
from microagent.runtime import process_start_time
from microagent.store import write_json_atomic
from microagent.workspaces import Workspace

QUARANTINE_HINT = "halt, stop or kill it to end the quarantine"
HALT_GRACE_MS = 10_000
STOP_WAIT = 5.0
HELPER_EXIT_GRACE = 2.0  # passt ended during boot: QEMU may be exiting too (see boot_once)
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0
CONSOLE_PROBE_TIMEOUT = 30.0  # the console shell's first answer, at boot (TCG: slow)
CONSOLE_RECHECK_AFTER = 30.0  # status --json asks the shell again when older than this


@dataclass(frozen=True)
class Outcome:
    """How one boot ended."""

    state: str  # halted, stopped or failed
    detail: str


class VmmProcess:
    """The VMM child, started outside the event loop (:mod:`microagent.launch`) and
    awaited through a pidfd (a thread on kernels before 5.3)."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    async def wait(self) -> int:
        if self.popen.returncode is not None:
            return self.popen.returncode
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:
            return await asyncio.to_thread(self.popen.wait)
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not ended.done():
                ended.set_result(None)

        loop.add_reader(pidfd, readable)
        try:
            await ended
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        return self.popen.wait()

    def kill(self) -> None:
        self.popen.kill()

    def send_signal(self, signum: int) -> None:
        self.popen.send_signal(signum)


class Supervisor:
    """Boots one workspace and watches it until it is halted, stopped or killed."""

    def __init__(self, layout: StateLayout, name: str, boot_timeout: float,
                 first: FirstBoot) -> None:
        self.layout = layout
        self.name = name
        self.files = layout.run_files(name)
        self.boot_timeout = boot_timeout
        self.first = first  # what _supervise did before the event loop
        self.workspace: Workspace = first.workspace
        self.accel = first.accel
        self.intent: str | None = None
        self.vmm: VmmProcess | None = None
        self.network: NetworkHelper | None = None  # this boot's passt and frame relay
        self.channel: AgentChannel | None = None
        self.channel_task: asyncio.Task[None] | None = None
        self.tsc_khz = first.tsc_khz
        self.qmp: QmpClient | None = None
        self.console: ConsoleCapture | None = None
        self.broker = ConsoleBroker()
        self.console_shell: bool | None = None  # None: not known yet
        self.console_checked = 0.0  # monotonic time of the last answer
        self.console_probe: asyncio.Task[None] | None = None
        self.guest_fatal: str | None = None  # the agent's "fatal:" line of this boot
        self.exited = asyncio.Event()
        self.ending = False  # kill was asked: boot nothing more, end the VMM if any
        self.finished = asyncio.Event()  # the supervisor is winding down
        self.outcome: Outcome | None = None
        self.status: dict[str, Any] = {"supervisor_pid": os.getpid(), "restarts": 0}
        self.quarantined = False  # see microagent.quarantine; ends with the VM
        self.sessions: set[asyncio.StreamWriter] = set()  # relayed exec/cp, console
        self.out_socket: str | None = None  # the output port's socket, if the VMM has one
        self.out_lease: socket.socket | None = None  # lent to one client at a time

    # --- status -----------------------------------------------------------------------

    def _event(self, state: str, detail: str = "") -> None:
        append_event(self.layout.workspace_events(self.name), state, detail)

    def _save_status(self) -> None:
        write_json_atomic(self.files.status, self.status, durable=False)  # gone at exit

    def _ready(self, signal_name: str, ok: bool, detail: str) -> None:
        self.status.setdefault("readiness", {})[signal_name] = {"ok": ok, "detail": detail}
        self._save_status()

    # --- one boot ---------------------------------------------------------------------

    async def boot_once(self, launched: Launched | None = None) -> Outcome:
        """Start the VMM (unless ``launched`` already), wait for readiness, then for its
        exit; say how it ended."""
        if launched is None:
            try:
                # killed while preparing this boot (or in a restart's back-off): none
                launched = launch_vmm(self.layout, self.workspace, self.accel, self.tsc_khz,
                                      cancelled=lambda: self.ending)
            except ConflictError as e:
                return Outcome("failed", e.message)
            if launched is None:
                return Outcome("stopped", "killed")
        plan, kernel, recovery = launched.plan, launched.kernel, launched.recovery
        started, vmm_log_start = launched.started, launched.vmm_log_start
        self.vmm = VmmProcess(launched.process)
        self.network = launched.network
        self.guest_fatal = None
        self.intent, self.outcome = None, None
        self.exited.clear()
        self.status.update(readiness={}, boot_started=now_iso(), kernel=kernel.version,
                           accel=self.accel.accel, accel_reason=self.accel.reason)
        self.out_socket = plan.out_socket
        self.console = ConsoleCapture(self.layout.workspace_serial_log(self.name))
        self.broker.capture = self.console
        self.console_shell, self.console_checked = None, 0.0
        self.status.update(vmm_pid=self.vmm.pid, vmm_start_time=process_start_time(self.vmm.pid))
        if self.network is not None:
            self.status["network_helper"] = {"program": "passt", "pid": self.network.pid}
        self._save_status()
        if self.ending:  # a kill arrived while QEMU was being launched
            await self._kill_vmm()
        waiter = asyncio.create_task(self._wait_vmm())
        helpers = [asyncio.create_task(self.console.capture(plan.console_socket,
                                                            time.monotonic() + 10,
                                                            self._console_line))]
        ready = asyncio.create_task(self._become_ready(plan.agent_socket, plan.monitor_socket))
        # passt exits at once when it cannot bind a published port: that fails the boot
        helper_exit = (asyncio.create_task(VmmProcess(self.network.process).wait())
                       if self.network is not None else None)
        done, _ = await asyncio.wait({waiter, ready, *filter(None, [helper_exit])},
                                     timeout=self.boot_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        try:
            if ready in done and ready.exception() is None:
                self.status["ready_seconds"] = round(time.monotonic() - started, 3)
                self._save_status()
                note = ("; the root file system's journal was recovered (the last shutdown "
                        "was not clean)" if recovery else "")
                self._event("running", f"ready in {self.status['ready_seconds']:.1f}s "
                                       f"({self.accel.accel}){note}")
                await waiter
                return self._classify()
            if helper_exit in done and waiter not in done and ready not in done:
                # passt also ends when QEMU closes the link: a guest that powered off
                # (a fatal error) is then the cause, and QEMU is about to exit
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(waiter), HELPER_EXIT_GRACE)
                if not waiter.done():
                    await self._kill_vmm()
                    await waiter
                return Outcome("failed", await self._guest_fatal() or self._network_failure())
            if waiter in done and self.intent == "kill":
                return Outcome("stopped", "killed")
            if waiter in done:
                fatal = await self._guest_fatal()  # e.g. a disk that cannot be mounted
                said = self._vmm_said(vmm_log_start)
                taken = port_failure(said)  # a --publish port taken since the check
                if taken is not None:
                    return Outcome("failed", taken.message)
                return Outcome("failed", fatal or f"the VM exited during boot "
                                                  f"(status {self.vmm.returncode})" + said)
            reason = (f"the guest agent failed: {ready.exception()}" if ready in done
                      else f"the guest did not become ready within {self.boot_timeout:.0f}s")
            await self._kill_vmm()
            await waiter
            return Outcome("failed", await self._guest_fatal() or reason)
        finally:
            for task in (ready, helper_exit, *helpers, self.channel_task, self.console_probe):
                if task is not None:
                    task.cancel()
            self.channel_task = None
            if self.network is not None:  # ended by pid; it also ends with QEMU's link
                await asyncio.to_thread(self.network.stop)
            if self.qmp is not None:
                self.qmp.close()
                self.qmp = None

    def _network_failure(self) -> str:
        """Why passt ended during the boot: a published port taken since the check, or
        its own last words."""
        helper = self.network
        if helper is None:
            return "the network helper ended"
        try:
            with open(self.files.network_log, "rb") as f:
                f.seek(helper.log_start)
                said = f.read(65536).decode(errors="replace")
        except OSError:
            said = ""
        taken = port_failure(said)
        if taken is not None:
            return taken.message
        lines = [line.strip() for line in said.splitlines()
                 if line.strip() and "to syslog" not in line]
        return (f"the network helper (passt) exited during boot (status "
                f"{helper.process.returncode})" + (": " + " ".join(lines[-2:]) if lines else ""))

    def _vmm_said(self, offset: int) -> str:
        """The VMM's own last words of this boot (e.g. QEMU refusing a locked image)."""
        try:
            with open(self.files.vmm_log, "rb") as f:
                f.seek(offset)
                lines = f.read(65536).decode(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return (": " + " ".join(line.strip() for line in lines[-2:])) if lines else ""

    async def _guest_fatal(self) -> str | None:
        """The agent's ``fatal:`` console line of this boot, once the console is drained."""
        if self.guest_fatal is None and self.console is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.console.closed.wait(), 2.0)
        return self.guest_fatal

    async def _wait_vmm(self) -> None:
        if self.vmm is not None:
            await self.vmm.wait()
        self.exited.set()

    async def _become_ready(self, agent_socket: str, qmp_socket: str) -> None:
        deadline = time.monotonic() + self.boot_timeout
        self.channel = AgentChannel()
        await self.channel.connect(agent_socket, deadline)
        self.qmp = await _connect_qmp(qmp_socket, deadline)
        self.channel_task = asyncio.create_task(self.channel.serve())
        hello = await self.channel.handshake()
        self.status["agent"] = hello.get("software", "")
        self._ready("guestReady", True, f"agent said hello ({hello.get('software', '?')})")
        await asyncio.gather(self.probe_exec(), self._probe_network())

    async def probe_exec(self) -> bool:
        """A no-op exec round trip; sets execReady."""
        if self.channel is None or self.channel.closed.is_set():
            self._ready("execReady", False, "no agent channel")
            return False
        start = time.monotonic()
        try:
            frame, _ = await self.channel.request(
                {"op": "exec", "argv": ["true"], "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
                 "cwd": "/", "user": "", "tty": None, "stdin": False, "timeout_ms": 10_000},
                timeout=15)
        except (TimeoutError, Exception) as e:
            self._ready("execReady", False, f"exec round trip failed: {e}")
            return False
        ms = (time.monotonic() - start) * 1000
        # a missing `true` still proves the exec path: the agent forked and answered
        self._ready("execReady", frame.type in (FrameType.EXIT, FrameType.ERROR),
                    f"no-op exec round trip in {ms:.0f} ms")
        return True

    async def _probe_network(self) -> None:
        if self.workspace.network == "none":
            self._ready("networkReady", True, "network none: loopback only")
            return
        if self.channel is None:
            return
        try:
            frame, _ = await self.channel.request({"op": "info"}, timeout=10)
            info = frame.json().get("info", {}) if frame.type == FrameType.EXIT else {}
        except Exception as e:
            self._ready("networkReady", False, f"agent info failed: {e}")
            return
        net = info.get("network", {}) if isinstance(info, dict) else {}
        self.status["network"] = net
        self._ready("networkReady", bool(net.get("configured")),
                    str(net.get("detail") or net.get("address") or "not configured"))

    def _console_line(self, line: str) -> None:
        if "microagent-init: fatal: " in line and self.guest_fatal is None:
            self.guest_fatal = line.split("microagent-init: fatal: ", 1)[1].strip()
        if "microagent-init: console shell" in line and not self.quarantined:
            self.console_shell = True
            self._ready("consoleReady", False, "the console shell is starting")
            if self.console_probe is None or self.console_probe.done():
                self.console_probe = asyncio.create_task(
                    self._probe_console(CONSOLE_PROBE_TIMEOUT))
        elif "console has no shell" in line:
            self.console_shell = False
            self._ready("consoleReady", False, "the image has no shell for the console")

    async def _probe_console(self, timeout: float) -> None:
        """consoleReady: a line typed into the console shell is answered."""
        answer = await self.broker.probe(timeout)
        if answer is None:  # a session holds the console: keep what is known
            return
        ok, detail = answer
        if ok:
            self.console_checked = time.monotonic()
        self._ready("consoleReady", ok, detail)

    def _classify(self) -> Outcome:
        code = self.vmm.returncode if self.vmm is not None else None
        reason = self.qmp.shutdown_reason if self.qmp is not None else None
        if self.intent == "halt":
            return Outcome("halted", "halted cleanly")
        if self.intent == "kill":
            return Outcome("stopped", "killed")
        if self.intent == "stop":
            return Outcome("stopped", "stopped by request")
        if code == 0 and reason in (None, "guest-shutdown"):
            return Outcome("stopped", "the guest powered off")
        if reason in ("guest-reset", "guest-panic"):
            return Outcome("failed", f"the guest rebooted or panicked ({reason})")
        return Outcome("failed", f"the VM process ended unexpectedly (status {code})")

    async def _kill_vmm(self) -> None:
        if self.vmm is not None and self.vmm.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.vmm.kill()

    # --- control socket ---------------------------------------------------------------

    async def serve_client(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        """One control connection: a JSON line request, a JSON line answer (or a relay)."""
        try:
            request = json.loads(await reader.readline() or b"{}")
            verb = request.get("request")
            if verb == "channel":
                if self.quarantined:
                    await _answer(writer, error="quarantined: exec and cp are refused",
                                  kind="conflict", hint=QUARANTINE_HINT)
                    return
                if self.channel is None or self.channel.hello is None:
                    await _answer(writer, error="the guest agent is not ready yet")
                    return
                lease = self._lend_out_port() if request.get("stdout_port") else None
                try:
                    # no drain: relay() reads from here on
                    _send_answer(writer, _answer_line(), lease)
                    self.sessions.add(writer)
                    await self.channel.relay(writer.transport)  # type: ignore[arg-type]
                finally:
                    self.sessions.discard(writer)
                    if lease is not None:
                        self._end_out_port(lease)
                return
            if verb == "console":
                await self._attach_console(request, reader, writer)
                return
            handlers = {"status": self._status, "halt": self._halt, "stop": self._stop,
                        "kill": self._kill, "console-send": self._console_send,
                        "console-size": self._console_size,
                        "quarantine": self._quarantine}
            handler = handlers.get(verb)
            if handler is None:
                await _answer(writer, error=f"unknown request {verb!r}")
                return
            try:
                fields = await handler(request)
            except MicroagentError as e:
                await _answer(writer, error=e.message, kind=e.kind, hint=e.hint)
                return
            await _answer(writer, **fields)
        except (ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    def _lend_out_port(self) -> socket.socket | None:
        """A connection to the VM's output port for one client, if it is free
        (docs/protocol.md, "The output port"); None otherwise."""
        if self.out_lease is not None or self.out_socket is None:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(1.0)  # QEMU listens; a connection waits in its backlog at most
            sock.connect(self.out_socket)  # relative: the supervisor runs in run/
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

    async def _status(self, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("probe") and self.outcome is None and self.channel is not None \
                and not self.quarantined:  # its readiness says "refused"; keep it
            await self.probe_exec()
            stale = time.monotonic() - self.console_checked > CONSOLE_RECHECK_AFTER
            if self.console_shell and stale and (self.console_probe is None
                                                 or self.console_probe.done()):
                await self._probe_console(5.0)
        return {"status": self.status}

    # --- the console ------------------------------------------------------------------

    def _console_refusal(self) -> str | None:
        if self.quarantined:
            return "quarantined: console input is refused"
        if self.console is None or self.console.closed.is_set():
            return "the VM is not running"
        if self.console_shell is False:
            return "the console has no shell (the image has none)"
        return None

    async def _attach_console(self, request: dict[str, Any], reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
        """An interactive session: after the ``ok`` line, raw bytes both ways."""
        refusal = self._console_refusal()
        if refusal is not None:
            await _answer(writer, error=refusal)
            return
        holder = Holder("interactive", int(request.get("pid") or 0), now_iso())

        async def ready() -> None:
            await _answer(writer)
            if request.get("rows") and request.get("cols"):
                await self._console_size(request)

        self.sessions.add(writer)
        try:
            await self.broker.attach(reader, writer, holder, ready)
        except BusyError as e:
            await _answer(writer, error=e.message, kind=e.kind, hint=e.hint)
        finally:
            self.sessions.discard(writer)

    async def _console_send(self, request: dict[str, Any]) -> dict[str, Any]:
        refusal = self._console_refusal()
        if refusal is not None:
            raise ConflictError(refusal)
        holder = Holder("send", int(request.get("pid") or 0), now_iso())
        result = await self.broker.send_line(str(request["line"]),
                                             float(request.get("wait") or 10), holder)
        if not result.timed_out:
            self.console_checked = time.monotonic()
        return {"output": base64.b64encode(result.output).decode(),
                "exit_code": result.exit_code, "timed_out": result.timed_out,
                "incomplete": result.incomplete}

    async def _console_size(self, request: dict[str, Any]) -> dict[str, Any]:
        """Tell the agent the console's size (the shell gets SIGWINCH)."""
        if self.channel is None or self.channel.closed.is_set():
            return {"applied": False}
        operation = {"op": "console_size", "rows": int(request["rows"]),
                     "cols": int(request["cols"])}
        try:
            frame, _ = await self.channel.request(operation, timeout=5)
        except Exception:
            return {"applied": False}
        return {"applied": frame.type == FrameType.EXIT}

    async def _halt(self, request: dict[str, Any]) -> dict[str, Any]:
        self.intent = "halt"
        self._event("halting", "halt requested")
        grace = int(request.get("grace_ms", HALT_GRACE_MS))
        if self.channel is not None and not self.channel.closed.is_set():
            self.channel.send_only({"op": "shutdown", "grace_ms": grace, "mode": "poweroff"})
        try:
            await asyncio.wait_for(self.exited.wait(), grace / 1000 + 20)
        except TimeoutError:
            self.intent = "halt-timeout"
            await self._kill_vmm()
            await self.exited.wait()
            return {"state": "failed", "detail": "the guest did not halt in time; VM ended"}
        return {"state": "halted"}

    async def _stop(self, request: dict[str, Any]) -> dict[str, Any]:
        self.intent = "stop"
        if self.channel is not None and not self.channel.closed.is_set():
            self.channel.send_only({"op": "shutdown", "grace_ms": int(STOP_WAIT * 800),
                                    "mode": "poweroff"})
        elif self.qmp is not None:
            with contextlib.suppress(Exception):
                await self.qmp.execute("system_powerdown")
        try:
            await asyncio.wait_for(self.exited.wait(), STOP_WAIT)
        except TimeoutError:
            self.intent = "stop-failed"
            self._event("failed", "stop: the guest did not exit within 5s; the VM is left "
                                  "running for `kill`")
            return {"state": "failed", "detail": "the guest did not exit within 5s"}
        return {"state": "stopped"}

    async def _quarantine(self, request: dict[str, Any]) -> dict[str, Any]:
        """Sever the network, then refuse exec, cp and console input (see quarantine.py)."""
        if self.quarantined:
            raise ConflictError("the workspace is already quarantined", hint=QUARANTINE_HINT)
        if self.intent is not None or self.vmm is None or self.vmm.returncode is not None \
                or self.channel is None or self.channel.hello is None:
            raise ConflictError("the workspace is not running")
        self.quarantined = True  # refuse new sessions while QMP is being asked
        try:
            detail = await sever_network(self.qmp, self.network, self.workspace)
        except (MicroagentError, TimeoutError, ConnectionError) as e:
            self.quarantined = False
            raise MicroagentError(f"could not sever the network: {e}; not quarantined",
                                  hint=f"microagent kill {self.name}") from e
        for writer in list(self.sessions):  # exec, cp and console sessions in flight
            writer.transport.abort()
        refused = "quarantined: refused"
        self._ready("execReady", False, refused)
        self._ready("consoleReady", False, refused)
        self._ready("networkReady", False, f"quarantined: {detail}")
        self.status["quarantined"] = {"time": now_iso(), "detail": detail}
        self._save_status()
        self._event("quarantined", f"{detail}; exec, cp and console input refused")
        return {"state": "quarantined", "detail": detail}

    async def _kill(self, request: dict[str, Any]) -> dict[str, Any]:
        # answered once the supervisor winds down: whatever it was doing (preparing a
        # boot, launching QEMU, a restart's back-off), no VMM is left behind
        self.intent = "kill"
        self.ending = True
        await self._kill_vmm()
        await self.finished.wait()
        return {"state": "stopped"}

    # --- the whole life ---------------------------------------------------------------

    async def run(self) -> int:
        """Boot, apply the restart policy, record the final state."""
        server = await asyncio.start_unix_server(self.serve_client,
                                                 path=self.files.control_socket)
        failures = 0
        holds = self.first.holds  # the volumes, held for the supervisor's life
        launched, failure = self.first.launched, self.first.failure  # the first boot's
        try:
            if self.first.volumes_failed:
                self.outcome = Outcome("failed", failure or "")
                self._event("failed", self.outcome.detail)
                return 1
            while True:
                began = time.monotonic()
                try:
                    if failure is not None:
                        outcome = Outcome("failed", failure)
                    else:
                        outcome = await self.boot_once(launched)
                except Exception as e:
                    await self._kill_vmm()
                    outcome = Outcome("failed", f"could not boot: {e}")
                launched, failure = None, None  # restarts launch their own
                if self.intent == "stop-failed":
                    outcome = Outcome("stopped", "the guest exited after a failed stop")
                self.outcome = outcome
                self._event(outcome.state, outcome.detail)
                if self.intent is not None or self.quarantined \
                        or not self._should_restart(outcome):
                    return 0 if outcome.state != "failed" else 1
                failures = 0 if time.monotonic() - began > STABLE_AFTER else failures + 1
                delay = min(BACKOFF_MAX, 2.0 ** max(0, failures - 1))
                self.status["restarts"] += 1
                self._event("starting", f"restart {self.status['restarts']} "
                                        f"(policy {self.workspace.restart}) after {delay:.0f}s")
                await asyncio.sleep(delay)
        finally:
            await self._kill_vmm()
            if self.vmm is not None and self.vmm.returncode is None:
                with contextlib.suppress(TimeoutError):  # gone before kill answers
                    await asyncio.wait_for(self.vmm.wait(), 10)
            self.finished.set()
            await asyncio.sleep(0.05)  # let a waiting kill request answer
            server.close()
            holds.close()
            remove_bundle_disks(self.files, self.workspace.disks)

    def _should_restart(self, outcome: Outcome) -> bool:
        policy = self.workspace.restart
        return policy == "always" or (policy == "on-failure" and outcome.state == "failed")


async def _connect_qmp(path: str, deadline: float) -> QmpClient | None:
    """QMP (shutdown reasons, quarantine, power button), retried while its socket is not
    there yet. Without it the boot goes on; why is in the supervisor's log."""
    while True:
        try:
            return await QmpClient.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            if time.monotonic() > deadline:
                print(f"microagent supervisor: no QMP: {e}", file=sys.stderr, flush=True)
                return None
            await asyncio.sleep(0.05)
        except Exception as e:
            print(f"microagent supervisor: no QMP: {e!r}", file=sys.stderr, flush=True)
            return None


async def _answer(writer: asyncio.StreamWriter, error: str | None = None,
                  kind: str = "supervisor", hint: str = "", **fields: Any) -> None:
    writer.write(_answer_line(error, kind, hint, **fields))
    await writer.drain()


def _send_answer(writer: asyncio.StreamWriter, line: bytes, lent: socket.socket | None) -> None:
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


def _answer_line(error: str | None = None, kind: str = "supervisor", hint: str = "",
                 **fields: Any) -> bytes:
    document = {"ok": error is None, **fields}
    if error is not None:
        document["error"] = {"kind": kind, "message": error, "hint": hint}
    return json.dumps(document).encode() + b"\n"


def run_supervisor(layout: StateLayout, name: str, boot_timeout: float,
                   first: FirstBoot) -> int:
    """The supervisor's work once ``_supervise`` has the lock and launched the first
    boot (``first``). Never returns while the workspace runs."""
    files = layout.run_files(name)
    supervisor = Supervisor(layout, name, boot_timeout, first)
    try:
        return asyncio.run(supervisor.run())
    except BaseException as e:
        if not isinstance(e, SystemExit):
            append_event(layout.workspace_events(name), "failed", f"supervisor error: {e!r}")
        raise
    finally:
        for leftover in (files.status, files.initramfs, files.dir / "agent.sock",
                         files.dir / "agent-out.sock", files.dir / "console.sock",
                         files.dir / "qmp.sock",
                         files.dir / files.control_socket):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
