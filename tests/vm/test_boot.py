"""The boot path: kernel bundle + initramfs + agent as PID 1, up to an orderly power-off."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from microagent.kernel.kernels import KernelBundle
from tests.vm.qemu import Boot, boot

pytestmark = pytest.mark.slow

BASE_APPEND = "console=ttyS0 panic=-1 microagent.test=poweroff"


def run_vm(kernel: KernelBundle, initramfs: Path, disk: Path, tmp_path: Path,
           extra: str = "") -> Boot:
    result = boot(kernel.vmlinuz, initramfs, disk, f"{BASE_APPEND} {extra}".strip(),
                  log=tmp_path / "console.log")
    assert result.returncode is not None, (
        f"the VM did not power off within the timeout; console tail:\n{result.tail()}")
    assert result.returncode == 0, (
        f"QEMU exited with {result.returncode}; console tail:\n{result.tail()}")
    return result


def assert_in_order(lines: list[str], expected: list[str], result: Boot) -> None:
    position = 0
    for wanted in expected:
        for index in range(position, len(lines)):
            if re.fullmatch(wanted, lines[index]):
                position = index + 1
                break
        else:
            raise AssertionError(f"console lacks {wanted!r} (after line {position}); "
                                 f"agent lines: {lines}\nconsole tail:\n{result.tail()}")


def test_boots_to_ready_and_powers_off_cleanly(
    guest_kernel: KernelBundle, boot_initramfs: Path, root_disk: Path, tmp_path: Path
) -> None:
    result = run_vm(guest_kernel, boot_initramfs, root_disk, tmp_path,
                    "microagent.hostname=ws-boot")
    lines = result.lines()
    # the vsock modules are skipped: this VM has no virtio vsock device
    wanted = [name for name in guest_kernel.modules if "vsock" not in name]
    assert len(wanted) < len(guest_kernel.modules)
    assert_in_order(lines, [
        rf"microagent-init: modules loaded \({len(wanted)}\)",
        r"microagent-init: root mounted \(/dev/vda\)",
        r"microagent-init: hostname ws-boot",
        r"microagent-init: ready",
        r"microagent-init: powering off \(microagent\.test=poweroff\)",
        r"microagent-init: power off",
    ], result)
    milestones = (
        "microagent-init: modules loaded", "microagent-init: root mounted",
        "microagent-init: hostname", "microagent-init: ready", "microagent-init: powering off",
        "microagent-init: power off", "microagent-init: network: loopback only",
        "microagent-init: console shell on ttyS0", "microagent-init: no agent channel yet",
        "microagent-init: power button: no ACPI button driver",
    )
    mount_line = re.compile(r"microagent-init: mount (\S+) (\S+) (\S+)")
    unexpected = [line for line in lines
                  if not line.startswith(milestones) and not mount_line.fullmatch(line)]
    assert not unexpected, f"the agent reported errors: {unexpected}\n{result.tail()}"
    mounts = {m[1]: (m[2], m[3].split(",")) for m in map(mount_line.fullmatch, lines) if m}
    for point, fstype in [("/", "ext4"), ("/proc", "proc"), ("/sys", "sysfs"),
                          ("/dev", "devtmpfs"), ("/dev/pts", "devpts"), ("/dev/shm", "tmpfs"),
                          ("/run", "tmpfs")]:
        assert point in mounts and mounts[point][0] == fstype, f"{point}: {mounts}"
    assert "rw" in mounts["/"][1], mounts["/"]
    assert "/tmp" not in mounts, "the image's /tmp must not be shadowed"
    assert "/newroot" not in mounts
    assert "Kernel panic" not in result.console
    fsck = subprocess.run(["e2fsck", "-fn", str(root_disk)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert fsck.returncode == 0, f"the root disk is not clean:\n{fsck.stdout}{fsck.stderr}"
    state = subprocess.run(["dumpe2fs", "-h", str(root_disk)], capture_output=True,
                           text=True, timeout=60, check=False).stdout
    assert re.search(r"Filesystem state:\s+clean\n", state), state


def test_missing_root_device_is_reported_and_powers_off(
    guest_kernel: KernelBundle, boot_initramfs: Path, root_disk: Path, tmp_path: Path
) -> None:
    result = run_vm(guest_kernel, boot_initramfs, root_disk, tmp_path,
                    "microagent.root=/dev/vdz microagent.rootwait=1")
    lines = result.lines()
    assert_in_order(lines, [
        r"microagent-init: modules loaded \(\d+\)",
        r"microagent-init: fatal: root device /dev/vdz did not appear within 1 s: "
        r"No such file or directory",
        r"microagent-init: powering off \(fatal error\)",
        r"microagent-init: power off",
    ], result)
    assert "microagent-init: ready" not in lines


def test_root_mount_options_reach_the_kernel(
    guest_kernel: KernelBundle, boot_initramfs: Path, root_disk: Path, tmp_path: Path
) -> None:
    result = run_vm(guest_kernel, boot_initramfs, root_disk, tmp_path,
                    "microagent.rootflags=noatime,data=journal")
    assert "microagent-init: ready" in result.lines(), result.tail()
    assert re.search(r"EXT4-fs \(vda\): mounted filesystem with journalled data mode",
                     result.console), result.tail()


def test_bad_root_mount_option_is_reported_with_strerror(
    guest_kernel: KernelBundle, boot_initramfs: Path, root_disk: Path, tmp_path: Path
) -> None:
    result = run_vm(guest_kernel, boot_initramfs, root_disk, tmp_path,
                    "microagent.rootflags=no_such_option")
    assert_in_order(result.lines(), [
        r"microagent-init: fatal: mount /dev/vda on /newroot: Invalid argument",
        r"microagent-init: power off",
    ], result)
