"""The running VMM as the supervisor's event loop sees it: its process, its monitor, and
whether its vCPUs run.

:class:`VmmProcess` is the child QEMU (started by :mod:`microagent.vm.launch` without
asyncio), awaited through a pidfd. :func:`connect_qmp` reaches its monitor.
:class:`PauseWatch` turns QMP's events into the workspace's ``paused`` state and its
reason: QEMU stops the VM when a write to a disk image fails with ENOSPC (``werror=enospc``
is QEMU's default: the guest never sees the error, and the write is retried by ``cont``),
announcing BLOCK_IO_ERROR (which disk, ``nospace``) and then STOP; RESUME ends it. A STOP
after :meth:`PauseWatch.ask` is the user's ``pause``; one with neither before it is a
pause someone else asked QEMU for. :func:`process_stopped`
tells a frozen VMM process (SIGSTOP) from a hung guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from microagent.vm.backends.qmp import QmpClient


@dataclass(frozen=True)
class Outcome:
    """How one boot ended."""

    state: str  # halted, stopped or failed
    detail: str


class Vmm(Protocol):
    """The VMM process a supervisor watches: its child (:class:`VmmProcess`) or one it
    re-attached to (:class:`microagent.vm.adopt.AdoptedVmm`)."""

    pid: int

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def kill(self) -> None: ...

    def send_signal(self, signum: int) -> None: ...


class VmmProcess:
    """The VMM child, started outside the event loop (:mod:`microagent.vm.launch`) and
    awaited through a pidfd (a thread on kernels before 5.3)."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    async def wait(self) -> int:
        """Until the process has exited; its status."""
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


def process_stopped(pid: int) -> bool:
    """``pid`` is stopped by a signal (SIGSTOP, SIGTSTP) or traced: it runs no vCPU and
    answers nothing, QMP included, until SIGCONT."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")


async def connect_qmp(path: str, deadline: float,
                      on_event: Callable[[dict[str, Any]], None] | None = None
                      ) -> QmpClient | None:
    """QMP (shutdown reasons, pauses, quarantine, the power button), retried while its
    socket is not there yet. Without it the boot goes on; why is in the supervisor's log."""
    while True:
        try:
            return await QmpClient.connect(path, on_event)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            if time.monotonic() > deadline:
                log(f"no QMP: {e}")
                return None
            await asyncio.sleep(0.05)
        except Exception as e:
            log(f"no QMP: {e!r}")
            return None


def log(line: str) -> None:
    with contextlib.suppress(OSError):  # the log is on a full disk: nothing to tell
        print(f"microagent supervisor: {line}", file=sys.stderr, flush=True)


USER_PAUSE = "paused by microagent pause"


@dataclass
class PauseWatch:
    """Whether the VM is paused, and why, from QMP's events (see the module docstring).

    ``disks`` are the boot's disk images in drive order: QEMU names them ``disk0``,
    ``disk1``... (``backends/qemu.py``).
    """

    disks: tuple[Path, ...] = ()
    reason: str | None = None  # None: not paused
    cause: str | None = None  # the last I/O error's, for the STOP that follows it
    pauses: int = 0  # how many times the VM was paused in this boot
    asked: bool = False  # the current pause is the user's (``pause``), not the host's
    asking: bool = False  # a ``pause`` sent QMP ``stop``: its STOP is the user's

    @property
    def paused(self) -> bool:
        return self.reason is not None

    def ask(self) -> None:
        """The user's ``pause`` is about to send QMP ``stop``."""
        self.asking = True

    def event(self, message: dict[str, Any]) -> str | None:
        """Take one QMP event; ``"paused"`` or ``"resumed"`` when the state changed."""
        name = message.get("event")
        data = message.get("data") or {}
        if name == "BLOCK_IO_ERROR" and data.get("action") == "stop":
            self.cause = self.io_error_reason(data)
            return None
        if name == "STOP":
            self.asked = self.asking and self.cause is None
            self.reason = (self.cause or (USER_PAUSE if self.asked else
                                          "the VM was paused (a QMP stop)"))
            self.cause = None
            self.asking = False
            self.pauses += 1
            return "paused"
        if name == "RESUME" and self.reason is not None:
            self.reason = None
            self.asked = False
            return "resumed"
        return None

    def io_error_reason(self, data: dict[str, Any]) -> str:
        """The words for BLOCK_IO_ERROR's ``data``: which disk, on which host directory."""
        device = str(data.get("device") or data.get("node-name") or "?")
        disk = self._disk(device)
        where = str(disk.parent) if disk is not None else "an unknown directory"
        image = disk.name if disk is not None else device
        if data.get("nospace"):
            return f"host disk full in {where} (writing {image})"
        return (f"host I/O error on {image} in {where}: "
                f"{data.get('reason') or data.get('operation') or 'unknown'}")

    def _disk(self, device: str) -> Path | None:
        if device.startswith("disk") and device[4:].isdigit() \
                and int(device[4:]) < len(self.disks):
            return Path(os.path.realpath(self.disks[int(device[4:])]))
        return None
