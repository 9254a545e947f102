"""``ws.exec(["true"])`` through the public API, beside the library's round trip.

One running busybox workspace (profile tiny, the VM tests' kernel bundle), measured in
turns so that the host's drift moves every figure alike:

- **Figure**: ``ws.exec(["true"])`` on a :class:`microagent.Workspace` of a running
  workspace, in this process: what a program driving the API waits for each command
  (the record and state read, a channel opened through the supervisor with the output
  port lent, hello, exec, close).
- **Floor**: the library round trip: :class:`microagent.vm.agent.AgentClient` exec of
  ``true`` over a channel opened (and hello'd) once before the runs, as
  ``bench/workspace_lifecycle.py`` measures it.
- **Target**: the figure no slower than 1.2 times the floor (issue 13; the floor was
  ~10 ms when last measured).
- Also shown: the same AgentClient exec on a channel opened for each run (open, hello,
  exec, close: the part of the figure that is the channel), and ``microagent exec NAME
  -- true`` wall time from a shell's point of view (target < 150 ms).

Best and median of ``--runs`` each. Run: ``.venv/bin/python bench/api_exec.py [--runs N]``
(as a user who can run QEMU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools"), str(REPO / "bench")]

from figures import api_exec, busybox_workspace, summary  # noqa: E402
from workspace_lifecycle import timed  # noqa: E402

from microagent.layout import StateLayout  # noqa: E402
from microagent.vm.agent import AgentClient, ExecRequest  # noqa: E402
from microagent.vm.control import SupervisorClient  # noqa: E402

TARGET_RATIO = 1.2
TARGET_CLI_MS = 150.0
PREVIOUS_FLOOR_MS = 10.0
WIDTH = 52  # the labels' column
TRUE = ExecRequest(argv=("true",), env=("PATH=/usr/sbin:/usr/bin:/sbin:/bin",))


def _discard(_data: bytes) -> None:
    pass


def open_client(layout: StateLayout, name: str) -> AgentClient:
    client = AgentClient(SupervisorClient(layout.run_files(name), name).open_channel())
    client.hello()
    return client


def library_exec(client: AgentClient) -> float:
    start = time.perf_counter()
    result = client.exec(TRUE, stdout=_discard, stderr=_discard)
    elapsed = time.perf_counter() - start
    if result.exit_code != 0:
        raise RuntimeError(f"AgentClient exec true: {result}")
    return elapsed


def fresh_channel_exec(layout: StateLayout, name: str) -> float:
    start = time.perf_counter()
    client = open_client(layout, name)
    try:
        result = client.exec(TRUE, stdout=_discard, stderr=_discard)
    finally:
        client.close()
    elapsed = time.perf_counter() - start
    if result.exit_code != 0:
        raise RuntimeError(f"AgentClient exec true: {result}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50,
                        help="runs of each API and library figure (default 50)")
    parser.add_argument("--cli-runs", type=int, default=15,
                        help="runs of `microagent exec` (default 15)")
    args = parser.parse_args()
    with busybox_workspace("api-exec-") as (home, ws):
        layout = StateLayout(home)
        client = open_client(layout, "bench")
        runs: dict[str, list[float]] = {"api": [], "floor": [], "fresh": [], "cli": []}
        measures: dict[str, Callable[[], float]] = {
            "api": lambda: api_exec(ws),
            "floor": lambda: library_exec(client),
            "fresh": lambda: fresh_channel_exec(layout, "bench"),
            "cli": lambda: timed(home, "exec", "bench", "--", "true"),
        }
        for name in ("api", "floor", "fresh"):  # warm: imports, caches, the guest
            measures[name]()
        for i in range(args.runs):  # in turns: the host's speed drifts over a run
            for name in ("api", "floor", "fresh"):
                runs[name].append(measures[name]())
            if i < args.cli_runs:
                runs["cli"].append(measures["cli"]())
        client.close()
    print(f"exec of `true` on a running busybox workspace (tiny), {args.runs} runs each")
    print(summary('figure: ws.exec(["true"]) (public API)', runs["api"], width=WIDTH))
    print(summary("floor: AgentClient exec on an open channel", runs["floor"], width=WIDTH))
    ratio = statistics.median(runs["api"]) / statistics.median(runs["floor"])
    best_ratio = min(runs["api"]) / min(runs["floor"])
    verdict = "ok" if ratio <= TARGET_RATIO else "MISSED"
    print(f"ratio API / floor: median {ratio:4.2f}, best {best_ratio:4.2f}   "
          f"(target <= {TARGET_RATIO}; {verdict}; the floor was ~{PREVIOUS_FLOOR_MS:g} ms "
          f"when last measured)")
    print(summary("(AgentClient: open, hello, exec, close each run)", runs["fresh"],
                  width=WIDTH))
    cli = statistics.median(runs["cli"]) * 1000
    print(summary(f"microagent exec bench -- true ({len(runs['cli'])} runs)", runs["cli"],
                  width=WIDTH)
          + f"   (target < {TARGET_CLI_MS:g} ms: {'ok' if cli < TARGET_CLI_MS else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
