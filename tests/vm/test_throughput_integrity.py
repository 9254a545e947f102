"""Every byte of a process's output reaches the host, in order, however the host reads.

The agent splices a process's pipe to the virtio-serial port in batches (no copy in the
guest; see ``src/microagent/guest/channel.c``). virtio_console's splice_write loses or
corrupts data in some cases (a splice that stops before the end of its source pipe hands
the device zero-sized entries, and QEMU then stops the port for good), so these tests
check content, not just byte counts: a random file in a tmpfs, its SHA-256 computed in the
guest, compared with what the host received, with the host reading fast, slowly, in
bursts, with a window big enough for the virtio ring to fill up, and with both stdout and
stderr streaming at once; producers write in blocks that do not match pages.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent.kernel.kernels import KernelBundle
from microagent.vm.agent import AgentClient, ExecRequest
from tests.vm.qemu import RunningVM

pytestmark = pytest.mark.slow

PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"
READY = "microagent-init: ready"
SIZE = 12 << 20
FILE = "/mnt/pattern"


@pytest.fixture(scope="module")
def vm(guest_kernel: KernelBundle, boot_initramfs: Path, busybox_disk: Path,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningVM, str]]:
    """A VM with SIZE random bytes in a tmpfs file; yields it and the file's SHA-256."""
    disk = tmp_path_factory.mktemp("integrity-vm") / "rootfs.ext4"
    shutil.copyfile(busybox_disk, disk)
    machine = RunningVM(guest_kernel.vmlinuz, boot_initramfs, disk,
                        "console=ttyS0 panic=-1 quiet")
    try:
        machine.wait_for_console(READY, 90)
        client = AgentClient(machine.connect("agent"))
        client.hello(timeout=30)
        out = bytearray()
        result = client.exec(ExecRequest(argv=("sh", "-c", (
            f"mkdir -p /mnt && mount -t tmpfs -o size=64m tmpfs /mnt && "
            f"head -c {SIZE} /dev/urandom > {FILE} && sha256sum {FILE}")), env=(PATH,)),
            stdout=out.extend, stderr=out.extend)
        assert result.exit_code == 0, out.decode(errors="replace")
        client.close()
        yield machine, out.decode().split()[0]
    finally:
        machine.kill()


class Sink:
    """Hashes what it gets; sleeps as the reading pattern says (the host's reads slow
    down with it: the client reads the socket between callbacks)."""

    def __init__(self, pattern: str, seed: int) -> None:
        self.hash = hashlib.sha256()
        self.size = 0
        self.pattern = pattern
        self.random = random.Random(seed)

    def __call__(self, data: bytes) -> None:
        self.hash.update(data)
        self.size += len(data)
        if self.pattern == "slow":
            time.sleep(0.002)
        elif self.pattern == "bursty" and self.random.random() < 0.1:
            time.sleep(0.05)


def exec_hashed(vm: RunningVM, command: str, pattern: str, window: int | None,
                seed: int) -> tuple[Sink, Sink]:
    kwargs = {} if window is None else {"window": window}
    client = AgentClient(vm.connect("agent"), **kwargs)
    try:
        try:
            client.hello(timeout=30)
        except Exception as e:  # seen once in six suite runs: keep what the guest said
            raise AssertionError(f"no HELLO on a new connection ({e}); console:\n"
                                 f"{vm.tail()}") from e
        out, err = Sink(pattern, seed), Sink(pattern, seed + 1)
        result = client.exec(ExecRequest(argv=("sh", "-c", command), env=(PATH,),
                                         timeout_ms=300_000), stdout=out, stderr=err)
        assert result.exit_code == 0, (result, vm.tail())
        return out, err
    finally:
        client.close()


@pytest.mark.parametrize("pattern,window", [
    ("fast", None), ("slow", None), ("bursty", None),
    ("slow", 64 << 20),  # credit never limits: the virtio ring and the socket fill up
    ("bursty", 64 << 20),
])
def test_stdout_arrives_whole_and_in_order(vm: tuple[RunningVM, str], pattern: str,
                                           window: int | None) -> None:
    machine, digest = vm
    for seed, producer in enumerate((f"cat {FILE}", f"dd if={FILE} bs=1000 2>/dev/null",
                                     f"dd if={FILE} bs=100003 2>/dev/null")):
        out, err = exec_hashed(machine, producer, pattern, window, seed)
        assert (out.size, out.hash.hexdigest()) == (SIZE, digest), (producer, machine.tail())
        assert err.size == 0


@pytest.mark.parametrize("pattern,window", [("fast", None), ("bursty", 64 << 20)])
def test_stdout_and_stderr_at_once(vm: tuple[RunningVM, str], pattern: str,
                                   window: int | None) -> None:
    machine, digest = vm
    for seed in range(3):
        out, err = exec_hashed(machine, f"cat {FILE} & dd if={FILE} bs=4097 >&2 "
                               f"2>/dev/null; wait", pattern, window, seed)
        assert (out.size, out.hash.hexdigest()) == (SIZE, digest), machine.tail()
        assert (err.size, err.hash.hexdigest()) == (SIZE, digest), machine.tail()


def test_the_agent_still_answers(vm: tuple[RunningVM, str]) -> None:
    """After all of the above the port works (QEMU did not mark the device broken)."""
    machine, _ = vm
    client = AgentClient(machine.connect("agent"))
    try:
        client.hello(timeout=30)
        out = bytearray()
        result = client.exec(ExecRequest(argv=("echo", "alive"), env=(PATH,)),
                             stdout=out.extend, stderr=out.extend)
        assert (result.exit_code, bytes(out)) == (0, b"alive\n")
    finally:
        client.close()
    # ... and the output went the spliced way (else this tested the copying fallback)
    console = machine.console()
    assert "cannot splice" not in console and "spliced output" not in console, console
    assert "zero sized buffers" not in machine.tail(200)
