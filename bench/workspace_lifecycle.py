"""Workspace figures of issue 3, each beside a floor measured in the same run.

- start → execReady (``microagent start`` returns when a no-op exec succeeded), against
  the floor: QEMU booting the same kernel with the same devices (the backend's own argv)
  and the same initramfs modules to a trivial static ``/init``. Target: ratio <= 1.5.
- ``microagent exec ws -- true`` wall time from the shell (target < 150 ms), and the
  library's own round trip on an open connection through the supervisor.
- halt → halted: target under 3 s under TCG.
- the supervisor's resident memory: target under 40 MiB.

Run: ``.venv/bin/python bench/workspace_lifecycle.py [--runs N]`` (as root or a user who
can run QEMU; uses the VM tests' cached kernel bundle).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools"), str(REPO / "bench")]

from boot_floor import FLOOR_MARKER, build_floor_init, install_cached_kernel  # noqa: E402
from ocilayout import ImageSpec, Layer, build_layout, busybox_tree, tar_directory  # noqa: E402

from microagent.disks.attachments import DiskSpec  # noqa: E402
from microagent.kernel.initramfs import build_boot_initramfs  # noqa: E402
from microagent.kernel.kernels import default_kernel  # noqa: E402
from microagent.layout import StateLayout  # noqa: E402
from microagent.vm.agent import AgentClient, ExecRequest  # noqa: E402
from microagent.vm.backends.base import (  # noqa: E402
    LaunchSpec,
    choose_accel,
    guest_cmdline,
    host_tsc_khz,
)
from microagent.vm.backends.qemu import qemu_argv  # noqa: E402
from microagent.vm.control import SupervisorClient  # noqa: E402

MICROAGENT = str(Path(sys.executable).parent / "microagent")


def ma(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MICROAGENT, "--state-dir", str(home), *args], capture_output=True,
                          text=True, check=True, timeout=300)


def timed(home: Path, *args: str) -> float:
    start = time.perf_counter()
    ma(home, *args)
    return time.perf_counter() - start


def floor_boot(home: Path, work: Path, name: str) -> float:
    """QEMU with the workspace's devices booting to a trivial /init that prints a marker."""
    layout = StateLayout(home)
    kernel = default_kernel(layout, install_if_missing=False)
    initrd = build_boot_initramfs(kernel, build_floor_init(work), work / "floor.cpio")
    accel = choose_accel().accel
    record = json.loads((home / "workspaces" / name / "workspace.json").read_text())
    run_dir = work / "floor-run"
    run_dir.mkdir(exist_ok=True)
    # the network device's link: a socketpair with nothing behind it (the floor's /init
    # sends nothing; a workspace has passt there)
    link, far_end = socket.socketpair()
    spec = LaunchSpec(
        name="floor", memory_mib=record["resources"]["memory_mib"],
        cpus=record["resources"]["cpus"],
        kernel=kernel.vmlinux or kernel.vmlinuz, initramfs=initrd,
        cmdline=guest_cmdline(hostname="floor", network="user", accel=accel,
                              tsc_khz=host_tsc_khz() if accel == "tcg" else None),
        disks=(DiskSpec(home / "workspaces" / name / "rootfs.ext4"),), run_dir=run_dir,
        accel=accel, net_fd=link.fileno())
    argv = qemu_argv(spec)
    # the same guest devices; only the console's host end is a pipe we can read
    i = argv.index("socket,id=console,path=console.sock,server=on,wait=off")
    argv[i] = "stdio,id=console"
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=run_dir, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            pass_fds=(link.fileno(),))
    link.close()
    seen = b""
    try:
        assert proc.stdout is not None
        while FLOOR_MARKER.encode() not in seen:
            chunk = proc.stdout.read1(65536)
            if not chunk:
                raise RuntimeError("floor VM ended before the marker:\n" + seen.decode()[-2000:])
            seen += chunk
        return time.perf_counter() - start
    finally:
        proc.kill()
        proc.wait()
        far_end.close()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ws-bench-") as tmp:
        work = Path(tmp)
        home = work / "home"
        install_cached_kernel(home)
        tree = busybox_tree(work / "tree")
        build_layout(work / "image", [ImageSpec(layers=[Layer(tar_directory(tree))])])
        ma(home, "create", "bench", "--image", f"oci:{work / 'image'}", "--profile", "tiny")

        floors, starts, halts = [], [], []
        supervisor_rss = []
        exec_walls: list[float] = []
        round_trips: list[float] = []
        for _ in range(args.runs):
            floors.append(floor_boot(home, work, "bench"))
            starts.append(timed(home, "start", "bench"))
            status = json.loads(ma(home, "--json", "status", "bench").stdout)
            exec_walls += [timed(home, "exec", "bench", "--", "true") for _ in range(5)]
            client = AgentClient(SupervisorClient(StateLayout(home).run_files("bench"),
                                                  "bench").open_channel())
            client.hello()
            for _ in range(20):
                t0 = time.perf_counter()
                client.exec(ExecRequest(argv=("true",), env=("PATH=/bin",)),
                            stdout=lambda b: None, stderr=lambda b: None)
                round_trips.append(time.perf_counter() - t0)
            client.close()
            supervisor_rss.append(rss_mib(status["supervisor_pid"]))
            halts.append(timed(home, "halt", "bench"))

        floor, start = min(floors), min(starts)
        ratio = start / floor
        print(f"start to execReady: {start:5.2f} s   floor (same kernel, devices, initramfs "
              f"to a trivial /init): {floor:5.2f} s   ratio {ratio:4.2f} (target <= 1.5) "
              f"{'ok' if ratio <= 1.5 else 'MISSED'}")
        wall = statistics.median(exec_walls) * 1000
        trip = statistics.median(round_trips) * 1000
        print(f"exec -- true: CLI wall {wall:6.1f} ms (median; target < 150 ms "
              f"{'ok' if wall < 150 else 'MISSED'})   library round trip on an open "
              f"connection {trip:5.1f} ms (median)")
        halt = min(halts)
        print(f"halt to halted: {halt:5.2f} s (target < 3 s {'ok' if halt < 3 else 'MISSED'})")
        rss = max(supervisor_rss)
        print(f"supervisor resident memory: {rss:5.1f} MiB (target < 40 MiB "
              f"{'ok' if rss < 40 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
