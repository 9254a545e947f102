"""Guest-to-host stdout throughput through exec, against the raw virtio-serial floor.

Two VMs up at once, measured in turns (the host's speed drifts over a run, so the figure
and its floor are taken side by side), both busybox with the real kernel and agent, the
same memory and one vCPU (TCG here):

- **Figure**: ``microagent exec ws -- dd if=/dev/zero bs=64k`` in a real workspace, read
  from the CLI's stdout by this script, first byte to last. The supervisor lends the
  VM's output port to the CLI and the agent lends the port to dd as its stdout
  (docs/protocol.md, "The output port"); the CLI's wall time (its start-up included) is
  shown too.
- **Floor**: a bench VM (``tests/vm/qemu.py``) with a second virtio-serial port ``raw``
  that nothing in the guest uses: the same ``dd`` writes straight to it
  (``of=/dev/vportXpY``, started with exec) and this script reads that port's socket,
  timed from sending OPEN to the last byte. Same producer, same QEMU chardev path.
- Also shown, in the bench VM: exec's STDOUT frames read by
  :class:`microagent.vm.agent.AgentClient` straight from the agent's socket (the framed
  path: what a tty exec, a second exec at once, or an agent without the port uses,
  there through the supervisor's relay); ``dd | dd of=/dev/vportXpY``, a pipe hop
  without the agent; busybox ``head -c``, which writes 4 KiB blocks and is itself the
  bottleneck under TCG.
- **Target**: ratio >= 0.5. Best of ``--runs`` each.

The CPU model matters under TCG: see ``tests/vm/qemu.py`` (``TCG_CPU``): with ERMS/FSRM
the guest kernel copies with ``rep movsb``, which TCG emulates slowly, and every copy in
the pipe hop shows.

Run: ``.venv/bin/python bench/exec_throughput.py [--mib 256] [--runs 3]``. The kernel
bundle is taken from (or installed into) the VM tests' cache.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools"), str(REPO / "bench")]

from boot_floor import (  # noqa: E402
    build_agent,
    build_disk,
    default_state_dir,
    install_cached_kernel,
)
from tests.vm.qemu import RunningVM, accel_args  # noqa: E402

from microagent.kernel.initramfs import build_boot_initramfs  # noqa: E402
from microagent.kernel.kernels import default_kernel  # noqa: E402
from microagent.layout import StateLayout  # noqa: E402
from microagent.vm.agent import AgentClient, ExecRequest  # noqa: E402

PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"


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


@contextlib.contextmanager
def cli_workspace(state_dir: Path, work: Path) -> Iterator[Callable[[int], tuple[float, float]]]:
    """A running workspace (busybox, the same memory and vCPUs as the bench VM); yields a
    function that runs ``microagent exec`` of the same dd in it and returns its MB/s read
    from the CLI's stdout: first byte to last (the stream's rate), and from the CLI's
    start to its exit (with its start-up)."""
    import subprocess

    from ocilayout import ImageSpec, Layer, build_layout, busybox_tree, tar_directory


    microagent = str(Path(sys.executable).parent / "microagent")
    home = work / "home"
    install_cached_kernel(home, state_dir)
    build_layout(work / "cli-image", [ImageSpec(
        layers=[Layer(tar_directory(busybox_tree(work / "cli-tree")))], env=[PATH])])

    def ma(*argv: str, **kwargs: object) -> None:
        subprocess.run([microagent, "--state-dir", str(home), *argv], check=True,
                       timeout=600, **kwargs)  # type: ignore[call-overload]

    def measure(size: int) -> tuple[float, float]:
        start = time.perf_counter()
        with subprocess.Popen([microagent, "--state-dir", str(home), "exec", "bench", "--",
                               "dd", "if=/dev/zero", "bs=65536", f"count={size >> 16}"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as cli:
            assert cli.stdout is not None
            received, first = 0, 0.0
            buffer = bytearray(1 << 20)
            while count := cli.stdout.readinto(buffer):  # type: ignore[attr-defined]
                if not received:
                    first = time.perf_counter()
                received += count
            last = time.perf_counter()
        if cli.returncode != 0 or received != size:
            raise RuntimeError(f"microagent exec: exit {cli.returncode}, "
                               f"{received} of {size} bytes")
        return size / (last - first) / 1e6, size / (time.perf_counter() - start) / 1e6

    ma("create", "bench", "--image", f"oci:{work / 'cli-image'}", "--memory", "512",
       "--cpus", "1", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ma("start", "bench", stderr=subprocess.DEVNULL)
    try:
        yield measure
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
    with tempfile.TemporaryDirectory(prefix="exec-throughput-") as tmp, \
            cli_workspace(args.state_dir.absolute(), Path(tmp)) as cli:
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
                name: [] for name in ("exec dd", "raw dd", "pipe dd", "cli", "cli wall",
                                      "exec head", "raw head")}
            # interleaved, both VMs up throughout: the host's speed drifts over a run
            for _ in range(args.runs):
                results["raw dd"].append(raw_rate(client, raw, port, size,
                                                  dd + " > /dev/{port}"))
                streamed, wall = cli(size)
                results["cli"].append(streamed)
                results["cli wall"].append(wall)
                results["exec dd"].append(exec_rate(client, size, dd))
                results["pipe dd"].append(raw_rate(client, raw, port, size,
                                                   dd + " | dd bs=65536 of=/dev/{port} "
                                                   "2>/dev/null"))
            # head is producer-bound and slow: one run of a quarter of the size is enough
            results["exec head"].append(exec_rate(client, size // 4, head))
            results["raw head"].append(raw_rate(client, raw, port, size // 4,
                                                head + " > /dev/{port}"))
            raw.close()
            client.close()
        finally:
            vm.kill()
    best = {name: max(rates) for name, rates in results.items()}
    print(f"guest -> host stdout, {args.mib} MiB, best of {args.runs}; QEMU "
          f"{' '.join(accel_args())}")
    print(f"  microagent exec ws -- dd bs=64k (CLI)       {best['cli']:7.1f} MB/s   "
          f"(its stdout, first byte to last)")
    print(f"  floor: dd bs=64k > raw virtio-serial port   {best['raw dd']:7.1f} MB/s")
    print(f"  ratio exec / floor                          {best['cli'] / best['raw dd']:7.2f}"
          f"   (target >= 0.5)")
    print(f"  (the CLI from its start to its exit: {best['cli wall']:.1f} MB/s, ratio "
          f"{best['cli wall'] / best['raw dd']:.2f}; STDOUT frames read by AgentClient on "
          f"the agent's socket: {best['exec dd']:.1f} MB/s, ratio "
          f"{best['exec dd'] / best['raw dd']:.2f})")
    print(f"  (the same through a pipe hop and a second dd to the raw port, the agent's "
          f"structure without the protocol: {best['pipe dd']:.1f} MB/s)")
    print(f"  (producer-bound, {args.mib // 4} MiB once: busybox head -c through exec "
          f"{best['exec head']:.1f} MB/s, to the raw port {best['raw head']:.1f} MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
