"""``microagent cp`` of a 256 MiB file both ways against exec in the same run (issue 5).

One running busybox workspace (profile small, TCG here). CLI wall times from a shell,
interleaved, best of ``--runs``:

- **Figure, out**: ``cp ws:/root/big LOCAL`` (the agent's ``get``: FILE frames relayed by
  the supervisor, written by the host's safe writer, then renamed into place).
- **Floor, out**: ``exec ws -- cat /root/big > /dev/null`` (STDOUT frames, same relay).
- **Figure, in**: ``cp LOCAL ws:/root/in`` (the agent's ``put``: a temporary file,
  fsynced and renamed in the guest).
- **Floor, in**: ``cat FILE | exec -i ws -- sh -c 'cat > /root/in'``.
- Also shown once: the same two copies on the halted workspace (debugfs on its disk),
  and a directory of 256 files of 1 MiB each both ways while running (tar through exec).

Target: each ratio cp / exec at most 1.5.

Run: ``.venv/bin/python bench/cp_throughput.py [--mib 256] [--runs 3]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools"), str(REPO / "bench")]

from boot_floor import install_cached_kernel  # noqa: E402
from ocilayout import ImageSpec, Layer, build_layout, busybox_tree, tar_directory  # noqa: E402
from workspace_lifecycle import MICROAGENT, ma  # noqa: E402


def timed(home: Path, *args: str, stdin: Path | None = None) -> float:
    """Wall time of one CLI run, stdout to /dev/null; ``stdin`` fed through a pipe by
    ``cat`` (exec -i polls its stdin, and a regular file cannot be polled)."""
    with open(os.devnull, "wb") as sink:
        start = time.perf_counter()
        feeder = subprocess.Popen(["cat", str(stdin)], stdout=subprocess.PIPE) if stdin \
            else None
        subprocess.run([MICROAGENT, "--state-dir", str(home), *args],
                       stdin=feeder.stdout if feeder else subprocess.DEVNULL,
                       stdout=sink, check=True, timeout=600)
        if feeder is not None:
            feeder.wait()
        return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    size = args.mib << 20
    with tempfile.TemporaryDirectory(prefix="cp-bench-") as tmp:
        work = Path(tmp)
        home = work / "home"
        install_cached_kernel(home)
        build_layout(work / "image", [ImageSpec(layers=[Layer(tar_directory(
            busybox_tree(work / "tree")))])])
        big = work / "big"
        with big.open("wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        tree = work / "many"
        tree.mkdir()
        for i in range(256):
            (tree / f"f{i:03}").write_bytes(os.urandom(1 << 20))
        name = "bench"
        ma(home, "create", name, "--image", f"oci:{work / 'image'}", "--profile", "small",
           "--size-mib", str(max(1024, 4 * args.mib + 512)))
        ma(home, "start", name)
        results: dict[str, list[float]] = {k: [] for k in ("cp in", "exec in", "cp out",
                                                           "exec out")}
        try:
            ma(home, "cp", str(big), f"{name}:/root/big")
            for run in range(args.runs):
                out = work / f"out{run}"
                results["cp out"].append(timed(home, "cp", f"{name}:/root/big", str(out)))
                results["exec out"].append(timed(home, "exec", name, "--", "cat", "/root/big"))
                out.unlink()
                results["cp in"].append(timed(home, "cp", str(big), f"{name}:/root/in"))
                results["exec in"].append(timed(home, "exec", "-i", name, "--", "sh", "-c",
                                                "cat > /root/in", stdin=big))
            tree_in = timed(home, "cp", str(tree), f"{name}:/root/")
            tree_out = timed(home, "cp", f"{name}:/root/many", str(work / "many-out"))
            ma(home, "exec", name, "--", "rm", "-rf", "/root/many", "/root/in")
            ma(home, "halt", name)
            disk_out = timed(home, "cp", f"{name}:/root/big", str(work / "disk-out"))
            (work / "disk-out").unlink()
            disk_in = timed(home, "cp", str(big), f"{name}:/root/in")
        finally:
            subprocess.run([MICROAGENT, "--state-dir", str(home), "kill", name],
                           capture_output=True, check=False)
    best = {key: min(values) for key, values in results.items()}

    def rate(seconds: float, count: int = size) -> str:
        return f"{seconds:6.2f} s {count / seconds / 1e6:6.1f} MB/s"

    print(f"microagent cp, {args.mib} MiB file, best of {args.runs} (CLI wall times)")
    for way, cp_key, exec_key, floor in (
            ("guest -> host", "cp out", "exec out", "exec -- cat FILE > /dev/null"),
            ("host -> guest", "cp in", "exec in", "cat | exec -i -- sh -c 'cat > F'")):
        ratio = best[cp_key] / best[exec_key]
        print(f"  {way}: cp {rate(best[cp_key])}   floor {floor} {rate(best[exec_key])}   "
              f"ratio {ratio:4.2f} (target <= 1.5) {'ok' if ratio <= 1.5 else 'MISSED'}")
    print(f"  halted (debugfs on the disk): out {rate(disk_out)}, in {rate(disk_in)}")
    print(f"  a directory of 256 x 1 MiB through tar: in {rate(tree_in, 256 << 20)}, "
          f"out {rate(tree_out, 256 << 20)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
