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
NET_SOCKET = "net.sock"  # the link to passt, through the supervisor's frame filter
GUEST_MAC = "52:54:00:12:34:56"  # QEMU's default for the first NIC, said (netfilter.py)
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
            net_socket=NET_SOCKET if spec.network != "none" else None,
        )


def qemu_argv(spec: LaunchSpec) -> list[str]:
    """The QEMU command line for ``spec``. Pure; golden-tested."""
    # Under TCG, `max` advertises ERMS/FSRM and the guest kernel then copies with an
    # emulated `rep movsb`: masking them made pipe copies 3.9x and exec output 3.2x faster.
    accel = ["-accel", "kvm", "-cpu", "host"] if spec.accel == "kvm" else \
        ["-accel", "tcg,thread=multi", "-cpu", TCG_CPU]
    machine = "microvm,acpi=on,rtc=on,x-option-roms=off"
    memory: list[str] = []
    if spec.memory_file is not None:
        # guest RAM in a shared file: a snapshot saves only the device state and copies
        # the file (docs/architecture.md, "Memory state")
        machine += ",memory-backend=mem"
        memory = ["-object", f"memory-backend-file,id=mem,size={spec.memory_mib}M,"
                             f"mem-path={_escape(str(spec.memory_file))},share=on"]
    argv = [
        QEMU_BINARY,
        "-name", f"microagent-{spec.name}",
        "-M", machine,
        *accel,
        "-m", f"{spec.memory_mib}M",
        *memory,
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
        # the link to passt (microagent.vm.passt) is a socket QEMU listens on and the
        # supervisor's frame filter connects to: QEMU takes a new connection when the old
        # one goes (a supervisor that died and the one that re-attaches, vm/adopt.py);
        # frames the guest sends while nothing is connected are dropped, as on a cable
        netdev = f"stream,id=net0,server=on,addr.type=unix,addr.path={NET_SOCKET}"
        argv += ["-netdev", netdev, "-device", f"virtio-net-device,netdev=net0,mac={GUEST_MAC}"]
    argv += [
        # port 0 is for consoles: the agent channel is port 1, the output port 2
        "-device", "virtio-serial-device,max_ports=3",
        "-chardev", f"socket,id=agent,path={AGENT_SOCKET},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        "-chardev", f"socket,id=agentout,path={OUT_SOCKET},server=on,wait=off",
        "-device", f"virtserialport,chardev=agentout,name={OUT_PORT_NAME}",
        "-qmp", f"unix:{QMP_SOCKET},server=on,wait=off",
    ]
    if spec.incoming:
        argv += ["-incoming", "defer"]
    return argv


def machine_fingerprint(argv: list[str] | tuple[str, ...]) -> dict[str, object]:
    """What of ``argv`` a memory image depends on: the machine, accelerator and CPU, the
    memory and its backend, the vCPUs and the devices in order. Paths, names, the kernel
    command line and ``-incoming`` are left out: they may differ between the boot that
    saved the image and the one that loads it. Pure."""
    options: dict[str, list[str]] = {}
    index = 1
    while index < len(argv):
        flag = argv[index]
        value = argv[index + 1] if index + 1 < len(argv) and \
            not argv[index + 1].startswith("-") else ""
        options.setdefault(flag, []).append(value)
        index += 2 if value else 1
    backend = "anon"
    for value in options.get("-object", []):
        if value.startswith("memory-backend-file"):
            backend = "file,share=on" if "share=on" in value else "file"
    return {
        "machine": options.get("-M", [""])[0],
        "accel": options.get("-accel", [""])[0],
        "cpu": options.get("-cpu", [""])[0],
        "memory": options.get("-m", [""])[0],
        "memory_backend": backend,
        "smp": options.get("-smp", [""])[0],
        "devices": options.get("-device", []),
    }


def _escape(value: str) -> str:
    """QEMU option values escape a comma by doubling it."""
    return value.replace(",", ",,")
