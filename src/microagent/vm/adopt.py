"""A supervisor re-attached to a VM whose supervisor was lost.

QEMU outlives its supervisor: :mod:`microagent.vm.launch` starts it without
``PR_SET_PDEATHSIG`` and hands it the locks that must last as long as the guest runs (its
RAM file's, its volumes'). A supervisor that is SIGKILLed (or taken by the OOM killer)
leaves the guest running, with its background processes and their output; the workspace
keeps its state (running, paused, quarantined) and says that its supervisor is gone
(:func:`microagent.state.runtime.runtime_state`). The next command that needs a
supervisor starts one with ``--adopt`` (:func:`microagent.workspace.lifecycle.reattach`),
which finds the VM in ``run/status.json`` (:func:`find_adoptable`) and takes it over
(:func:`watch_adopted`): QMP (``query-status``), the console, the agent's port (the agent
sees one host go and another come, as after a restore), a new passt and frame relay on
the network's link (QEMU listens for it again; none for a quarantined VM), and the output
port. A snapshot or suspend that the lost supervisor left with the vCPUs stopped is
cancelled and the VM continued; a VM still loading a memory image cannot be taken over
(it is ended: a start boots the workspace again).

Lost with the old supervisor: the console output written while nobody read it, the exec,
cp and console sessions in flight, and TCP connections through passt (its state died
with it). The guest's processes, files and memory are untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microagent.errors import ConflictError, MicroagentError
from microagent.events import now_iso
from microagent.layout import StateLayout
from microagent.state.runtime import process_start_time, read_status, same_process_alive
from microagent.vm.backends.base import AccelChoice, LaunchPlan
from microagent.vm.backends.qmp import QmpError
from microagent.vm.channel import AgentChannel
from microagent.vm.console import ConsoleCapture
from microagent.vm.vmm import USER_PAUSE, Outcome, PauseWatch, connect_qmp, log

if TYPE_CHECKING:
    from microagent.vm.supervisor import Supervisor

LOADING = frozenset({"inmigrate", "prelaunch", "restore-vm"})  # a memory image, half loaded
KEPT = ("boot_started", "kernel", "accel", "accel_reason", "memory", "vmm_pid",
        "vmm_start_time", "launch", "memory_file", "generation", "parent", "quarantined",
        "agent", "network", "ready_seconds")  # from the lost supervisor's record


@dataclass(frozen=True)
class Adopted:
    """A VM whose supervisor is gone, as its record describes it."""

    pid: int
    start_time: int
    status: dict[str, Any]  # the lost supervisor's run/status.json
    plan: LaunchPlan
    disks: tuple[Path, ...]
    memory_file: Path | None


def launch_record(plan: LaunchPlan, disks: tuple[Path, ...]) -> dict[str, Any]:
    """What a supervisor that re-attaches needs of one boot's launch (in status.json)."""
    return {"argv": list(plan.argv), "cwd": str(plan.cwd), "console": plan.console_socket,
            "agent": plan.agent_socket, "monitor": plan.monitor_socket,
            "out": plan.out_socket, "net": plan.net_socket,
            "disks": [str(disk) for disk in disks]}


def find_adoptable(layout: StateLayout, name: str) -> Adopted:
    """The VM of ``name`` left by its lost supervisor (the caller holds the supervisor
    lock). Raises ConflictError when there is none to take over."""
    status = read_status(layout.run_files(name))
    pid, start_time = status.get("vmm_pid"), status.get("vmm_start_time")
    launch = status.get("launch")
    if not isinstance(pid, int) or not isinstance(start_time, int) \
            or not same_process_alive(pid, start_time):
        raise ConflictError(f"workspace {name} has no VM process to re-attach to")
    if not isinstance(launch, dict):
        raise ConflictError(f"the VM of {name} (pid {pid}) was started by an older "
                            "microagent: it cannot be re-attached",
                            hint=f"end it: microagent kill {name}")
    plan = LaunchPlan(argv=tuple(launch["argv"]), cwd=Path(launch["cwd"]),
                      console_socket=launch["console"], agent_socket=launch["agent"],
                      monitor_socket=launch["monitor"], out_socket=launch.get("out"),
                      net_socket=launch.get("net"))
    memory = status.get("memory_file")
    return Adopted(pid, start_time, status, plan,
                   tuple(Path(disk) for disk in launch.get("disks", [])),
                   Path(memory) if memory else None)


class AdoptedVmm:
    """The VMM of a lost supervisor: not this process's child, so awaited and signalled
    through a pidfd (never a reused pid); its exit status is unknown (``-1``)."""

    def __init__(self, pid: int, start_time: int) -> None:
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        if process_start_time(pid) != start_time:  # the pid was reused before the open
            os.close(self.pidfd)
            raise ProcessLookupError(pid)
        self._returncode: int | None = None
        self._ended: asyncio.Future[None] | None = None  # the first wait's

    @property
    def returncode(self) -> int | None:
        return self._returncode

    async def wait(self) -> int:
        """Until the process has exited (every thread of it)."""
        if self._ended is None:
            loop = asyncio.get_running_loop()
            ended: asyncio.Future[None] = loop.create_future()
            self._ended = ended

            def readable() -> None:
                loop.remove_reader(self.pidfd)
                os.close(self.pidfd)
                self._returncode = -1
                ended.set_result(None)

            loop.add_reader(self.pidfd, readable)
        await asyncio.shield(self._ended)
        return -1

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            signal.pidfd_send_signal(self.pidfd, signum)


async def watch_adopted(sup: Supervisor, found: Adopted) -> Outcome:
    """Take over ``found`` (see the module docstring), then watch it as a boot of this
    supervisor's until it ends; how it ended."""
    began = time.monotonic()
    previous = found.status
    sup.vmm = AdoptedVmm(found.pid, found.start_time)
    sup.plan, sup.kernel = found.plan, _kernel_of(sup, previous)
    sup.memory_file, sup.memory_fd = found.memory_file, None
    sup.resume, sup.pending_root, sup.memory_fill = None, None, None
    sup.generation = int(previous.get("generation") or 0)
    sup.parent = previous.get("parent")
    sup.accel = AccelChoice(str(previous.get("accel") or sup.accel.accel),
                            str(previous.get("accel_reason") or sup.accel.reason))
    sup.pause = PauseWatch(found.disks)
    sup.quarantined = isinstance(previous.get("quarantined"), dict)
    sup.status.update({key: previous[key] for key in KEPT if key in previous},
                      readiness={}, reattached=now_iso(), attaching=True,
                      restarts=int(previous.get("restarts") or 0))
    sup.out_socket = found.plan.out_socket
    log_path = sup.layout.workspace_serial_log(sup.name)
    last_kept = _last_write(log_path)
    sup.console = ConsoleCapture(log_path, new_boot=False)
    sup.console.note(f"console output from {last_kept} until now was not kept: its "
                     f"supervisor (pid {previous.get('supervisor_pid', '?')}) was gone")
    sup.broker.capture = sup.console
    sup.console_shell = None
    sup.guest_fatal, sup.intent, sup.outcome, sup.booted = None, None, None, False
    sup.exited.clear()
    sup._save_status()
    waiter = asyncio.create_task(sup._wait_vmm())
    console = asyncio.create_task(sup.console.capture(found.plan.console_socket,
                                                      time.monotonic() + 10,
                                                      sup._console_line))
    attach = asyncio.create_task(_attach(sup, found, previous))
    try:
        done, _ = await asyncio.wait({waiter, attach}, timeout=sup.boot_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if attach in done and attach.exception() is None:
            sup.booted = True
            state, how = attach.result()
            sup.status["ready_seconds"] = round(time.monotonic() - began, 3)
            sup.status.pop("attaching", None)
            sup._save_status()
            sup._event(state, f"re-attached to its VM (pid {found.pid}) in "
                              f"{time.monotonic() - began:.1f}s: its supervisor (pid "
                              f"{previous.get('supervisor_pid', '?')}) was gone{how}")
            if sup.signalled is not None and sup.intent is None:
                sup._spawn(sup._halt({"cause": sup.signalled}))  # came while attaching
            await waiter
            return sup._classify()
        if waiter in done:
            return sup._classify() if sup.intent is not None else Outcome(
                "failed", "its VM ended while a supervisor re-attached to it")
        reason = (f"could not re-attach to its VM (pid {found.pid}): {attach.exception()}"
                  if attach in done else f"its VM (pid {found.pid}) did not answer within "
                                         f"{sup.boot_timeout:.0f}s")
        await sup._kill_vmm()
        await waiter
        return Outcome("failed", reason + "; it was ended")
    finally:
        await sup.end_boot(attach, console)


async def _attach(sup: Supervisor, found: Adopted, previous: dict[str, Any]
                  ) -> tuple[str, str]:
    """QMP, the vCPUs running again unless the user paused them, the network, the agent;
    the state to record and what to add to the event."""
    from microagent.network import has_network
    from microagent.vm.launch import start_network

    deadline = time.monotonic() + sup.boot_timeout
    sup.qmp = await connect_qmp(found.plan.monitor_socket, deadline, sup._vmm_event)
    if sup.qmp is None:
        raise MicroagentError("its QEMU monitor does not answer")
    run_state = str((await sup.qmp.execute("query-status")).get("status", "?"))
    if run_state in LOADING:
        raise MicroagentError(f"it was still loading a memory image ({run_state})")
    paused = previous.get("paused")
    how = ""
    if run_state != "running" and isinstance(paused, dict):  # the user's, or a full disk
        sup.pause.reason = str(paused.get("reason") or USER_PAUSE)
        sup.pause.asked = sup.pause.reason == USER_PAUSE
        sup.pause.pauses = 1
        sup.status["paused"] = paused
    elif run_state != "running":  # a snapshot or suspend cut short: its stop
        sup.imaging = True  # not a pause or resume anyone asked for
        try:
            with contextlib.suppress(QmpError):
                await sup.qmp.execute("migrate_cancel")
            await sup._cont()
        finally:
            sup.imaging = False
        how = f"; its vCPUs were stopped ({run_state}) and run again"
        log(f"re-attached VM was {run_state}: continued")
    if has_network(sup.workspace.network) and not sup.quarantined:
        sup.network = await asyncio.to_thread(start_network, sup.files, sup.workspace)
        sup.status["network_helper"] = {"program": "passt", "pid": sup.network.pid}
    sup.channel = AgentChannel()
    await sup.channel.connect(found.plan.agent_socket, deadline)
    sup.channel_task = asyncio.create_task(sup.channel.serve())
    if sup.pause.paused:  # the agent answers once the vCPUs run again
        sup._spawn(_greet(sup))
        return "paused", f"; paused: {sup.pause.reason}"
    await _greet(sup)
    if sup.quarantined:
        return "quarantined", "; exec, cp and console input stay refused"
    await asyncio.gather(sup.probe_exec(), sup._probe_network())
    console = previous.get("readiness", {}).get("consoleReady", {})
    if isinstance(console, dict) and console.get("ok"):  # its shell runs on: ask it
        sup.console_shell = True
        sup.console_probe = asyncio.create_task(sup._probe_console(10))
    return "running", how


async def _greet(sup: Supervisor) -> None:
    """HELLO on the agent's port (the guest saw the old supervisor's end close)."""
    if sup.channel is None:
        return
    hello = await sup.channel.handshake()
    sup.status["agent"] = hello.get("software", "")
    sup._ready("guestReady", True, f"agent said hello again ({hello.get('software', '?')})")


def _last_write(path: Path) -> str:
    """When the console log was last written (by the lost supervisor), UTC."""
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return "its last capture"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(mtime))


def _kernel_of(sup: Supervisor, previous: dict[str, Any]) -> Any:
    """The bundle the VM booted, if it is still installed under that version (a snapshot
    records its digest); None otherwise: snapshots are then refused."""
    from microagent.vm.launch import workspace_kernel

    with contextlib.suppress(MicroagentError, OSError):
        kernel = workspace_kernel(sup.layout, sup.workspace)
        if kernel.version == previous.get("kernel"):
            return kernel
    return None
