"""The first command after a supervisor is killed: it re-attaches a new one to the VM.

One running busybox workspace (profile tiny, the VM tests' kernel bundle, no network, so
that the figure is the re-attach itself and not passt's start), measured in turns:

- **Figure**: the supervisor SIGKILLed, then ``ws.exec(["true"])`` from this process,
  which finds nobody on the control socket, spawns ``_supervise --adopt`` (QMP, the
  console, HELLO, the probes, its event) and then runs the command.
- **Floor**: ``ws.exec(["true"])`` with the supervisor there, just before.
- **Also shown**: a cold start of the same workspace (halt, start), what a VM that died
  with its supervisor would have cost before it could run the command; target: the
  re-attach well under it (< 0.5x).

The guest is not rebooted: a counter started in the guest before the first kill is
checked to have kept counting. Best and median of ``--runs``. Run:
``.venv/bin/python bench/reattach.py [--runs N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools"), str(REPO / "bench")]

from figures import api_exec, busybox_workspace, ratios, summary, verdict  # noqa: E402

TARGET_RATIO = 0.5
WIDTH = 48


def kill_supervisor(home: Path, name: str) -> None:
    """SIGKILL the workspace's supervisor and wait until it is gone."""
    status = json.loads((home / "workspaces" / name / "run" / "status.json").read_text())
    pid = int(status["supervisor_pid"])
    os.kill(pid, signal.SIGKILL)
    while Path(f"/proc/{pid}").exists() and \
            Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.001)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    floor: list[float] = []
    figure: list[float] = []
    cold: list[float] = []
    with busybox_workspace("microagent-bench-reattach-") as (home, ws):
        counter = ws.spawn("i=0; while true; do echo $i; i=$((i+1)); sleep 0.05; done")
        for _ in range(args.runs):
            floor.append(api_exec(ws))
            kill_supervisor(home, ws.name)
            figure.append(api_exec(ws))
        seen = [int(x) for x in counter.read(0).data.split()]
        if seen != list(range(len(seen))) or not seen:
            raise RuntimeError("the guest's counter did not keep counting: it rebooted")
        for _ in range(max(1, args.runs // 2)):
            ws.halt()
            start = time.perf_counter()
            ws.start()
            api_exec(ws)
            cold.append(time.perf_counter() - start)
    print(summary("exec true (floor)", floor, width=WIDTH))
    print(summary("exec true after a supervisor SIGKILL", figure, width=WIDTH))
    print(summary("halted -> start -> exec true (cold)", cold, width=WIDTH))
    best, median = ratios(figure, cold)
    print(f"{'re-attach / cold start':<{WIDTH}} best {best:.3f}x   median {median:.3f}x"
          f"   target < {TARGET_RATIO}x: {verdict(median < TARGET_RATIO)}")
    extra = statistics.median(figure) - statistics.median(floor)
    print(f"{'re-attach adds (median)':<{WIDTH}} {extra * 1000:.0f} ms")


if __name__ == "__main__":
    main()
