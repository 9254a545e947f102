"""``connect --send "true"`` against ``exec -- true``, in the same run (issue 4).

Both are CLI wall times from a shell against one running workspace, interleaved: the
send goes CLI → supervisor → serial console → the console shell (echo off, markers, echo
back on: two ``stty`` runs in the guest); exec goes CLI → supervisor → agent → fork/exec.
Target: send at most 2 times exec. Measured on the busybox image (ash) and, when the VM
tests' Debian layer is cached, on Debian (bash with readline).

Run: ``.venv/bin/python bench/console_send.py [--runs N]``.
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools"), str(REPO / "bench")]

from boot_floor import default_state_dir, install_cached_kernel  # noqa: E402
from ocilayout import ImageSpec, Layer, build_layout, busybox_tree, tar_directory  # noqa: E402
from workspace_lifecycle import ma  # noqa: E402

DEBIAN_LAYER = default_state_dir().parent / "debian-bookworm-minbase.tar.gz"


def timed(home: Path, *args: str) -> float:
    start = time.perf_counter()
    ma(home, *args)
    return time.perf_counter() - start


def measure(home: Path, name: str, runs: int) -> tuple[float, float]:
    ma(home, "start", name)
    try:
        ma(home, "connect", name, "--send", "true")  # warm the shell's caches
        sends, execs = [], []
        for _ in range(runs):
            execs.append(timed(home, "exec", name, "--", "true"))
            sends.append(timed(home, "connect", name, "--send", "true"))
        return statistics.median(sends), statistics.median(execs)
    finally:
        ma(home, "halt", name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="console-bench-") as tmp:
        work = Path(tmp)
        home = work / "home"
        install_cached_kernel(home)
        images = {"busybox (ash)": [Layer(tar_directory(busybox_tree(work / "tree")))]}
        if DEBIAN_LAYER.exists():
            images["debian (bash)"] = [Layer(gzip.decompress(DEBIAN_LAYER.read_bytes()))]
        for index, (label, layers) in enumerate(images.items()):
            image = work / f"image{index}"
            build_layout(image, [ImageSpec(layers=layers)])
            name = f"bench{index}"
            ma(home, "create", name, "--image", f"oci:{image}", "--profile", "small")
            send, exec_ = measure(home, name, args.runs)
            ratio = send / exec_
            print(f"{label:14} connect --send true {send * 1000:6.1f} ms   floor exec -- true "
                  f"{exec_ * 1000:6.1f} ms   ratio {ratio:4.2f} (target <= 2) "
                  f"{'ok' if ratio <= 2 else 'MISSED'}   (medians of {args.runs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
