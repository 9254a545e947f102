"""Memory state against a cold start (issue 14): restore, suspend, fork, snapshot, pause.

One busybox workspace (profile tiny: 256 MiB, 1 vCPU; the VM tests' kernel bundle). The
**floor** of every start-up figure is a cold start of that same workspace measured in the
same run: ``halt()`` (not timed), then ``start(cold=True)``. Each start-up figure is
timed twice: until ``start()`` returns (the workspace is exec-ready) and until a first
``ws.exec("true")`` after it answers; the ratio is figure / cold, best over best and
median over median. ``--runs`` rounds (3), each in this order, so the host's drift moves
every figure alike, and only one VM runs while a start is timed:

1. **cold start** (the floor), then a file ``before-N`` written in the guest;
2. **snapshot create** of the running workspace: the pause it sees
   (``manifest["paused_ms"]``, split into the device-state save and the copies of the RAM
   file and the disk, as the supervisor's event says it), and ``ws.snapshot()``'s wall
   time. Target: the device-state part under 100 ms. Then ``after-N`` is written;
3. **suspended start**: ``suspend()`` (not timed), then ``start()``. Target: ratio < 0.2;
4. **restore** to exec-ready: ``halt()`` (not timed), then ``start(from_snapshot=T)``.
   Targets: ratio < 0.2 and under 0.4 s;
5. **fork** to exec-ready: ``ma.fork(NEW, "bench:T")`` and the fork's ``start()``, both
   timed (shown apart and summed); the source is halted meanwhile. Target: the sum
   < 0.25 of a cold start. The fork is killed and deleted after.

Checked while timing: after a restore ``before-N`` is there and ``after-N`` is not; a
resumed guest (suspended start, restore, fork) has the boot id it had when its memory was
saved, a cold one a new one; the fork's ``hostname`` is its name; every exec answers.

Then, once:

6. **pause to resumed**: ``ws.pause()`` then ``ws.resume()``, best and median of
   ``--pause-runs`` (30); exec is refused while paused and answers after (checked every
   tenth run). Target: under 10 ms.
7. **memory of three forks running at once** against three cold-booted workspaces of the
   same image, measured alike, each after its first exec and a second's rest: the QEMU
   processes' PSS (``/proc/PID/smaps_rollup``; RSS if the kernel has no rollup) and the
   RAM files in ``/dev/shm/microagent-<uid>/`` (``st_blocks * 512``). QEMU maps its RAM
   file shared, so its PSS includes the pages of the file it touched (``Pss_Shmem``); the
   host's total is PSS without those plus the whole files. No target; the ratio is shown.

Also printed: the snapshot's size on disk and the workspace's memory size.

Run: ``.venv/bin/python bench/snapshot.py [--runs N] [--pause-runs N]`` (as a user who can
run QEMU; about a minute with the defaults under TCG).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools"), str(REPO / "bench")]

from boot_floor import install_cached_kernel  # noqa: E402
from figures import ratios, summary, verdict  # noqa: E402
from ocilayout import ImageSpec, Layer, build_layout, busybox_tree, tar_directory  # noqa: E402

from microagent import Microagent, Workspace  # noqa: E402
from microagent.errors import PausedError  # noqa: E402
from microagent.vm.memory import memory_file  # noqa: E402

TARGET_RESTORE_RATIO = 0.2
TARGET_RESTORE_S = 0.4
TARGET_SUSPENDED_RATIO = 0.2
TARGET_FORK_RATIO = 0.25
TARGET_DEVICE_STATE_MS = 100.0
TARGET_PAUSE_MS = 10.0
FORKS = 3
WIDTH = 46  # the labels' column
SPLIT = re.compile(r"\((\d+) ms device state, (\d+) ms copies\)")
MIB = 1 << 20


@dataclass(frozen=True)
class StartTimes:
    """One start: until ``start()`` returned, and until the first exec answered."""

    returned: float
    first_exec: float


@dataclass(frozen=True)
class SnapshotTimes:
    """One ``ws.snapshot()``: its wall time and the pause the guest saw, in seconds."""

    wall: float
    paused: float
    device_state: float
    copies: float


@dataclass(frozen=True)
class HostMemory:
    """What some running workspaces cost the host, in bytes."""

    pss: int  # of their QEMU processes
    pss_shmem: int  # the part of ``pss`` that is their RAM files' pages
    shm: int  # their RAM files, allocated

    @property
    def total(self) -> int:
        return self.pss - self.pss_shmem + self.shm


def timed_start(ws: Workspace, *, from_snapshot: str | None = None,
                cold: bool = False) -> StartTimes:
    """``ws.start()`` then a first exec of ``true``, timed from the call."""
    start = time.perf_counter()
    ws.start(from_snapshot=from_snapshot, cold=cold)
    returned = time.perf_counter() - start
    if ws.exec("true").exit_code != 0:
        raise RuntimeError(f"{ws.name}: the first exec after start failed")
    return StartTimes(returned, time.perf_counter() - start)


def guest_output(ws: Workspace, command: str) -> str:
    return ws.exec(command, check=True).stdout.decode().strip()


def boot_id(ws: Workspace) -> str:
    return guest_output(ws, "cat /proc/sys/kernel/random/boot_id")


def expect(what: str, got: object, wanted: object) -> None:
    if got != wanted:
        raise RuntimeError(f"{what}: {got!r}, expected {wanted!r}")


def take_snapshot(ws: Workspace, tag: str) -> SnapshotTimes:
    start = time.perf_counter()
    snapshot = ws.snapshot(tag)
    wall = time.perf_counter() - start
    taken = next(e.detail for e in reversed(ws.events())
                 if e.detail.startswith(f"snapshot {tag} taken"))
    split = SPLIT.search(taken)
    if split is None:
        raise RuntimeError(f"no device state and copies in the event {taken!r}")
    return SnapshotTimes(wall, snapshot.manifest["paused_ms"] / 1000,
                         int(split[1]) / 1000, int(split[2]) / 1000)


def one_round(ma: Microagent, ws: Workspace, n: int, runs: dict[str, list[StartTimes]],
              snapshots: list[SnapshotTimes]) -> int:
    """One round of figures 1-5 on the workspace ``ws`` (halted first if running), left
    halted; returns the size of its snapshot."""
    tag = f"round-{n}"
    old_boot = ""
    if ws.state == "running":
        old_boot = boot_id(ws)
        ws.halt()
    runs["cold"].append(timed_start(ws, cold=True))
    booted = boot_id(ws)
    if booted == old_boot:
        raise RuntimeError("a cold start kept the boot id")
    ws.exec(f"echo {n} > /root/before-{n}", check=True)
    snapshots.append(take_snapshot(ws, tag))
    ws.exec(f"echo {n} > /root/after-{n}", check=True)

    ws.suspend()
    runs["suspended"].append(timed_start(ws))
    expect("boot id after a suspended start", boot_id(ws), booted)
    expect("after-N after a suspended start", ws.files.exists(f"/root/after-{n}"), True)

    ws.halt()
    runs["restore"].append(timed_start(ws, from_snapshot=tag))
    expect("boot id after restore", boot_id(ws), booted)
    expect("before-N after restore", ws.files.exists(f"/root/before-{n}"), True)
    expect("after-N after restore", ws.files.exists(f"/root/after-{n}"), False)

    ws.halt()
    name = f"fork-{n}"
    start = time.perf_counter()
    fork = ma.fork(name, f"{ws.name}:{tag}")
    created = time.perf_counter() - start
    try:
        started = timed_start(fork)
        runs["fork_create"].append(StartTimes(created, created))  # no exec of its own
        runs["fork_start"].append(started)
        runs["fork"].append(StartTimes(created + started.returned,
                                       created + started.first_exec))
        expect("the fork's hostname", guest_output(fork, "hostname"), name)
        expect("the fork's boot id", boot_id(fork), booted)
    finally:
        fork.kill()
        fork.delete()
    size = next(s.size_bytes for s in ws.snapshots() if s.tag == tag)
    ws.delete_snapshot(tag)
    return size


def pause_resume(ws: Workspace, check: bool) -> float:
    start = time.perf_counter()
    ws.pause()
    paused = time.perf_counter()
    if check:
        try:
            ws.exec(["true"])
            raise RuntimeError("exec ran while paused")
        except PausedError:
            pass
    resume_start = time.perf_counter()
    ws.resume()
    elapsed = (paused - start) + (time.perf_counter() - resume_start)
    if check and ws.exec(["true"]).exit_code != 0:
        raise RuntimeError("the guest did not answer after resume")
    return elapsed


def rollup(pid: int) -> tuple[int, int]:
    """PSS and its shmem part of process ``pid``, in bytes (RSS and RssShmem when the
    kernel has no ``smaps_rollup``)."""
    try:
        text, keys = Path(f"/proc/{pid}/smaps_rollup").read_text(), ("Pss:", "Pss_Shmem:")
    except FileNotFoundError:
        text, keys = Path(f"/proc/{pid}/status").read_text(), ("VmRSS:", "RssShmem:")
    fields = {line.split()[0]: int(line.split()[1]) * 1024
              for line in text.splitlines() if line.split()[0] in keys}
    return fields[keys[0]], fields[keys[1]]


def host_memory(ma: Microagent, workspaces: list[Workspace]) -> HostMemory:
    time.sleep(1.0)  # let the last exec's pages settle alike for both sets
    pss = pss_shmem = shm = 0
    for ws in workspaces:
        pid = ws.status(probe=False).pid
        if pid is None:
            raise RuntimeError(f"{ws.name} has no VM process")
        process, shared = rollup(pid)
        pss, pss_shmem = pss + process, pss_shmem + shared
        shm += memory_file(ma.layout, ws.name).stat().st_blocks * 512
    return HostMemory(pss, pss_shmem, shm)


def running_set(ma: Microagent, names: list[str],
                make: Callable[[str], Workspace]) -> HostMemory:
    """Workspaces ``names`` made by ``make(name)`` and started, measured, removed."""
    started: list[Workspace] = []
    try:
        for name in names:
            ws = make(name)
            started.append(ws)
            timed_start(ws)
        return host_memory(ma, started)
    finally:
        for ws in started:
            ws.kill()
            ws.delete()


def print_starts(label: str, times: list[StartTimes], cold: list[StartTimes],
                 ratio: bool = True) -> None:
    for part, what in (("returned", "start returned"), ("first_exec", "first exec")):
        figure = [getattr(t, part) for t in times]
        line = summary(f"{label}: {what}", figure, width=WIDTH)
        if ratio:
            best, median = ratios(figure, [getattr(t, part) for t in cold])
            line += f"   ratio best {best:5.3f}, median {median:5.3f}"
        print(line)


def target(label: str, times: list[StartTimes], cold: list[StartTimes],
           limit: float) -> float:
    _, median = ratios([t.returned for t in times], [t.returned for t in cold])
    print(f"  {label}: median {median:5.3f} of a cold start (target < {limit:g}: "
          f"{verdict(median < limit)})")
    return median


def report(args: argparse.Namespace, runs: dict[str, list[StartTimes]],
           snapshots: list[SnapshotTimes], pauses: list[float], sizes: list[int],
           memory_mib: int, forks: HostMemory, colds: HostMemory) -> None:
    cold = runs["cold"]
    print(f"busybox workspace (tiny, {memory_mib} MiB memory): {args.runs} interleaved "
          f"rounds, {args.pause_runs} pause/resume; snapshot on disk "
          f"{max(sizes) / MIB:.1f} MiB (largest of the rounds)")
    print_starts("floor: cold start", cold, cold, ratio=False)
    print_starts("restore (from_snapshot)", runs["restore"], cold)
    restore = statistics.median(t.returned for t in runs["restore"])
    target("restore", runs["restore"], cold, TARGET_RESTORE_RATIO)
    print(f"  restore: median {restore:.3f} s (target < {TARGET_RESTORE_S:g} s under TCG: "
          f"{verdict(restore < TARGET_RESTORE_S)})")
    print_starts("suspended start", runs["suspended"], cold)
    target("suspended start", runs["suspended"], cold, TARGET_SUSPENDED_RATIO)
    print(summary("fork: ma.fork (create)", [t.returned for t in runs["fork_create"]],
                  width=WIDTH))
    print_starts("fork: its start", runs["fork_start"], cold)
    print_starts("fork: create + start", runs["fork"], cold)
    target("fork, create + start", runs["fork"], cold, TARGET_FORK_RATIO)
    device_state = [s.device_state for s in snapshots]
    print(summary("snapshot: pause seen (paused_ms)", [s.paused for s in snapshots],
                  width=WIDTH))
    print(summary("snapshot: of which device state", device_state, width=WIDTH))
    print(summary("snapshot: of which copies (RAM file, disk)",
                  [s.copies for s in snapshots], width=WIDTH))
    print(summary("snapshot: ws.snapshot() wall time", [s.wall for s in snapshots],
                  width=WIDTH))
    median = statistics.median(device_state) * 1000
    print(f"  device state: median {median:.0f} ms (target < {TARGET_DEVICE_STATE_MS:g} ms: "
          f"{verdict(median < TARGET_DEVICE_STATE_MS)})")
    print(summary("pause to resumed (ws.pause, ws.resume)", pauses, width=WIDTH))
    median = statistics.median(pauses) * 1000
    print(f"  pause to resumed: median {median:.1f} ms, "
          f"{median / (statistics.median(t.returned for t in cold) * 1000):.4f} of a cold "
          f"start (target < {TARGET_PAUSE_MS:g} ms: {verdict(median < TARGET_PAUSE_MS)})")
    print(f"memory of {FORKS} running at once (QEMU PSS less its shm pages + RAM files):")
    for label, memory in (("forks of one snapshot", forks), ("cold-booted", colds)):
        print(f"  {label:<24} {memory.total / MIB:7.1f} MiB   (PSS {memory.pss / MIB:.1f}, "
              f"of it shm {memory.pss_shmem / MIB:.1f}; RAM files {memory.shm / MIB:.1f})")
    print(f"  ratio forks / cold: {forks.total / colds.total:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="rounds of figures 1-5 (3)")
    parser.add_argument("--pause-runs", type=int, default=30, help="pause/resume runs (30)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="snapshot-bench-") as tmp:
        work = Path(tmp)
        home = work / "home"
        install_cached_kernel(home)
        image = f"oci:{work / 'image'}"
        build_layout(work / "image", [ImageSpec(
            layers=[Layer(tar_directory(busybox_tree(work / "tree")))])])
        ma = Microagent(home)
        ws = ma.create("bench", image, profile="tiny")
        runs: dict[str, list[StartTimes]] = {
            key: [] for key in ("cold", "restore", "suspended", "fork_create", "fork_start",
                                "fork")}
        snapshots: list[SnapshotTimes] = []
        try:
            ws.start()
            pause_resume(ws, check=True)  # warm
            pauses = [pause_resume(ws, check=i % 10 == 0) for i in range(args.pause_runs)]
            sizes = [one_round(ma, ws, n, runs, snapshots) for n in range(args.runs)]
            ws.start()
            ws.snapshot("forks")
            ws.halt()
            forks = running_set(ma, [f"fork-{i}" for i in range(FORKS)],
                                lambda name: ma.fork(name, "bench:forks"))
            colds = running_set(ma, [f"cold-{i}" for i in range(FORKS)],
                                lambda name: ma.create(name, image, profile="tiny"))
            memory_mib = ws.status(probe=False).memory_mib or 0
        finally:
            if ws.status(probe=False).pid is not None:
                ws.kill()
            ws.delete()
    report(args, runs, snapshots, pauses, sizes, memory_mib, forks, colds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
