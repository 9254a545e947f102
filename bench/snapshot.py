"""Memory state against a cold start (issue 14). So far: pause to resumed.

One running busybox workspace (profile tiny, the VM tests' kernel bundle):

- **Figure**: ``ws.pause()`` then ``ws.resume()`` through the public API, the time from the
  pause call to the resume's return (the vCPUs stopped, the state recorded, then running
  again), best and median of ``--runs``. Target: under 10 ms.
- **Beside it, measured in the same run**: a cold ``ws.start()`` of the same workspace to
  exec-ready (halted first), the time every later figure of this bench (restore, suspended
  start, fork) is to be a fraction of; and the library's exec round trip of ``true`` (what
  one command costs) as a scale for 10 ms.
- Checked each time: the pause is real (exec is refused while paused) and the guest runs
  again after resume (an exec answers).

Run: ``.venv/bin/python bench/snapshot.py [--runs N]`` (as a user who can run QEMU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools"), str(REPO / "bench")]

from boot_floor import install_cached_kernel  # noqa: E402
from ocilayout import ImageSpec, Layer, build_layout, busybox_tree, tar_directory  # noqa: E402

from microagent import Microagent, Workspace  # noqa: E402
from microagent.errors import PausedError  # noqa: E402

TARGET_PAUSE_MS = 10.0


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


def cold_start(ws: Workspace) -> float:
    ws.halt()
    start = time.perf_counter()
    ws.start()
    return time.perf_counter() - start


def summary(label: str, seconds: list[float]) -> str:
    return (f"{label:<44} best {min(seconds) * 1000:8.1f} ms   "
            f"median {statistics.median(seconds) * 1000:8.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="pause/resume runs (30)")
    parser.add_argument("--cold-runs", type=int, default=3, help="cold starts (3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="snapshot-bench-") as tmp:
        work = Path(tmp)
        home = work / "home"
        install_cached_kernel(home)
        build_layout(work / "image", [ImageSpec(
            layers=[Layer(tar_directory(busybox_tree(work / "tree")))])])
        ws = Microagent(home).create("bench", f"oci:{work / 'image'}", profile="tiny")
        pauses: list[float] = []
        colds: list[float] = []
        execs: list[float] = []
        try:
            ws.start()
            pause_resume(ws, check=True)  # warm
            for i in range(args.runs):
                pauses.append(pause_resume(ws, check=i % 10 == 0))
                start = time.perf_counter()
                ws.exec(["true"])
                execs.append(time.perf_counter() - start)
            for _ in range(args.cold_runs):
                colds.append(cold_start(ws))
        finally:
            if ws.state not in ("halted", "stopped", "failed", "prepared"):
                ws.kill()
            ws.delete()
    print(f"busybox workspace (tiny): {args.runs} pause/resume, {args.cold_runs} cold starts")
    print(summary("figure: pause to resumed (ws.pause, ws.resume)", pauses))
    print(summary("beside: cold start to exec-ready", colds))
    print(summary("scale: ws.exec(['true'])", execs))
    median = statistics.median(pauses) * 1000
    print(f"pause to resumed: median {median:.1f} ms, "
          f"{median / (statistics.median(colds) * 1000):.4f} of a cold start   "
          f"(target < {TARGET_PAUSE_MS:g} ms: {'ok' if median < TARGET_PAUSE_MS else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
