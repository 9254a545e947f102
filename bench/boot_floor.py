"""Boot time: the floor (the kernel reaching a trivial /init) and the agent reaching ready.

Both boot the same kernel with the same devices (microvm, one virtio-blk root disk of the
busybox image) and the same initramfs but for /init: the floor's /init is a static C
program that prints a marker and powers off, built here; the real one is microagent-init
(module loading, root mount, switch root, stage 2) with ``microagent.test=poweroff``.
Wall time from starting QEMU to the line on the console, best of 3, for the bzImage
(``vmlinuz``) and for the extracted ELF (``vmlinux``, booted through its PVH entry:
no in-guest decompression, which is slow under TCG).

Run: ``.venv/bin/python bench/boot_floor.py [--runs N] [--state-dir DIR]``. The kernel
bundle is taken from (or installed into) the VM tests' cache by default.
"""

from __future__ import annotations

import argparse
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

from tests.vm.qemu import qemu_argv  # noqa: E402

from microagent.kernel.initramfs import build_boot_initramfs  # noqa: E402
from microagent.kernel.kernels import KernelBundle, default_kernel  # noqa: E402
from microagent.layout import StateLayout  # noqa: E402

FLOOR_MARKER = "microagent-floor: init"
READY_MARKER = "microagent-init: ready"
TIMEOUT = 90.0
FLOOR_INIT_C = r"""
#include <sys/reboot.h>
#include <unistd.h>
int main(void)
{
    static const char marker[] = "\nMARKER\n";
    write(1, marker, sizeof(marker) - 1);
    reboot(RB_POWER_OFF);
    for (;;)
        pause();
}
""".replace("MARKER", FLOOR_MARKER)


def default_state_dir() -> Path:
    """The VM tests' kernel cache, so the bench and the tests share one download."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "microagent-tests" / "kernel-state-v4"


def install_cached_kernel(home: Path, cache: Path | None = None) -> KernelBundle:
    """Make the cached kernel bundle (``cache``, default :func:`default_state_dir`) the
    default kernel of the fresh state directory ``home``: the benches' workspaces boot
    the same bundle as the VM tests, with nothing downloaded or assembled."""
    from microagent.store import write_json_atomic

    kernel = default_kernel(StateLayout(cache or default_state_dir()))
    shutil.copytree(kernel.path, home / "kernels" / kernel.version)
    write_json_atomic(home / "kernels" / "default.json", {"version": kernel.version})
    return kernel


def build_floor_init(work: Path) -> Path:
    source = work / "floor-init.c"
    source.write_text(FLOOR_INIT_C)
    binary = work / "floor-init"
    subprocess.run(["gcc", "-O2", "-static", "-o", str(binary), str(source)], check=True,
                   timeout=120)
    return binary


def build_agent() -> Path:
    subprocess.run(["make", "-s", "-C", str(REPO / "src/microagent/guest")], check=True,
                   timeout=300)
    return REPO / "src/microagent/guest/build/microagent-init"


def build_disk(work: Path) -> Path:
    from ocilayout import busybox_tree

    tree = busybox_tree(work / "root")
    disk = work / "rootfs.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(disk), "64M"], check=True,
                   capture_output=True, timeout=120)
    return disk


def time_to_marker(argv: list[str], marker: str) -> float:
    """Seconds from starting QEMU to ``marker`` on the console; waits for QEMU to exit."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    seen: float | None = None
    buffer = b""
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while time.perf_counter() - start < TIMEOUT:
                if not selector.select(timeout=0.5):
                    continue
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                buffer += chunk
                if seen is None and marker.encode() in buffer:
                    seen = time.perf_counter() - start
        proc.wait(timeout=max(1.0, TIMEOUT - (time.perf_counter() - start)))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stdout.close()
    if seen is None or proc.returncode != 0:
        tail = "\n".join(buffer.decode(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"no {marker!r} (exit {proc.returncode}); console tail:\n{tail}")
    return seen


def best_of(runs: int, kernel: Path, initrd: Path, disk: Path, append: str,
            marker: str, work: Path) -> float:
    best = float("inf")
    for _ in range(runs):
        copy = work / "run.ext4"
        shutil.copyfile(disk, copy)
        best = min(best, time_to_marker(qemu_argv(kernel, initrd, copy, append), marker))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--state-dir", type=Path, default=default_state_dir())
    args = parser.parse_args()

    start = time.perf_counter()
    bundle: KernelBundle = default_kernel(StateLayout(args.state_dir.absolute()))
    print(f"kernel {bundle.version} ({bundle.source}) ready in "
          f"{time.perf_counter() - start:.1f} s; modules: {', '.join(bundle.modules)}")
    with tempfile.TemporaryDirectory(prefix="boot-floor-") as tmp:
        work = Path(tmp)
        floor_initrd = build_boot_initramfs(bundle, build_floor_init(work), work / "floor.cpio")
        agent_initrd = build_boot_initramfs(bundle, build_agent(), work / "agent.cpio")
        disk = build_disk(work)
        append = "console=ttyS0 panic=-1 microagent.test=poweroff"
        images = [("vmlinuz", bundle.vmlinuz)]
        if bundle.vmlinux is not None:
            images.append(("vmlinux", bundle.vmlinux))
        for label, image in images:
            floor = best_of(args.runs, image, floor_initrd, disk, append, FLOOR_MARKER, work)
            ready = best_of(args.runs, image, agent_initrd, disk, append, READY_MARKER, work)
            print(f"{label}: floor (QEMU start to trivial /init) {floor:5.2f} s   "
                  f"agent ready {ready:5.2f} s   agent's own share {ready - floor:5.2f} s   "
                  f"(best of {args.runs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
