"""``microagent run IMAGE true`` against create + start + exec + delete (issue 5).

Both end to end from a shell, on the same busybox image (already pulled, its base disk
built), interleaved: ``run`` is those four steps in one process with a kill instead of
a clean halt before the delete; the floor is the four CLI commands one after another
(with ``kill`` before ``delete``, the fair comparison). Target: ratio <= 1 plus noise —
run must not cost more than doing it by hand.

Run: ``.venv/bin/python bench/run_oneshot.py [--runs N]``.
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
from workspace_lifecycle import ma  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="run-bench-") as tmp:
        work = Path(tmp)
        home = work / "home"
        install_cached_kernel(home)
        build_layout(work / "image", [ImageSpec(
            layers=[Layer(tar_directory(busybox_tree(work / "tree")))], env=["PATH=/bin"])])
        image = f"oci:{work / 'image'}"
        ma(home, "image", "pull", image)
        ma(home, "create", "warm", "--image", image, "--profile", "tiny")  # base disk built
        ma(home, "delete", "warm", "--yes")
        runs, floors = [], []
        for i in range(args.runs):
            start = time.perf_counter()
            ma(home, "run", "--profile", "tiny", image, "true")
            runs.append(time.perf_counter() - start)
            start = time.perf_counter()
            name = f"byhand{i}"
            ma(home, "create", name, "--image", image, "--profile", "tiny")
            ma(home, "start", name)
            ma(home, "exec", name, "--", "true")
            ma(home, "kill", name)
            ma(home, "delete", name, "--yes")
            floors.append(time.perf_counter() - start)
    run, floor = statistics.median(runs), statistics.median(floors)
    print(f"run IMAGE true {run:5.2f} s   floor create+start+exec+kill+delete {floor:5.2f} s   "
          f"ratio {run / floor:4.2f} (medians of {args.runs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
