"""Guest-to-host stdout throughput through exec, against the raw virtio-serial floor.

One VM (busybox root disk, the real kernel and agent, TCG here) with two virtio-serial
ports: ``microagent`` (the agent channel) and ``raw`` (nothing in the guest uses it).

- **Figure**: ``dd if=/dev/zero bs=64k`` run with exec; the host reads STDOUT frames
  with :class:`microagent.agent.AgentClient` straight from the agent's socket, returning
  credit as it goes. Timed from sending OPEN to EXIT.
- **Floor**: the same ``dd``, started with exec too, but writing straight to the raw port
  (``of=/dev/vportXpY``); the host reads that port's socket. Timed from sending OPEN to
  the last byte. Same VM, same producer, same QEMU chardev path: the difference is the
  agent (a pipe hop, framing, credit).
- Also shown: ``dd | dd of=/dev/vportXpY``, the agent's structure (a pipe hop, 64 KiB
  reads, writes to the port) without the protocol; and, both ways, busybox
  ``head -c N /dev/zero``, which writes 4 KiB blocks and is itself the bottleneck under
  TCG (a per-syscall cost), so it says little about the agent.
- Also shown: exec with a 4 MiB host window instead of the default 256 KiB, where the
  credit round trips stop mattering (the guest agent is then limited by its own work).
- **Target**: ratio >= 0.5. Best of ``--runs`` each, interleaved.

The agent splices the process's pipe to the port in batches (no copy in the guest, one
wake-up of the process per batch; ``src/microagent/guest/channel.c``), so what is left
is mostly the pipe itself (the producer's copy into it, its wake-ups) and the credit
round trips with the host.

The CPU model matters under TCG: see ``tests/vm/qemu.py`` (``TCG_CPU``): with ERMS/FSRM
the guest kernel copies with ``rep movsb``, which TCG emulates slowly, and every copy in
the pipe hop shows.

Run: ``.venv/bin/python bench/exec_throughput.py [--mib 256] [--runs 3]``. The kernel
bundle is taken from (or installed into) the VM tests' cache.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools"), str(REPO / "bench")]

from boot_floor import build_agent, build_disk  # noqa: E402
from tests.vm.qemu import RunningVM, accel_args  # noqa: E402

from microagent.agent import AgentClient, ExecRequest  # noqa: E402
from microagent.initramfs import build_boot_initramfs  # noqa: E402
from microagent.kernels import default_kernel  # noqa: E402
from microagent.layout import StateLayout  # noqa: E402
from microagent.protocol import DEFAULT_WINDOW  # noqa: E402

PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"
BIG_WINDOW = 4 << 20


def default_state_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "microagent-tests" / "kernel-state-v1"


def run(client: AgentClient, command: str) -> str:
    out = bytearray()
    result = client.exec(ExecRequest(argv=("sh", "-c", command), env=(PATH,)),
                         stdout=out.extend, stderr=out.extend)
    if result.exit_code != 0:
        raise RuntimeError(f"{command!r} failed: {result} {out.decode(errors='replace')}")
    return out.decode()


def exec_rate(client: AgentClient, size: int, command: str) -> float:
    """MB/s of ``command`` (writing ``size`` bytes) through exec's STDOUT."""
    received = 0

    def sink(data: bytes) -> None:
        nonlocal received
        received += len(data)

    start = time.perf_counter()
    result = client.exec(ExecRequest(argv=("sh", "-c", command.format(size=size,
                                                                      blocks=size >> 16)),
                                     env=(PATH,)),
                         stdout=sink, stderr=sink)
    elapsed = time.perf_counter() - start
    if result.exit_code != 0 or received != size:
        raise RuntimeError(f"exec: {result}, {received} of {size} bytes")
    return size / elapsed / 1e6


def raw_rate(client: AgentClient, raw: socket.socket, port: str, size: int,
             command: str) -> float:
    """MB/s of ``command`` writing ``size`` bytes to the raw port, read from its socket."""
    done = threading.Event()
    received = 0
    finished = 0.0

    def reader() -> None:
        nonlocal received, finished
        raw.settimeout(120)
        while received < size:
            data = raw.recv(1 << 20)
            if not data:
                break
            received += len(data)
        finished = time.perf_counter()
        done.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    start = time.perf_counter()
    run(client, command.format(size=size, blocks=size >> 16, port=port))
    if not done.wait(120) or received != size:
        raise RuntimeError(f"raw port: {received} of {size} bytes")
    return size / (finished - start) / 1e6


def cli_rates(state_dir: Path, work: Path, size: int, runs: int) -> list[float]:
    """MB/s of ``microagent exec`` of the same dd in a real workspace (supervisor relay,
    CLI writing to /dev/null), the same memory and vCPUs as the bench VM."""
    import shutil
    import subprocess

    from ocilayout import ImageSpec, Layer, build_layout, busybox_tree, tar_directory

    from microagent.store import write_json_atomic

    microagent = str(Path(sys.executable).parent / "microagent")
    home = work / "home"
    kernel = default_kernel(StateLayout(state_dir))
    shutil.copytree(kernel.path, home / "kernels" / kernel.version)
    write_json_atomic(home / "kernels" / "default.json", {"version": kernel.version})
    build_layout(work / "cli-image", [ImageSpec(
        layers=[Layer(tar_directory(busybox_tree(work / "cli-tree")))], env=[PATH])])

    def ma(*argv: str, **kwargs: object) -> None:
        subprocess.run([microagent, "--state-dir", str(home), *argv], check=True,
                       timeout=600, **kwargs)  # type: ignore[call-overload]

    ma("create", "bench", "--image", f"oci:{work / 'cli-image'}", "--memory", "512",
       "--cpus", "1", stdout=subprocess.DEVNULL)
    ma("start", "bench", stderr=subprocess.DEVNULL)
    try:
        rates = []
        for _ in range(runs):
            start = time.perf_counter()
            ma("exec", "bench", "--", "dd", "if=/dev/zero", "bs=65536", f"count={size >> 16}",
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rates.append(size / (time.perf_counter() - start) / 1e6)
        return rates
    finally:
        ma("kill", "bench")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--state-dir", type=Path, default=default_state_dir())
    parser.add_argument("--cpu", help="the -cpu model under TCG (default: tests/vm/qemu.py's "
                        "TCG_CPU; `max` is what ERMS-copying guests get)")
    args = parser.parse_args()
    if args.cpu:
        import tests.vm.qemu

        tests.vm.qemu.TCG_CPU = args.cpu
    size = args.mib << 20

    bundle = default_kernel(StateLayout(args.state_dir.absolute()))
    with tempfile.TemporaryDirectory(prefix="exec-throughput-") as tmp:
        work = Path(tmp)
        initrd = build_boot_initramfs(bundle, build_agent(), work / "boot.cpio")
        disk = build_disk(work)
        vm = RunningVM(bundle.vmlinuz, initrd, disk, "console=ttyS0 panic=-1 quiet",
                       raw_port=True, memory_mib=512)
        try:
            vm.wait_for_console("microagent-init: ready", 120)
            client = AgentClient(vm.connect("agent"))
            client.hello(timeout=30)
            port = run(client, "for d in /sys/class/virtio-ports/*; do "
                       "[ \"$(cat $d/name)\" = raw ] && echo ${d##*/}; done").strip()
            raw = vm.connect("raw")
            dd = "dd if=/dev/zero bs=65536 count={blocks} 2>/dev/null"
            head = "head -c {size} /dev/zero"
            results: dict[str, list[float]] = {
                name: [] for name in ("exec dd", "raw dd", "pipe dd", "exec head", "raw head")}
            for _ in range(args.runs):
                results["exec dd"].append(exec_rate(client, size, dd))
                results["raw dd"].append(raw_rate(client, raw, port, size,
                                                  dd + " > /dev/{port}"))
                results["pipe dd"].append(raw_rate(client, raw, port, size,
                                                   dd + " | dd bs=65536 of=/dev/{port} "
                                                   "2>/dev/null"))
            # head is producer-bound and slow: one run of a quarter of the size is enough
            results["exec head"].append(exec_rate(client, size // 4, head))
            results["raw head"].append(raw_rate(client, raw, port, size // 4,
                                                head + " > /dev/{port}"))
            client.close()
            # a new connection (HELLO) with a bigger window
            client = AgentClient(vm.connect("agent"), window=BIG_WINDOW)
            client.hello(timeout=30)
            results["exec dd big window"] = [exec_rate(client, size, dd)
                                             for _ in range(args.runs)]
            raw.close()
            client.close()
        finally:
            vm.kill()
        results["cli"] = cli_rates(args.state_dir.absolute(), work, size, args.runs)
    best = {name: max(rates) for name, rates in results.items()}
    print(f"guest -> host stdout, {args.mib} MiB, best of {args.runs}; QEMU "
          f"{' '.join(accel_args())}")
    print(f"  exec:  dd bs=64k, read by AgentClient       {best['exec dd']:7.1f} MB/s")
    print(f"  floor: dd bs=64k > raw virtio-serial port   {best['raw dd']:7.1f} MB/s")
    print(f"  ratio exec / floor                          {best['exec dd'] / best['raw dd']:7.2f}"
          f"   (target >= 0.5)")
    print(f"  exec through the CLI and supervisor       {best['cli']:7.1f} MB/s   ratio "
          f"{best['cli'] / best['raw dd']:4.2f} to the same floor (`microagent exec ws -- dd "
          f"... > /dev/null`, wall time including the CLI's start)")
    print(f"  (the same through a pipe hop and a second dd to the raw port, the agent's "
          f"structure without the protocol: {best['pipe dd']:.1f} MB/s)")
    print(f"  (exec with a {BIG_WINDOW >> 20} MiB host window instead of "
          f"{DEFAULT_WINDOW >> 10} KiB: {best['exec dd big window']:.1f} MB/s, ratio "
          f"{best['exec dd big window'] / best['raw dd']:.2f})")
    print(f"  (producer-bound, {args.mib // 4} MiB once: busybox head -c through exec "
          f"{best['exec head']:.1f} MB/s, to the raw port {best['raw head']:.1f} MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
