"""The QEMU backend: ``qemu-system-x86_64 -M microvm,acpi=on`` with virtio-mmio devices.

Debian's kernel has ``CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`` off, so the virtio-mmio
devices must be described through ACPI: that is what ``acpi=on`` is for.
"""

from __future__ import annotations

import shutil

from microagent.vm.backends.base import LaunchPlan, LaunchSpec

QEMU_BINARY = "qemu-system-x86_64"
CONSOLE_SOCKET = "console.sock"
AGENT_SOCKET = "agent.sock"
OUT_SOCKET = "agent-out.sock"
QMP_SOCKET = "qmp.sock"
AGENT_PORT_NAME = "microagent"
OUT_PORT_NAME = "microagent-out"  # one exec's stdout, raw (docs/protocol.md)
TCG_CPU = "max,-erms,-fsrm"


class QemuBackend:
    """Plans and checks for QEMU microvm."""

    name = "qemu"

    def check_host(self) -> list[str]:
        """A missing QEMU binary is the only hard problem here (passt, the network's
        helper, is checked by :func:`microagent.vm.passt.passt_problems`)."""
        if shutil.which(QEMU_BINARY) is None:
            return [f"{QEMU_BINARY} not found: install the qemu-system-x86 package"]
        return []

    def plan(self, spec: LaunchSpec) -> LaunchPlan:
        """The argv for ``spec``; see :func:`qemu_argv`."""
        return LaunchPlan(
            argv=tuple(qemu_argv(spec)),
            cwd=spec.run_dir,
            console_socket=CONSOLE_SOCKET,
            agent_socket=AGENT_SOCKET,
            out_socket=OUT_SOCKET,
            monitor_socket=QMP_SOCKET,
        )


def qemu_argv(spec: LaunchSpec) -> list[str]:
    """The QEMU command line for ``spec``. Pure; golden-tested."""
    # Under TCG, `max` advertises ERMS/FSRM and the guest kernel then copies with an
    # emulated `rep movsb`: masking them made pipe copies 3.9x and exec output 3.2x faster.
    accel = ["-accel", "kvm", "-cpu", "host"] if spec.accel == "kvm" else \
        ["-accel", "tcg,thread=multi", "-cpu", TCG_CPU]
    argv = [
        QEMU_BINARY,
        "-name", f"microagent-{spec.name}",
        "-M", "microvm,acpi=on,rtc=on,x-option-roms=off",
        *accel,
        "-m", f"{spec.memory_mib}M",
        "-smp", str(spec.cpus),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initramfs),
        "-append", spec.cmdline,
        # the serial console: a socket the supervisor reads into serial.log
        "-chardev", f"socket,id=console,path={CONSOLE_SOCKET},server=on,wait=off",
        "-serial", "chardev:console",
    ]
    for index, disk in enumerate(spec.disks):
        drive = f"id=disk{index},file={_escape(str(disk.path))},format=raw,if=none," \
                f"cache=writeback,discard=unmap"
        if disk.read_only:
            drive += ",readonly=on"
        device = f"virtio-blk-device,drive=disk{index}"
        if disk.serial:  # how the guest finds an attached disk: probe order is not fixed
            device += f",serial={_escape(disk.serial)}"
        argv += ["-drive", drive, "-device", device]
    if spec.network != "none":
        if spec.net_fd is None:
            raise ValueError("a user-mode network needs the link's descriptor (net_fd)")
        # the link to passt (microagent.vm.passt) is a socket QEMU inherits, already
        # connected: nothing in the run directory, no moment where QEMU waits for passt
        netdev = f"stream,id=net0,server=off,addr.type=fd,addr.str={spec.net_fd}"
        argv += ["-netdev", netdev, "-device", "virtio-net-device,netdev=net0"]
    argv += [
        # port 0 is for consoles: the agent channel is port 1, the output port 2
        "-device", "virtio-serial-device,max_ports=3",
        "-chardev", f"socket,id=agent,path={AGENT_SOCKET},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        "-chardev", f"socket,id=agentout,path={OUT_SOCKET},server=on,wait=off",
        "-device", f"virtserialport,chardev=agentout,name={OUT_PORT_NAME}",
        "-qmp", f"unix:{QMP_SOCKET},server=on,wait=off",
    ]
    return argv


def _escape(value: str) -> str:
    """QEMU option values escape a comma by doubling it."""
    return value.replace(",", ",,")
