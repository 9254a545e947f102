"""``microagent doctor``: can this host run workspaces, and what to fix if not.

Each check returns a :class:`Check`: ``ok``, ``warn`` (works, but slower or later: TCG
instead of KVM, a kernel fetched on first use) or ``fail`` (nothing boots until it is
fixed), with a detail and, when not ok, the fix. Checks look and never change anything:
no kernel is downloaded, the state directory is probed with a temporary file only.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from microagent.layout import StateLayout

APT = "sudo apt-get install -y"


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    status: str  # ok, warn, fail
    detail: str
    fix: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail,
                "fix": self.fix}


def _version_of(argv: list[str]) -> str:
    """The first line a tool prints about its version ('' when it cannot run)."""
    try:
        run = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    text = (run.stdout or run.stderr).strip()
    return text.splitlines()[0] if text else ""


def check_qemu() -> Check:
    from microagent.vm.backends.qemu import QEMU_BINARY

    path = shutil.which(QEMU_BINARY)
    if path is None:
        return Check("qemu", "fail", f"{QEMU_BINARY} not found", f"{APT} qemu-system-x86")
    version = _version_of([path, "--version"])
    if not version:
        return Check("qemu", "fail", f"{path} does not run", f"{APT} --reinstall qemu-system-x86")
    return Check("qemu", "ok", f"{version} ({path})")


def check_passt() -> Check:
    """passt: every workspace with a network (the default) starts one."""
    from microagent.vm.passt import PASST_BINARY, PASST_PACKAGE

    path = shutil.which(PASST_BINARY)
    if path is None:
        return Check("passt", "fail", f"{PASST_BINARY} not found: workspaces with a network "
                     "(the default) cannot start; --network none ones can",
                     f"{APT} --no-install-recommends {PASST_PACKAGE}")
    return Check("passt", "ok", f"{path} (the user-mode network)")


def check_accel() -> Check:
    from microagent.vm.backends.base import choose_accel

    accel = choose_accel()
    if accel.accel == "kvm":
        return Check("kvm", "ok", f"KVM: {accel.reason}")
    return Check("kvm", "warn", f"TCG fallback: {accel.reason}",
                 "for speed, run on a host with hardware virtualisation and access to "
                 "/dev/kvm (the kvm group)")


def check_e2fsprogs() -> Check:
    missing = [tool for tool in ("mkfs.ext4", "debugfs", "e2fsck")
               if shutil.which(tool) is None]
    if missing:
        return Check("e2fsprogs", "fail", f"missing: {', '.join(missing)}", f"{APT} e2fsprogs")
    version = _version_of(["mkfs.ext4", "-V"])
    return Check("e2fsprogs", "ok", version or "mkfs.ext4, debugfs, e2fsck present")


def check_agent() -> Check:
    from microagent.errors import HostError
    from microagent.guest import SOURCE_DIR, agent_binary

    compiler = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    try:
        binary = agent_binary()
    except HostError as e:
        if compiler is None:
            return Check("agent", "fail", f"{e.message}; no C compiler to build it",
                         f"{APT} gcc libc6-dev make, then make -C {SOURCE_DIR}")
        return Check("agent", "fail", e.message, f"make -C {SOURCE_DIR} (or ./install.sh)")
    detail = f"{binary}" + (f", built with {compiler}" if compiler else "")
    if compiler is None:
        return Check("agent", "warn", f"{detail}; no C compiler to rebuild it",
                     f"{APT} gcc libc6-dev make")
    return Check("agent", "ok", detail)


def check_kernel(layout: StateLayout) -> Check:
    from microagent.kernel.kernels import kernel_availability

    state, detail = kernel_availability(layout)
    if state == "installed":
        return Check("kernel", "ok", f"default kernel {detail}")
    if state == "obtainable":
        return Check("kernel", "warn", f"not installed yet; obtainable: {detail}",
                     "microagent kernel install (create and start also do it on first use)")
    return Check("kernel", "fail", f"no kernel installed or obtainable: {detail}",
                 "microagent kernel install --from PATH (a bzImage and its modules, an "
                 "unpacked kernel package or a .deb)")


def check_state_dir(layout: StateLayout) -> Check:
    from microagent.errors import MicroagentError
    from microagent.store import check_state_dir as check_private

    root = layout.root
    try:
        check_private(root)
    except MicroagentError as e:
        return Check("state", "fail", e.message, e.hint)
    probe_dir = root
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent  # created on first use: its nearest parent must allow it
    try:
        with tempfile.NamedTemporaryFile(dir=probe_dir, prefix=".doctor-"):
            pass
    except OSError as e:
        return Check("state", "fail", f"{probe_dir} is not writable: {e.strerror}",
                     "fix its permissions, or use --state-dir / MICROAGENT_HOME elsewhere")
    free = shutil.disk_usage(probe_dir).free >> 20
    detail = f"{root} writable, {free} MiB free"
    if free < 1024:
        return Check("state", "warn", detail, "free some space: root disks take up to GiBs")
    return Check("state", "ok", detail)


def check_loopback() -> Check:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    except OSError as e:
        return Check("loopback", "fail", f"cannot bind 127.0.0.1: {e.strerror}",
                     "bring the loopback interface up (ip link set lo up)")
    return Check("loopback", "ok", f"127.0.0.1 can bind a free port (got {port})")


def check_memory() -> Check:
    """Whether guests' RAM can live in the shm tmpfs (what snapshots and suspend need):
    a warning, not a failure, when it cannot (workspaces run on anonymous RAM)."""
    import os

    from microagent.config import DEFAULT_PROFILE, get_profile
    from microagent.vm.memory import room, shm_dir

    directory = shm_dir()
    base = directory.parent
    if not base.is_dir():
        return Check("memory", "warn", f"{base} does not exist: guest RAM is anonymous and "
                                       "workspaces cannot be snapshotted or suspended",
                     "mount a tmpfs on /dev/shm, or set MICROAGENT_SHM_DIR to one")
    if directory.exists() and (directory.is_symlink()
                               or directory.stat().st_uid != os.getuid()):
        return Check("memory", "warn", f"{directory} is not this user's: guest RAM is "
                                       "anonymous and snapshots are refused",
                     f"remove {directory} (another user made it)")
    free = room(directory if directory.is_dir() else base)
    default = get_profile(DEFAULT_PROFILE).memory_mib << 20
    detail = f"guest RAM in {directory} ({free >> 20} MiB free for it)"
    if free < default:
        return Check("memory", "warn", detail + f": too little for a {DEFAULT_PROFILE} "
                                       "workspace, which then runs on anonymous RAM and "
                                       "cannot be snapshotted",
                     f"grow the tmpfs ({base}): sudo mount -o remount,size=50% {base}")
    return Check("memory", "ok", detail + "; snapshots and suspend work")


def run_checks(layout: StateLayout) -> list[Check]:
    """Every check, in the order the report shows them."""
    checks: list[Callable[[], Check]] = [
        check_qemu, check_passt, check_accel, check_e2fsprogs, check_agent,
        lambda: check_kernel(layout), lambda: check_state_dir(layout), check_loopback,
        check_memory,
    ]
    results = []
    for check in checks:
        try:
            results.append(check())
        except Exception as e:  # a broken check is a finding, not a crash
            name = getattr(check, "__name__", "check").removeprefix("check_")
            results.append(Check(name, "fail", f"the check itself failed: {e}"))
    return results


def healthy(checks: list[Check]) -> bool:
    """True when workspaces can run (warnings allowed)."""
    return all(c.status != "fail" for c in checks)
