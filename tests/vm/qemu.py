"""Boot one microVM with QEMU and wait for it to end: the launch the VM tests share.

The argv is the one ``docs/architecture.md`` describes for the QEMU backend: a microvm
machine with ACPI (Debian's kernel finds virtio-mmio devices only through ACPI), the
root disk as a virtio-blk device, the console on the first serial port. Under TCG the
CPU is ``max`` without ERMS and FSRM (see ``TCG_CPU``).

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
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from microagent.vm.backends.base import choose_accel
from microagent.vm.backends.base import host_tsc_khz as measure_host_tsc_khz

BOOT_TIMEOUT = 60.0

# Under TCG, "rep movsb" is emulated one iteration at a time, and with ERMS/FSRM
# advertised (as -cpu max does) the guest kernel copies every user buffer that way:
# measured here, masking them made a pipe hop 3.9x and exec's stdout 3.2x faster.
TCG_CPU = "max,-erms,-fsrm"


def use_kvm() -> bool:
    """The backend's rule (``choose_accel``): KVM only when usable with vmx/svm."""
    return choose_accel().accel == "kvm"


def accel_args() -> list[str]:
    """``-accel`` and ``-cpu`` for :func:`use_kvm`'s choice."""
    return ["-accel", "kvm", "-cpu", "host"] if use_kvm() else ["-accel", "tcg", "-cpu", TCG_CPU]


@functools.cache
def host_tsc_khz() -> int | None:
    """The backend's host TSC measurement, once per session."""
    return measure_host_tsc_khz()


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


# --- a running VM with the agent channel, the console socket and user networking --------

AGENT_PORT = "microagent"
RAW_PORT = "raw"


def vm_argv(kernel: Path, initrd: Path, disk: Path, append: str, run_dir: Path, *,
            memory_mib: int = 256, network: bool = True, raw_port: bool = False) -> list[str]:
    """QEMU for a VM the test talks to: the console on ``console.sock`` (also logged to
    ``console.log``), the agent's virtio-serial port on ``agent.sock``, optionally a second
    port named ``raw`` on ``raw.sock`` (the throughput floor), QMP on ``qmp.sock``, and
    QEMU's user networking (the guest is 10.0.2.15, the host 10.0.2.2)."""
    argv = [
        "qemu-system-x86_64", "-M", "microvm,acpi=on,rtc=on", *accel_args(),
        "-m", str(memory_mib), "-smp", "1", "-nodefaults", "-no-user-config", "-nographic",
        "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", f"{append} {guest_clock_append()}".strip(),
        "-chardev", f"socket,id=console,path={run_dir}/console.sock,server=on,wait=off,"
                    f"logfile={run_dir}/console.log",
        "-serial", "chardev:console",
        "-drive", f"id=root,file={disk},format=raw,if=none",
        "-device", "virtio-blk-device,drive=root",
        "-device", "virtio-serial-device,max_ports=4",
        "-chardev", f"socket,id=agent,path={run_dir}/agent.sock,server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT}",
        "-qmp", f"unix:{run_dir}/qmp.sock,server=on,wait=off",
    ]
    if raw_port:
        argv += ["-chardev", f"socket,id=raw,path={run_dir}/raw.sock,server=on,wait=off",
                 "-device", f"virtserialport,chardev=raw,name={RAW_PORT}"]
    if network:
        argv += ["-netdev", "user,id=net0", "-device", "virtio-net-device,netdev=net0"]
    return argv


NETWORK_APPEND = "microagent.ip=10.0.2.15/24 microagent.gw=10.0.2.2 microagent.dns=10.0.2.3"


class RunningVM:
    """A VM started in the background; every wait is bounded and :meth:`kill` ends QEMU by
    pid. Sockets live in a short directory under /tmp (a Unix socket path is limited to
    about 107 bytes, pytest's tmp_path can be longer)."""

    def __init__(self, kernel: Path, initrd: Path, disk: Path, append: str, *,
                 raw_port: bool = False, memory_mib: int = 256) -> None:
        import tempfile

        self.run_dir = Path(tempfile.mkdtemp(prefix="ma-vm-", dir="/tmp"))
        self.disk = disk
        self.argv = vm_argv(kernel, initrd, disk, append, self.run_dir, raw_port=raw_port,
                            memory_mib=memory_mib)
        self.qemu_log = self.run_dir / "qemu.log"
        with self.qemu_log.open("wb") as out:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        self.started = time.monotonic()

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"

    def console(self) -> str:
        try:
            text = self.console_log.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            text = ""
        return text.replace("\r\n", "\n")

    def tail(self, n: int = 40) -> str:
        qemu = self.qemu_log.read_text(errors="replace") if self.qemu_log.exists() else ""
        return "\n".join(self.console().splitlines()[-n:]) + \
            (f"\n[qemu output]\n{qemu}" if qemu.strip() else "")

    def wait_for_console(self, text: str, timeout: float = BOOT_TIMEOUT) -> None:
        """Wait until ``text`` is on the console; AssertionError with the tail if not."""
        deadline = time.monotonic() + timeout
        while text not in self.console():
            if self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited ({self.proc.returncode}) before "
                                     f"{text!r}; console tail:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} on the console within {timeout} s; "
                                     f"console tail:\n{self.tail()}")
            time.sleep(0.05)

    def connect(self, name: str = "agent", timeout: float = 10.0) -> socket.socket:
        """A connection to one of the VM's sockets (``agent``, ``console``, ``raw``)."""
        path = self.run_dir / f"{name}.sock"
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                return sock
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise AssertionError(f"cannot connect to {path}; console tail:\n"
                                         f"{self.tail()}") from None
                time.sleep(0.05)

    def qmp(self, command: str, timeout: float = 10.0) -> dict[str, object]:
        """Run one QMP command; return its answer."""
        import json

        with self.connect("qmp", timeout) as sock:
            sock.settimeout(timeout)
            reader = sock.makefile("rb")
            json.loads(reader.readline())  # greeting
            for cmd in ("qmp_capabilities", command):
                sock.sendall(json.dumps({"execute": cmd}).encode() + b"\n")
                while True:
                    answer: dict[str, object] = json.loads(reader.readline())
                    if "return" in answer or "error" in answer:
                        break
            return answer

    def wait_exit(self, timeout: float) -> int | None:
        """QEMU's exit status, or None if it is still running after ``timeout``."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """End QEMU by pid (if still running) and remove the socket directory."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        shutil.rmtree(self.run_dir, ignore_errors=True)


SESSION_TMP: list[Path] = []  # the test session's temporary base (set by conftest.py)


def vm_pids(match: Callable[[list[bytes]], bool]) -> list[int]:
    """Processes of this session whose argv ``match`` says yes to."""
    base = str(SESSION_TMP[0]) if SESSION_TMP else "/"
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                cwd = os.readlink(proc / "cwd")
            except OSError:
                continue
            if b"-name" in argv and match(argv) and cwd.startswith(base):
                pids.append(int(proc.name))
    return pids
