"""``microagent logs`` of a full console capture (8 MiB: serial.log.1 + serial.log).

Figure: wall time of ``microagent --state-dir D logs NAME > /dev/null`` (the installed
console script), best of 10. Floor: ``cat serial.log.1 serial.log > /dev/null``, best of
10 in the same run; also shown, the CLI's start-up alone (``microagent version``), which
is most of the figure. Target: under 300 ms.

The capture is console text as a boot and a session print it (kernel lines, the agent's
milestones, shell output, CR LF line ends), 4 MiB in each half, in a temporary state
directory with a workspace record as ``create`` writes it.
Run: ``.venv/bin/python bench/logs_read.py``.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from tests.support.workspaces import make_workspace  # noqa: E402

from microagent.layout import StateLayout  # noqa: E402
from microagent.vm.console import LOG_LIMIT, rotated  # noqa: E402

RUNS = 10
TARGET_MS = 300.0
NAME = "bench"

KERNEL = [
    "virtio_blk virtio1: [vda] 1048576 512-byte logical blocks (537 MB/512 MiB)",
    "EXT4-fs (vda): mounted filesystem with ordered data mode. Quota mode: none.",
    "Run /init as init process",
    "virtio-pci 0000:00:02.0: enabling device (0000 -> 0003)",
    "clocksource: tsc: mask: 0xffffffffffffffff max_cycles: 0x2b3e459bf4c, max_idle_ns: 440795289890 ns",  # noqa: E501
    "NET: Registered PF_INET6 protocol family",
]
AGENT = ["microagent-init: modules loaded (4)", "microagent-init: root mounted",
         "microagent-init: network up (10.0.2.15/24)", "microagent-init: ready"]
SHELL = ["/ # ls -l /usr/bin | head", "-rwxr-xr-x    1 root     root        1048576 "
         "Jan  1 00:00 busybox", "/ # echo $?", "0", "total 1124"]


def console_text(size: int, seed: int) -> bytes:
    """``size`` bytes of plausible console output with CR LF line ends."""
    rng = random.Random(seed)
    lines: list[bytes] = []
    total, clock = 0, 0.0
    while total < size:
        kind = rng.random()
        if kind < 0.5:
            clock += rng.random() / 50
            text = f"[{clock:12.6f}] {rng.choice(KERNEL)}"
        elif kind < 0.6:
            text = rng.choice(AGENT)
        else:
            text = rng.choice(SHELL)
        line = text.encode() + b"\r\n"
        lines.append(line)
        total += len(line)
    return b"".join(lines)[:size]


def best_ms(argv: list[str], env: dict[str, str]) -> float:
    best = float("inf")
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
        best = min(best, (time.perf_counter() - start) * 1000)
    return best


def main() -> int:
    entry = str(Path(sys.executable).parent / "microagent")
    with tempfile.TemporaryDirectory() as state:
        layout = StateLayout.resolve(state)
        make_workspace(layout, NAME)
        log = layout.workspace_serial_log(NAME)
        rotated(log).write_bytes(console_text(LOG_LIMIT, 1))
        log.write_bytes(console_text(LOG_LIMIT, 2))
        env = {**os.environ, "MICROAGENT_HOME": state}
        out = subprocess.run([entry, "logs", NAME], env=env, check=True,
                             capture_output=True).stdout
        size = rotated(log).stat().st_size + log.stat().st_size
        if b"\r\n" in out or len(out) >= size:
            print("logs did not turn CR LF into LF", file=sys.stderr)
            return 1
        floor = best_ms(["cat", str(rotated(log)), str(log)], env)
        startup = best_ms([entry, "version"], env)
        figure = best_ms([entry, "--state-dir", state, "logs", NAME], env)
    ok = figure < TARGET_MS
    print(f"microagent logs ({size / 2**20:.0f} MiB capture) {figure:6.1f} ms   "
          f"floor (cat both halves) {floor:5.1f} ms   ratio {figure / floor:5.1f}   "
          f"target < {TARGET_MS:.0f} ms {'ok' if ok else 'MISSED'}")
    print(f"  of which CLI start-up (microagent version) {startup:6.1f} ms")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
