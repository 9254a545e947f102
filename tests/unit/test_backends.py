"""The QEMU launch plan and passt's command line (golden), and the accelerator rule."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest

from microagent.disks.attachments import DiskSpec
from microagent.vm.backends.base import LaunchSpec, choose_accel
from microagent.vm.backends.qemu import QemuBackend

SPEC = LaunchSpec(
    name="research", memory_mib=2048, cpus=2, kernel=Path("/k/vmlinuz"),
    initramfs=Path("/run/boot.cpio"), cmdline="console=ttyS0 quiet",
    disks=(DiskSpec(Path("/ws/rootfs.ext4")),
           DiskSpec(Path("/v/a,b.ext4"), True, "data", "ma-disk1")),
    run_dir=Path("/ws/run"), network="user", accel="tcg",
)

GOLDEN = [
    "qemu-system-x86_64", "-name", "microagent-research",
    "-M", "microvm,acpi=on,rtc=on,x-option-roms=off",
    "-accel", "tcg,thread=multi", "-cpu", "max,-erms,-fsrm", "-m", "2048M", "-smp", "2",
    "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
    "-kernel", "/k/vmlinuz", "-initrd", "/run/boot.cpio", "-append", "console=ttyS0 quiet",
    "-chardev", "socket,id=console,path=console.sock,server=on,wait=off",
    "-serial", "chardev:console",
    "-drive", "id=disk0,file=/ws/rootfs.ext4,format=raw,if=none,cache=writeback,discard=unmap",
    "-device", "virtio-blk-device,drive=disk0",
    "-drive", "id=disk1,file=/v/a,,b.ext4,format=raw,if=none,cache=writeback,discard=unmap,"
              "readonly=on",
    "-device", "virtio-blk-device,drive=disk1,serial=ma-disk1",
    "-netdev", "stream,id=net0,server=on,addr.type=unix,addr.path=net.sock",
    "-device", "virtio-net-device,netdev=net0,mac=52:54:00:12:34:56",
    "-device", "virtio-serial-device,max_ports=3",
    "-chardev", "socket,id=agent,path=agent.sock,server=on,wait=off",
    "-device", "virtserialport,chardev=agent,name=microagent",
    "-chardev", "socket,id=agentout,path=agent-out.sock,server=on,wait=off",
    "-device", "virtserialport,chardev=agentout,name=microagent-out",
    "-qmp", "unix:qmp.sock,server=on,wait=off",
]


def test_qemu_plan_is_golden() -> None:
    plan = QemuBackend().plan(SPEC)
    assert list(plan.argv) == GOLDEN
    assert plan.cwd == Path("/ws/run")
    assert (plan.console_socket, plan.agent_socket, plan.out_socket,
            plan.monitor_socket) == ("console.sock", "agent.sock", "agent-out.sock", "qmp.sock")


PASST_GOLDEN = [
    "passt", "--foreground", "--quiet", "--fd", "5",
    "--address", "10.0.2.15", "--netmask", "24", "--gateway", "10.0.2.2",
    "--dns-forward", "10.0.2.3",
]


def test_passt_argv_is_golden() -> None:
    from microagent.vm.backends.base import PortSpec, guest_cmdline
    from microagent.vm.passt import PasstSpec, passt_argv

    assert passt_argv(PasstSpec(5)) == [*PASST_GOLDEN, "--no-map-gw", "--udp-ports", "none"]
    ports = (PortSpec("127.0.0.1", 8080, 80), PortSpec("0.0.0.0", 2222, 22))
    assert passt_argv(PasstSpec(5, host_loopback=True, ports=ports)) == [
        *PASST_GOLDEN, "--tcp-ports", "127.0.0.1/8080:80", "--tcp-ports", "0.0.0.0/2222:22",
        "--udp-ports", "none"]
    # the guest is told the addressing passt was given
    cmdline = guest_cmdline(hostname="h", network="user", accel="kvm", tsc_khz=None)
    assert "microagent.ip=10.0.2.15/24 microagent.gw=10.0.2.2 microagent.dns=10.0.2.3" \
        in cmdline
    assert "microagent.ip" not in guest_cmdline(hostname="h", network="none", accel="kvm",
                                                tsc_khz=None)


def test_the_network_link_is_a_socket_in_the_run_directory() -> None:
    from dataclasses import replace

    assert QemuBackend().plan(SPEC).net_socket == "net.sock"
    assert QemuBackend().plan(replace(SPEC, network="none")).net_socket is None


def test_kvm_and_no_network_variants() -> None:
    from dataclasses import replace

    argv = QemuBackend().plan(replace(SPEC, accel="kvm", network="none")).argv
    assert argv[argv.index("-accel") + 1] == "kvm"
    assert argv[argv.index("-cpu") + 1] == "host"
    assert "-netdev" not in argv


def test_accel_rule(tmp_path: Path) -> None:
    kvm = tmp_path / "kvm"
    kvm.write_text("")
    with_vmx = tmp_path / "cpuinfo-vmx"
    with_vmx.write_text("processor: 0\nflags\t\t: fpu vme vmx sse\n")
    without = tmp_path / "cpuinfo"
    without.write_text("processor: 0\nflags\t\t: fpu vme sse hypervisor\n")
    assert choose_accel({}, kvm_device=kvm, cpuinfo=with_vmx).accel == "kvm"
    choice = choose_accel({}, kvm_device=kvm, cpuinfo=without)
    assert choice.accel == "tcg" and "vmx/svm" in choice.reason
    missing = choose_accel({}, kvm_device=tmp_path / "nope", cpuinfo=with_vmx)
    assert missing.accel == "tcg" and "not accessible" in missing.reason
    assert choose_accel({"MICROAGENT_ACCEL": "kvm"}, kvm_device=tmp_path / "nope",
                        cpuinfo=without).accel == "kvm"
    assert choose_accel({"MICROAGENT_ACCEL": "tcg"}, kvm_device=kvm,
                        cpuinfo=with_vmx).accel == "tcg"


def test_this_host_uses_tcg() -> None:
    # this machine's /dev/kvm is nested paravirtual without vmx/svm: DESIGN.md
    cpuinfo = Path("/proc/cpuinfo").read_text()
    if " vmx" in cpuinfo or " svm" in cpuinfo:
        return
    assert choose_accel({}).accel == "tcg"


def test_the_tsc_frequency_is_measured_once_per_host_boot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from microagent.vm.backends import base

    if platform.machine() != "x86_64":
        pytest.skip("the TSC is x86-64's")
    measured: list[int] = []

    def measure() -> int:
        measured.append(1)
        return 2_600_000

    monkeypatch.setattr(base, "_measure_tsc_khz", measure)
    cache = tmp_path / "host-tsc.json"
    assert base.host_tsc_khz(cache) == 2_600_000
    assert base.host_tsc_khz(cache) == 2_600_000
    assert len(measured) == 1  # the second came from the cache
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert json.loads(cache.read_text())["boot_id"] == boot_id
    # another boot of the host (or a damaged record): measured again
    cache.write_text(json.dumps({"boot_id": "another", "tsc_khz": 1}))
    assert base.host_tsc_khz(cache) == 2_600_000
    cache.write_text("{")
    assert base.host_tsc_khz(cache) == 2_600_000
    assert len(measured) == 3
