"""The backend interface: check the host, plan a launch (pure), and the plan's shape.

A backend turns a :class:`LaunchSpec` (what to boot) into a :class:`LaunchPlan` (the exact
argv and files) with a pure function, so plans are golden-tested without a VM. Launching,
connecting and shutting down are done by the supervisor using the plan's paths.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from microagent.disks.attachments import DiskSpec
from microagent.errors import UsageError

ACCEL_ENV = "MICROAGENT_ACCEL"
MAX_CMDLINE = 2048  # COMMAND_LINE_SIZE on x86, the terminating NUL included


@dataclass(frozen=True)
class PortSpec:
    """A host TCP port forwarded to a guest port (``--publish``; passt forwards it)."""

    host_ip: str
    host_port: int
    guest_port: int


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a backend needs to boot one workspace."""

    name: str
    memory_mib: int
    cpus: int
    kernel: Path
    initramfs: Path
    cmdline: str
    disks: tuple[DiskSpec, ...]
    run_dir: Path
    network: str = "user"  # a user-mode network (passt, through the supervisor) or "none"
    accel: str = "tcg"
    memory_file: Path | None = None  # guest RAM in this shared file (vm/memory.py), else anon
    incoming: bool = False  # wait for a memory image (``-incoming defer``) instead of booting


@dataclass(frozen=True)
class LaunchPlan:
    """The exact process to start and the sockets it will serve, relative to ``cwd``.

    Socket paths are relative so that a long state directory never exceeds the ~107-byte
    limit of Unix socket addresses: the VMM runs with ``cwd`` as its working directory.
    """

    argv: tuple[str, ...]
    cwd: Path
    console_socket: str
    agent_socket: str
    monitor_socket: str
    out_socket: str | None = None  # the output port's, if the VMM has one
    net_socket: str | None = None  # the link to the network helper, if the VM has one
    notices: tuple[str, ...] = field(default=())


class Backend(Protocol):
    """What every VMM backend provides."""

    name: str

    def check_host(self) -> list[str]:
        """Problems that stop this backend from running here (empty when fine)."""

    def plan(self, spec: LaunchSpec) -> LaunchPlan:
        """The launch plan for ``spec``. Pure: no I/O, no side effects."""


@dataclass(frozen=True)
class AccelChoice:
    """Which accelerator to use, and why (shown as a notice when falling back)."""

    accel: str
    reason: str


def choose_accel(environ: dict[str, str] | None = None, *, kvm_device: Path = Path("/dev/kvm"),
                 cpuinfo: Path = Path("/proc/cpuinfo")) -> AccelChoice:
    """KVM when /dev/kvm is usable AND the CPU advertises vmx or svm, else TCG.

    A nested, paravirtual /dev/kvm without vmx/svm exists on some hosts and hangs ordinary
    guest kernels at 100% CPU, so the device alone is not enough. ``MICROAGENT_ACCEL``
    (``kvm`` or ``tcg``) overrides the choice.
    """
    env = os.environ if environ is None else environ
    forced = env.get(ACCEL_ENV, "").strip().lower()
    if forced in ("kvm", "tcg"):
        return AccelChoice(forced, f"{ACCEL_ENV}={forced}")
    if not os.access(kvm_device, os.R_OK | os.W_OK):
        return AccelChoice("tcg", f"{kvm_device} is missing or not accessible; using TCG "
                                  "(software emulation, slower)")
    try:
        flags = cpuinfo.read_text(errors="replace")
    except OSError:
        flags = ""
    words = set()
    for line in flags.splitlines():
        if line.startswith("flags"):
            words.update(line.split(":", 1)[-1].split())
    if not words & {"vmx", "svm"}:
        return AccelChoice("tcg", f"{kvm_device} exists but the CPU advertises no vmx/svm "
                                  "(nested paravirtual KVM cannot run ordinary kernels); "
                                  "using TCG (software emulation, slower)")
    return AccelChoice("kvm", "KVM is usable")


# The user-mode network (microagent.vm.passt): the guest's address, the gateway and its DNS.
USER_NET_IP = "10.0.2.15/24"
USER_NET_GATEWAY = "10.0.2.2"
USER_NET_DNS = "10.0.2.3"


def guest_cmdline(*, hostname: str, network: str, accel: str, tsc_khz: int | None,
                  disks: Sequence[str] = ()) -> str:
    """The kernel command line: console, agent parameters, and TCG clock hints.

    ``disks`` are the ``microagent.disk=`` values of the attached disks
    (:func:`microagent.disks.attachments.boot_disks`), mounted by the agent in this order.

    Under TCG the kernel calibrates the TSC against the PIT, which fails when the host is
    busy: the TSC is marked unstable and the boot hangs before /init (measured: 4 boots in
    5 hung with two CPU hogs on a 2-core host). Giving the frequency (``tsc_early_khz``)
    and ``tsc=reliable`` made 6 of 6 boot under the same load. ``panic=-1`` with QEMU's
    ``-no-reboot`` turns a guest panic into a VMM exit instead of a hang.
    """
    params = ["console=ttyS0", "panic=-1", "quiet", "loglevel=4",
              f"microagent.hostname={hostname}"]
    if network != "none":
        params += [f"microagent.ip={USER_NET_IP}", f"microagent.gw={USER_NET_GATEWAY}",
                   f"microagent.dns={USER_NET_DNS}"]
    if accel == "tcg" and tsc_khz:
        params += [f"tsc_early_khz={tsc_khz}", "tsc=reliable"]
    params += [f"microagent.disk={disk}" for disk in disks]
    cmdline = " ".join(params)
    if len(cmdline) >= MAX_CMDLINE:
        raise UsageError(f"the kernel command line would be {len(cmdline)} bytes, more than "
                         f"the {MAX_CMDLINE} x86 allows", hint="attach fewer disks, or use "
                         "shorter destinations")
    return cmdline


def host_tsc_khz(cache: Path | None = None) -> int | None:
    """The host's TSC frequency in kHz, measured against the monotonic clock (x86-64).

    A guest under TCG reads the host's TSC, so this is the frequency it should assume.
    Measuring takes 60 ms; with ``cache`` (a JSON file) it is measured once per host boot
    (``/proc/sys/kernel/random/boot_id``), not at every start.
    """
    import json

    boot_id = ""
    if cache is not None:
        with contextlib.suppress(OSError):
            boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        with contextlib.suppress(OSError, ValueError, TypeError):
            record = json.loads(cache.read_text())
            if boot_id and record.get("boot_id") == boot_id:
                return int(record["tsc_khz"])
    khz = _measure_tsc_khz()
    if cache is not None and boot_id and khz is not None:
        from microagent.store import write_json_atomic

        with contextlib.suppress(OSError):
            write_json_atomic(cache, {"boot_id": boot_id, "tsc_khz": khz})
    return khz


def _measure_tsc_khz() -> int | None:
    import ctypes
    import mmap
    import platform
    import statistics
    import time

    if platform.machine() != "x86_64":
        return None
    try:
        code = mmap.mmap(-1, mmap.PAGESIZE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:
        return None
    code.write(bytes.fromhex("0f31" "48c1e220" "4809d0" "c3"))  # rdtsc; rax |= rdx << 32
    rdtsc = ctypes.CFUNCTYPE(ctypes.c_uint64)(ctypes.addressof(ctypes.c_char.from_buffer(code)))
    rates = []
    for _ in range(3):
        t0, c0 = time.perf_counter_ns(), rdtsc()
        time.sleep(0.02)
        t1, c1 = time.perf_counter_ns(), rdtsc()
        rates.append((c1 - c0) * 1_000_000 / (t1 - t0))
    return round(float(statistics.median(rates)))
