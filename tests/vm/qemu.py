"""Boot one microVM with QEMU and wait for it to end: the launch the VM tests share.

The argv is the one ``docs/architecture.md`` describes for the QEMU backend: a microvm
machine with ACPI (Debian's kernel finds virtio-mmio devices only through ACPI), the
root disk as a virtio-blk device, the console on the first serial port.

Under TCG the guest's TSC is the host's, but the kernel calibrates it against the PIT,
and that fails when the host is busy: the TSC is then marked unstable, the TSC-deadline
APIC timer gets no frequency and the boot hangs before /init (measured: 4 boots in 5
hung with two CPU hogs on a 2-core host). Telling the kernel the frequency
(``tsc_early_khz``) and that the TSC is reliable (no watchdog against the equally
delayed jiffies) made 6 of 6 boot under the same load.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

BOOT_TIMEOUT = 60.0


def use_kvm() -> bool:
    """KVM only when usable and the CPU has vmx/svm (a nested paravirtual /dev/kvm hangs
    normal kernels); else TCG. ``MICROAGENT_ACCEL=kvm|tcg`` overrides."""
    accel = os.environ.get("MICROAGENT_ACCEL")
    if accel is not None:
        return accel == "kvm"
    flags = Path("/proc/cpuinfo").read_text()
    return os.access("/dev/kvm", os.R_OK | os.W_OK) and (" vmx" in flags or " svm" in flags)


def accel_args() -> list[str]:
    """``-accel`` and ``-cpu`` for :func:`use_kvm`'s choice."""
    return ["-accel", "kvm", "-cpu", "host"] if use_kvm() else ["-accel", "tcg", "-cpu", "max"]


@functools.cache
def host_tsc_khz() -> int | None:
    """The host's TSC frequency, measured against CLOCK_MONOTONIC (x86-64 only)."""
    import ctypes
    import mmap
    import platform
    import statistics

    if platform.machine() != "x86_64":
        return None
    try:
        code = mmap.mmap(-1, mmap.PAGESIZE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:
        return None
    code.write(bytes.fromhex("0f31" "48c1e220" "4809d0" "c3"))  # rdtsc; rax |= rdx << 32
    rdtsc = ctypes.CFUNCTYPE(ctypes.c_uint64)(
        ctypes.addressof(ctypes.c_char.from_buffer(code)))
    rates = []
    for _ in range(5):
        t0, c0 = time.perf_counter_ns(), rdtsc()
        time.sleep(0.05)
        t1, c1 = time.perf_counter_ns(), rdtsc()
        rates.append((c1 - c0) * 1_000_000 / (t1 - t0))
    return round(statistics.median(rates))


def guest_clock_append() -> str:
    """Kernel parameters that keep a TCG guest's clock set-up from hanging (see above)."""
    if use_kvm():
        return ""
    khz = host_tsc_khz()
    return f"tsc_early_khz={khz} tsc=reliable" if khz else ""


def qemu_argv(kernel: Path, initrd: Path, disk: Path, append: str) -> list[str]:
    """The QEMU command line; the console goes to stdout (``-serial stdio``)."""
    return [
        "qemu-system-x86_64", "-M", "microvm,acpi=on", *accel_args(),
        "-m", "256", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic",
        "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", f"{append} {guest_clock_append()}".strip(),
        "-serial", "stdio",
        "-drive", f"id=root,file={disk},format=raw,if=none",
        "-device", "virtio-blk-device,drive=root",
    ]


@dataclass(frozen=True)
class Boot:
    """How one boot ended."""

    returncode: int | None  # None: killed at the timeout
    console: str
    seconds: float

    def lines(self, prefix: str = "microagent-init: ") -> list[str]:
        """The console lines starting with ``prefix`` (the agent's own messages)."""
        return [line.strip() for line in self.console.splitlines()
                if line.strip().startswith(prefix)]

    def tail(self, n: int = 40) -> str:
        """The console's last lines, for failure messages."""
        return "\n".join(self.console.splitlines()[-n:])


def boot(kernel: Path, initrd: Path, disk: Path, append: str, *, log: Path,
         timeout: float = BOOT_TIMEOUT) -> Boot:
    """Run the VM until QEMU exits or ``timeout`` passes (then kill it by pid)."""
    if shutil.which("qemu-system-x86_64") is None:
        raise RuntimeError("qemu-system-x86_64 is not installed (apt-get install "
                           "qemu-system-x86)")
    start = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(qemu_argv(kernel, initrd, disk, append),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            returncode: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    console = log.read_bytes().decode(errors="replace").replace("\r\n", "\n")
    return Boot(returncode, console, time.monotonic() - start)
