"""Today's network for the network benches: a workspace's disk booted with QEMU's own
user-mode network (slirp), which workspaces no longer use (issue 12: it connects the
guest's 10.0.2.2 to the host's loopback).

Not a bench: :class:`SlirpVM` boots a copy of a created (never started) workspace's root
disk with the backend's own argv (``backends/qemu.py``: same machine, CPUs, memory,
kernel, agent and guest addressing) where only ``-netdev`` differs: ``user`` with
``hostfwd`` rules instead of the stream to passt. Commands run through the agent's socket
(:class:`microagent.vm.agent.AgentClient`), with no supervisor.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from microagent.disks.attachments import BootDisks
from microagent.guest import agent_binary
from microagent.kernel.initramfs import build_boot_initramfs
from microagent.kernel.kernels import default_kernel
from microagent.layout import RunFiles, StateLayout
from microagent.state.records import get_workspace
from microagent.vm.agent import AgentClient, ExecRequest
from microagent.vm.backends.base import choose_accel, host_tsc_khz
from microagent.vm.backends.qemu import qemu_argv
from microagent.vm.launch import launch_spec

PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"


class SlirpVM:
    """Workspace ``name``'s disk (copied) under QEMU with ``-netdev user``; ``forwards``
    are (host port, guest port) pairs on 127.0.0.1. Ended by :meth:`close`."""

    def __init__(self, home: Path, name: str, work: Path,
                 forwards: tuple[tuple[int, int], ...] = ()) -> None:
        layout = StateLayout(home)
        workspace = get_workspace(layout, name)
        self.dir = work / "slirp-run"
        self.dir.mkdir(parents=True, exist_ok=True)
        files = RunFiles(self.dir)
        disk = self.dir / "rootfs.ext4"
        shutil.copyfile(workspace.rootfs, disk)
        kernel = default_kernel(layout, install_if_missing=False)
        build_boot_initramfs(kernel, agent_binary(), files.initramfs)
        accel = choose_accel()
        tsc = host_tsc_khz(layout.tsc_record) if accel.accel == "tcg" else None
        spec = launch_spec(workspace, files, kernel, accel, tsc, BootDisks((), ()), net_fd=0)
        argv = qemu_argv(spec)
        netdev = "user,id=net0" + "".join(f",hostfwd=tcp:127.0.0.1:{host}-:{guest}"
                                          for host, guest in forwards)
        argv[argv.index("-netdev") + 1] = netdev
        argv[argv.index("-drive") + 1] = argv[argv.index("-drive") + 1].replace(
            str(workspace.rootfs), str(disk))
        self.process = subprocess.Popen(argv, cwd=self.dir, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = AgentClient(self._connect("agent.sock"))
        self.client.hello(timeout=120)

    def _connect(self, name: str, timeout: float = 60) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.dir / name))
                return sock
            except OSError:
                sock.close()
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.05)

    def run(self, command: str) -> str:
        """``sh -c command`` in the guest; its output (RuntimeError if it fails)."""
        out = bytearray()
        result = self.client.exec(ExecRequest(argv=("sh", "-c", command), env=(PATH,)),
                                  stdout=out.extend, stderr=out.extend)
        if result.exit_code != 0:
            raise RuntimeError(f"{command!r} in the slirp VM: {result} {out.decode()}")
        return out.decode()

    def close(self) -> None:
        """End QEMU by its pid."""
        self.client.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)
