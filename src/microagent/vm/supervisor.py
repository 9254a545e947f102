"""The supervisor: one detached process per running workspace (``start`` spawns it).

It starts the VMM as its child, which outlives it when it is killed (a supervisor started
with ``--adopt`` takes it over: :mod:`microagent.vm.adopt`), captures the
serial console into ``serial.log``, holds the agent channel, serves the control socket
(:mod:`microagent.vm.control_server`: status, halt, stop, kill, quarantine, resume, relayed
exec streams, console sessions through :class:`~microagent.vm.console.ConsoleBroker`),
computes readiness, appends the
lifecycle events, applies the restart policy and records the final state. Only the
supervisor starts or ends a VMM process; the CLI's ``kill`` reaches for the VMM itself
only when the supervisor is gone.

SIGTERM, SIGINT and SIGHUP halt the workspace as ``halt`` does (the guest syncs and
powers off, with the usual grace and fallbacks; the events say which signal), then the
supervisor exits: process managers stop things with SIGTERM. A VM that QEMU pauses (its
host disk is full) is ``paused`` with the reason (:class:`~microagent.vm.vmm.PauseWatch`)
until ``resume``; halt, stop and kill work from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

from microagent.disks.attachments import remove_bundle_disks
from microagent.errors import ConflictError, MicroagentError, PausedError
from microagent.events import EventLog, append_event, now_iso
from microagent.kernel.kernels import KernelBundle
from microagent.layout import StateLayout
from microagent.network import port_failure
from microagent.state.records import Workspace
from microagent.state.runtime import process_start_time
from microagent.store import write_json_atomic
from microagent.vm import adopt, imaging
from microagent.vm.backends.base import LaunchPlan
from microagent.vm.backends.qmp import QmpClient, QmpError
from microagent.vm.channel import AgentChannel, LocalRequest
from microagent.vm.console import ConsoleBroker, ConsoleCapture
from microagent.vm.containment import sever_network
from microagent.vm.control_server import QUARANTINE_HINT, ControlServer
from microagent.vm.launch import FirstBoot, Launched, launch_vmm, vmm_said
from microagent.vm.passt import NetworkHelper
from microagent.vm.protocol import FrameType
from microagent.vm.snapshot import ResumeOrder
from microagent.vm.vmm import Outcome, PauseWatch, Vmm, VmmProcess, connect_qmp, log

HALT_GRACE_MS = 10_000
STOP_WAIT = 5.0
HELPER_EXIT_GRACE = 2.0  # passt ended during boot: QEMU may be exiting too (see boot_once)
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0
CONSOLE_PROBE_TIMEOUT = 30.0  # the console shell's first answer, at boot (TCG: slow)
RESUME_SETTLE = 1.0  # after `cont`: QEMU retries the failed writes at once
RESUMED_WAIT = 5.0  # the agent's answer to the resumed operation
PAUSE_EVENT_WAIT = 2.0  # after `stop`'s answer: its STOP event, to record the state
HALT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Supervisor:
    """Boots one workspace and watches it until it is halted, stopped or killed."""

    def __init__(self, layout: StateLayout, name: str, boot_timeout: float,
                 first: FirstBoot, early_signals: list[int] | None = None) -> None:
        self.layout = layout
        self.name = name
        self.files = layout.run_files(name)
        self.events = EventLog(layout.workspace_events(name))  # survives a full disk
        self.boot_timeout = boot_timeout
        self.first = first  # what _supervise did before the event loop
        self.workspace: Workspace = first.workspace
        self.accel = first.accel
        self.intent: str | None = None
        self.vmm: Vmm | None = None
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
        self.booted = False  # the current boot's guest is ready
        self.finished = asyncio.Event()  # the supervisor is winding down
        self.outcome: Outcome | None = None
        self.status: dict[str, Any] = {"supervisor_pid": os.getpid(), "restarts": 0}
        self.quarantined = False  # see microagent.workspace.quarantine; ends with the VM
        self.generation = 0  # resumes told to the guest (its /run/microagent/generation)
        self.sessions: set[asyncio.StreamWriter] = set()  # relayed exec/cp, console
        self.out_socket: str | None = None  # the output port's socket, if the VMM has one
        self.control = ControlServer(self)
        self.pause = PauseWatch()  # whether QEMU has stopped the vCPUs, and why
        self.early_signals = early_signals if early_signals is not None else []
        self.signalled: str | None = None  # "SIGTERM to the supervisor": halting for it
        self.halt_cause = ""  # what asked for the halt, when not a `halt` command
        self.wake = asyncio.Event()  # ends a restart's back-off early (kill, a signal)
        self.tasks: set[asyncio.Task[Any]] = set()  # fire-and-forget, kept referenced
        self.memory_file: Path | None = None  # this boot's RAM file (vm/memory.py), or anon
        self.memory_fd: int | None = None  # holds its lock while the boot lives
        self.resume: ResumeOrder | None = None  # the memory image this boot resumed from
        self.parent: str | None = None  # NAME:TAG this workspace's memory came from
        self.imaging = False  # a memory image is being saved or loaded: its STOP is ours
        self.postmigrate = False  # saved while paused: QEMU refuses another save until cont
        self.kernel_sha256 = ""
        self.memory_fill: asyncio.Future[None] | None = None  # the image's RAM being copied
        self.pending_root: Path | None = None  # a restore's root disk, renamed once loaded
        self.image_idle = asyncio.Event()  # no memory image is being saved (vm/imaging.py)
        self.image_idle.set()
        self.plan: LaunchPlan | None = None
        self.kernel: KernelBundle | None = None
        self.volumes_held = False  # a re-attached supervisor's (see hold_volumes)

    # --- status -----------------------------------------------------------------------

    def _event(self, state: str, detail: str = "") -> None:
        self.events.append(state, detail)

    def _save_status(self) -> None:
        # a full disk (a HostError that says so): the next save writes it whole, and
        # `status` asks the supervisor anyway
        with contextlib.suppress(OSError, MicroagentError):
            write_json_atomic(self.files.status, self.status, durable=False)  # gone at exit
        self.events.flush()  # what a full disk held back, now that it may take it

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

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
                self.hold_volumes()  # a re-attached supervisor's first own boot
                launched = launch_vmm(self.layout, self.workspace, self.accel, self.tsc_khz,
                                      cancelled=lambda: self.ending,
                                      inherit=self.first.held_fds)
            except ConflictError as e:
                return Outcome("failed", e.message)
            if launched is None:
                return Outcome("stopped", "killed")
        plan, kernel, recovery = launched.plan, launched.kernel, launched.recovery
        started, vmm_log_start = launched.started, launched.vmm_log_start
        self.memory_file, self.resume = launched.memory_file, launched.resume
        self.memory_fd = launched.memory_fd
        self.pending_root = launched.pending_root
        self.plan, self.kernel = plan, kernel
        self.postmigrate = False
        self.memory_fill = None
        if self.resume is not None:
            self.parent = imaging.parent_of(self.resume)
            self.memory_fill = imaging.fill_memory(self, self.resume)
        self.vmm = VmmProcess(launched.process)
        self.network = launched.network
        self.pause = PauseWatch(launched.disks)
        self.guest_fatal = None
        self.intent, self.outcome = None, None
        self.booted = False
        self.exited.clear()
        self.status.update(readiness={}, boot_started=now_iso(), kernel=kernel.version,
                           accel=self.accel.accel, accel_reason=self.accel.reason,
                           memory="file" if self.memory_file is not None else "anonymous")
        self.out_socket = plan.out_socket
        self.console = ConsoleCapture(self.layout.workspace_serial_log(self.name))
        self.broker.capture = self.console
        self.console_shell, self.console_checked = None, 0.0
        self.status.update(vmm_pid=self.vmm.pid, vmm_start_time=process_start_time(self.vmm.pid),
                           launch=adopt.launch_record(plan, launched.disks),
                           memory_file=str(self.memory_file) if self.memory_file else None,
                           generation=self.generation, parent=self.parent)
        self.status.pop("quarantined", None)
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
                self.booted = True
                self.status["ready_seconds"] = round(time.monotonic() - started, 3)
                self._save_status()
                note = ("; the root file system's journal was recovered (the last shutdown "
                        "was not clean)" if recovery and self.resume is None else "")
                how = "ready" if self.resume is None else {
                    "restored": f"restored from {self.resume.label}",
                    "forked": f"forked from {self.resume.label}",
                }.get(self.resume.kind, "resumed from its suspended memory")
                self._event("running", f"{how} in {self.status['ready_seconds']:.1f}s "
                                       f"({self.accel.accel}){note}")
                if self.signalled is not None and self.intent is None:
                    self._spawn(self._halt({"cause": self.signalled}))  # came while booting
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
                said = vmm_said(self.files.vmm_log, vmm_log_start)
                taken = port_failure(said)  # a --publish port taken since the check
                if taken is not None:
                    return Outcome("failed", taken.message)
                if self.resume is not None:
                    return Outcome("failed", f"QEMU could not load the memory image of "
                                             f"{self.resume.label} (status "
                                             f"{self.vmm.returncode}){said}; a cold start "
                                             "still works")
                return Outcome("failed", fatal or f"the VM exited during boot "
                                                  f"(status {self.vmm.returncode})" + said)
            if self.resume is not None and ready in done:
                reason = (f"could not resume from {self.resume.label}: {ready.exception()}; "
                          "a cold start still works")
            else:
                reason = (f"the guest agent failed: {ready.exception()}" if ready in done
                          else f"the VM was paused while booting: {self.pause.reason}"
                          if self.pause.paused
                          else f"the guest did not become ready within "
                               f"{self.boot_timeout:.0f}s")
            await self._kill_vmm()
            await waiter
            return Outcome("failed", await self._guest_fatal() or reason)
        finally:
            await self.end_boot(ready, helper_exit, *helpers)

    async def end_boot(self, *tasks: asyncio.Task[Any] | None) -> None:
        """After one boot (or a re-attached VM) ends: its tasks, passt, QMP, the RAM file
        and a restore's old root disk."""
        for task in (*tasks, self.channel_task, self.console_probe):
            if task is not None:
                task.cancel()
        self.channel_task = None
        if self.network is not None:  # ended by pid; it also ends with QEMU's link
            await asyncio.to_thread(self.network.stop)
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self.memory_file is not None and self.exited.is_set():
            from microagent.vm.memory import release_memory_file, sweep_memory_files

            if self.memory_fd is not None:
                release_memory_file(self.memory_file, self.memory_fd)
                self.memory_fd = None
            else:  # a re-attached VM's: its lock was QEMU's
                sweep_memory_files()
        if self.pending_root is not None and self.exited.is_set():
            from microagent.vm.launch import put_back_root

            with contextlib.suppress(OSError):  # a restore that did not load
                put_back_root(self.workspace.rootfs, self.pending_root)

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
        if self.resume is None:
            await self.channel.connect(agent_socket, deadline)
            self.qmp = await connect_qmp(qmp_socket, deadline, self._vmm_event)
        else:  # connected after the load, the agent sees the old host go, this one come
            self.qmp = await connect_qmp(qmp_socket, deadline, self._vmm_event)
            await imaging.load_image(self, self.resume, self.pending_root)
            await self.channel.connect(agent_socket, deadline)
        self.channel_task = asyncio.create_task(self.channel.serve())
        hello = await self.channel.handshake()
        self.status["agent"] = hello.get("software", "")
        self._ready("guestReady", True, f"agent said hello ({hello.get('software', '?')})")
        if self.resume is not None:  # the clock, the RNG, a fork's identity: first
            await self._resumed_on_load(self.resume)
        await asyncio.gather(self.probe_exec(), self._probe_network())

    async def probe_exec(self, timeout: float = 15) -> bool:
        """A no-op exec round trip; sets execReady."""
        if self.channel is None or self.channel.closed.is_set():
            self._ready("execReady", False, "no agent channel")
            return False
        start = time.monotonic()
        try:
            frame, _ = await self.channel.request(
                {"op": "exec", "argv": ["true"], "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
                 "cwd": "/", "user": "", "tty": None, "stdin": False, "timeout_ms": 10_000},
                timeout=timeout)
        except TimeoutError:
            self._ready("execReady", False, f"a no-op exec got no answer within {timeout:g}s: "
                                            "the guest is unresponsive")
            return False
        except Exception as e:
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
            return Outcome("halted", "halted cleanly" + (f" ({self.halt_cause})"
                                                         if self.halt_cause else ""))
        if self.intent == "halt-timeout":
            return Outcome("failed", "the guest did not halt in time; the VM was ended")
        if self.intent == "halt-paused":
            return Outcome("failed", f"the guest could not halt: {self.pause.reason}; the "
                                     "VM was ended")
        if self.intent == "kill":
            return Outcome("stopped", "killed")
        if self.intent == "suspend":
            return Outcome("suspended", "its memory is saved; `start` resumes it")
        if self.intent == "stop":
            return Outcome("stopped", "stopped by request")
        if reason == "guest-shutdown" or (code == 0 and reason is None):
            return Outcome("stopped", "the guest powered off")
        if reason in ("guest-reset", "guest-panic"):
            return Outcome("failed", f"the guest rebooted or panicked ({reason})")
        return Outcome("failed", "the VM process ended unexpectedly" + (
            f" (status {code})" if (code is not None and code >= 0) or not self.first.adopted
            else ""))

    async def _kill_vmm(self) -> None:
        if self.vmm is not None and self.vmm.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.vmm.kill()

    async def serve_client(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        """One control connection (:class:`~microagent.vm.control_server.ControlServer`)."""
        await self.control.serve(reader, writer)

    # --- memory images (vm/imaging.py) --------------------------------------------------

    async def _snapshot(self, request: dict[str, Any]) -> dict[str, Any]:
        return await imaging.snapshot(self, request)

    async def _suspend(self, request: dict[str, Any]) -> dict[str, Any]:
        return await imaging.suspend(self, request)

    # --- paused -----------------------------------------------------------------------

    def _vmm_event(self, message: dict[str, Any]) -> None:
        """A QMP event: the VM paused (e.g. host disk full) or resumed."""
        if self.imaging and message.get("event") in ("STOP", "RESUME"):
            return  # a snapshot's or a restore's own: not a pause anyone asked for
        change = self.pause.event(message)
        if change is None or (self.qmp is not None and self.qmp.shutdown_reason):
            return
        quiet = self.intent is not None  # halt or stop resumes it on the way out
        if change == "paused":
            reason = str(self.pause.reason)
            self.status["paused"] = {"reason": reason, "time": now_iso()}
            self._ready("execReady", False, f"paused: {reason}")
            if not quiet:
                self._event("paused", reason)
            return
        self.status.pop("paused", None)
        self._save_status()
        if not quiet:
            self._event("running", "resumed")
        if not self.quarantined:
            self._spawn(self.probe_exec())

    async def _pause(self, request: dict[str, Any]) -> dict[str, Any]:
        """The user's ``pause``: QMP ``stop``; the VM, its sockets and its memory stay.
        Answered once QEMU has stopped the vCPUs (its STOP event recorded)."""
        await self.image_idle.wait()  # a snapshot in progress ends first
        if self.intent == "suspend":
            raise ConflictError(f"workspace {self.name} was suspended meanwhile")
        if self.pause.paused:
            raise ConflictError(f"the workspace is already paused: {self.pause.reason}")
        if self.quarantined:
            raise ConflictError("the workspace is quarantined: pause is refused",
                                hint=QUARANTINE_HINT)
        if self.intent is not None or self.outcome is not None or not self.booted \
                or self.vmm is None or self.vmm.returncode is not None or self.qmp is None:
            raise ConflictError("the workspace is not running")
        before = self.pause.pauses
        self.pause.ask()
        try:
            await self.qmp.execute("stop")
        except (QmpError, TimeoutError, ConnectionError) as e:
            self.pause.asking = False
            raise MicroagentError(f"QEMU did not pause the VM: {e}") from e
        deadline = time.monotonic() + PAUSE_EVENT_WAIT
        while self.pause.pauses == before and time.monotonic() < deadline:
            await asyncio.sleep(0.001)  # STOP comes right after stop's answer
        return {"state": "paused"}

    async def _resume(self, request: dict[str, Any]) -> dict[str, Any]:
        """``cont``: the vCPUs run again; after a host pause QEMU retries the writes that
        failed (and may pause again at once, which is said); the user's pause resumes at
        once."""
        await self.image_idle.wait()  # a snapshot in progress ends first
        if self.intent == "suspend":
            raise ConflictError(f"workspace {self.name} was suspended meanwhile")
        if not self.pause.paused or self.intent is not None or self.outcome is not None:
            raise ConflictError("the workspace is not paused")
        if not await self._unpause():
            raise ConflictError(f"it paused again at once: {self.pause.reason}",
                                hint="make room there, then resume it again")
        self.postmigrate = False
        self._tell_resumed_later()
        return {"state": "running"}

    def _tell_resumed(self, identity: dict[str, Any] | None = None
                      ) -> tuple[int, LocalRequest] | None:
        """The agent's ``resumed`` operation: the guest's clock stopped with its vCPUs, so
        it is stepped to the host's; fresh entropy reseeds its RNG; the generation counter
        goes up. Written to the channel before the resume is answered, so the guest takes
        it before any command a client sends after that; its answer is not waited for. A
        guest that cannot take it (an older agent) runs on all the same; why goes to the
        supervisor's log. A fork's ``identity`` (its hostname) goes with it. Returns
        what was sent, for a caller that waits for the answer (a restore does)."""
        hello = self.channel.hello if self.channel is not None else None
        if self.channel is None or not hello or "resumed" not in hello.get("features", ()):
            return None
        self.generation += 1
        self.status["generation"] = self.generation  # a re-attached supervisor goes on
        request: dict[str, Any] = {
            "op": "resumed", "time_ns": time.time_ns(), "entropy": os.urandom(32).hex(),
            "generation": self.generation}
        if identity:
            request["identity"] = identity
        return self.channel.send_request(request)

    def _tell_resumed_later(self) -> None:
        """:meth:`_tell_resumed`, its answer logged when it comes."""
        sent = self._tell_resumed()
        if sent is not None and self.channel is not None:
            self._spawn(self._resumed_answer(self.channel, *sent))

    async def _resumed_on_load(self, order: ResumeOrder) -> None:
        """The resumed operation after a load, awaited; a fork that cannot take its new
        identity fails to start (two workspaces with one hostname and machine-id)."""
        hello = self.channel.hello if self.channel is not None else None
        features = hello.get("features", ()) if hello else ()
        if order.identity and "resumed_identity" not in features:
            raise MicroagentError("the agent in the snapshot's memory cannot take a fork's "
                                  "new identity (it is older than this microagent)")
        self.generation = order.generation - 1
        sent = self._tell_resumed(order.identity)
        if sent is None or self.channel is None:
            return
        try:
            frame, _ = await self.channel.answer(*sent, RESUMED_WAIT)
        except (TimeoutError, ConnectionError, MicroagentError) as e:
            if order.identity:
                raise MicroagentError(f"the guest did not take its new identity: {e}") from e
            log(f"the guest did not take the resumed operation: {e}")
            return
        if frame.type != FrameType.EXIT:
            if order.identity:
                raise MicroagentError(f"the guest refused its new identity: {frame.json()}")
            log(f"the guest refused the resumed operation: {frame.json()}")

    async def _resumed_answer(self, channel: AgentChannel, stream: int,
                              route: LocalRequest) -> None:
        try:
            frame, _ = await channel.answer(stream, route, RESUMED_WAIT)
        except (TimeoutError, ConnectionError, MicroagentError) as e:
            log(f"the guest did not take the resumed operation: {e}")
            return
        if frame.type != FrameType.EXIT:
            log(f"the guest refused the resumed operation: {frame.json()}")

    async def _unpause(self) -> bool:
        """``cont``, then whether it stays running (a disk still full stops it again; the
        user's pause has nothing to retry: no wait)."""
        before = self.pause.pauses
        asked = self.pause.asked
        await self._cont()
        if asked:
            return True
        await asyncio.sleep(RESUME_SETTLE)
        return not (self.pause.paused and self.pause.pauses > before)

    async def _cont(self) -> None:
        if self.qmp is None:
            raise MicroagentError("the VM cannot be resumed: there is no QEMU monitor",
                                  hint=f"microagent kill {self.name}")
        try:
            await self.qmp.execute("cont")
        except (QmpError, TimeoutError, ConnectionError) as e:
            raise MicroagentError(f"QEMU did not resume the VM: {e}") from e

    async def _until_exit(self, timeout: float, pauses: int) -> str:
        """``exited``, ``paused`` (again since the ``pauses``-th pause: the disk is still
        full) or ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self.exited.is_set():
            if self.pause.paused and self.pause.pauses > pauses:
                return "paused"
            if time.monotonic() > deadline:
                return "timeout"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.exited.wait(), 0.1)
        return "exited"

    async def _halt(self, request: dict[str, Any]) -> dict[str, Any]:
        """The clean shutdown (``halt``, or a signal to the supervisor: ``cause``).

        A paused guest must run to sync and power off: it is resumed first. If it pauses
        again at once (its disk is still full), ``halt`` is refused and the VM stays
        paused, its unsynced writes kept; a signal ends it anyway (the supervisor must
        exit), and the workspace is ``failed``."""
        await self.image_idle.wait()  # a snapshot in progress ends first
        if self.intent == "suspend":
            raise ConflictError(f"workspace {self.name} was suspended meanwhile")
        cause = str(request.get("cause") or "")
        if self.pause.paused and not cause:
            try:
                resumed = await self._unpause()
            except MicroagentError:
                resumed = False
            if not resumed:
                raise ConflictError(
                    f"it cannot halt cleanly while paused: {self.pause.reason}",
                    hint=f"make room there and halt it again; `microagent kill "
                         f"{self.name}` ends it now (its unsynced writes are lost)")
        self.intent = "halt"
        self.halt_cause = cause
        self._event("halting", f"{cause}: halting" if cause else "halt requested")
        grace = int(request.get("grace_ms", HALT_GRACE_MS))
        pauses = self.pause.pauses
        if self.pause.paused:
            with contextlib.suppress(MicroagentError):
                await self._cont()
        if self.channel is not None and not self.channel.closed.is_set():
            self.channel.send_only({"op": "shutdown", "grace_ms": grace, "mode": "poweroff"})
        ended = await self._until_exit(grace / 1000 + 20, pauses)
        if ended != "exited":  # paused again (disk still full) or no answer: end it
            self.intent = "halt-paused" if ended == "paused" else "halt-timeout"
            await self._kill_vmm()
            await self.exited.wait()
            return {"state": "failed", "detail": self._classify().detail}
        return {"state": "halted"}

    async def _stop(self, request: dict[str, Any]) -> dict[str, Any]:
        await self.image_idle.wait()  # a snapshot in progress ends first
        if self.intent == "suspend":
            raise ConflictError(f"workspace {self.name} was suspended meanwhile")
        self.intent = "stop"
        if self.pause.paused:
            with contextlib.suppress(MicroagentError):
                await self._cont()
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
        await self.image_idle.wait()  # a snapshot in progress ends first
        if self.intent == "suspend":
            raise ConflictError(f"workspace {self.name} was suspended meanwhile")
        if self.quarantined:
            raise ConflictError("the workspace is already quarantined", hint=QUARANTINE_HINT)
        if self.pause.paused:
            raise PausedError(self.name, str(self.pause.reason))
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
        self.wake.set()
        await self._kill_vmm()
        await self.finished.wait()
        return {"state": "stopped"}

    # --- the whole life ---------------------------------------------------------------

    async def run(self) -> int:
        """Boot, apply the restart policy, record the final state."""
        server = await asyncio.start_unix_server(self.serve_client,
                                                 path=self.files.control_socket)
        loop = asyncio.get_running_loop()
        for halt_signal in HALT_SIGNALS:
            loop.add_signal_handler(halt_signal, self._on_signal, int(halt_signal))
        for early in self.early_signals:  # came before the loop (see _supervise)
            self._on_signal(early)
        failures = 0
        holds = self.first.holds  # the volumes, held for the supervisor's life
        launched, failure = self.first.launched, self.first.failure  # the first boot's
        adopted = self.first.adopted  # or the VM a lost supervisor left (vm/adopt.py)
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
                    elif adopted is not None:
                        outcome = await adopt.watch_adopted(self, adopted)
                    else:
                        outcome = await self.boot_once(launched)
                except Exception as e:
                    await self._kill_vmm()
                    outcome = Outcome("failed", f"could not boot: {e}")
                launched, failure, adopted = None, None, None  # restarts launch their own
                if self.intent == "stop-failed":
                    outcome = Outcome("stopped", "the guest exited after a failed stop")
                self.outcome = outcome
                self._event(outcome.state, outcome.detail)
                if self.intent is not None or self.quarantined or self.ending \
                        or not self._should_restart(outcome):
                    return 0 if outcome.state != "failed" else 1
                failures = 0 if time.monotonic() - began > STABLE_AFTER else failures + 1
                delay = min(BACKOFF_MAX, 2.0 ** max(0, failures - 1))
                self.status["restarts"] += 1
                self._event("starting", f"restart {self.status['restarts']} "
                                        f"(policy {self.workspace.restart}) after {delay:.0f}s")
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), delay)
                if self.signalled is not None:  # no VM to halt: end here
                    self.outcome = Outcome("stopped", f"{self.signalled} during the "
                                                      "restart's back-off; not restarted")
                    self._event(self.outcome.state, self.outcome.detail)
                    return 0
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

    def hold_volumes(self) -> None:
        """The volumes, held from now for the supervisor's life: a re-attached supervisor
        starts without (the VM it found holds them) and takes them before a boot of its
        own. Raises ConflictError when another workspace took one meanwhile."""
        if self.first.adopted is None or self.volumes_held:
            return
        from microagent.disks.volumes import hold_volumes

        volumes = [d.name for d in self.workspace.disks if d.kind == "volume"]
        self.first.held_fds = tuple(self.first.holds.enter_context(
            hold_volumes(self.layout, self.name, volumes)))
        self.volumes_held = True

    def _on_signal(self, signum: int) -> None:
        """SIGTERM, SIGINT, SIGHUP: halt as ``halt`` does, then end (``run`` returns once
        the VM is down). A second signal changes nothing: the halt has its own bounds."""
        if self.signalled is not None or self.finished.is_set():
            return
        self.signalled = f"{signal.Signals(signum).name} to the supervisor"
        self.ending = True  # boot nothing more
        self.wake.set()
        if self.vmm is not None and self.vmm.returncode is None and self.booted \
                and self.intent in (None, "stop-failed"):
            self._spawn(self._halt({"cause": self.signalled}))
        # else: booting (boot_once halts once the guest is ready, or the boot fails), or
        # between boots (run ends), or a halt, stop or kill is under way already

    def _should_restart(self, outcome: Outcome) -> bool:
        policy = self.workspace.restart
        return policy == "always" or (policy == "on-failure" and outcome.state == "failed")


def run_supervisor(layout: StateLayout, name: str, boot_timeout: float,
                   first: FirstBoot, early_signals: list[int] | None = None) -> int:
    """The supervisor's work once ``_supervise`` has the lock and launched the first
    boot (``first``); ``early_signals`` were received before (they halt it at once).
    Never returns while the workspace runs."""
    files = layout.run_files(name)
    supervisor = Supervisor(layout, name, boot_timeout, first, early_signals)
    try:
        return asyncio.run(supervisor.run())
    except BaseException as e:
        if not isinstance(e, SystemExit):
            append_event(layout.workspace_events(name), "failed", f"supervisor error: {e!r}")
        raise
    finally:
        for leftover in (files.status, files.initramfs, files.dir / "agent.sock",
                         files.dir / "agent-out.sock", files.dir / "console.sock",
                         files.dir / "qmp.sock", files.dir / "net.sock",
                         files.dir / files.control_socket):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
