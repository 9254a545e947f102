"""Time copy_disk (a workspace's own root disk) against cp --sparse=always.

The base disk is a real ext4 image built by build_root_disk from a layer of ~200 MB of
file data (1 GiB apparent size, sparse). The figure is copy_disk; the floor is GNU cp
keeping holes. Reports whether the file system shared the blocks (reflink). Best of 3.

    .venv/bin/python bench/workspace_disk.py [--data-mib N] [--runs N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import fcntl
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src")]

from microagent.disks.rootfs import build_root_disk, copy_disk  # noqa: E402
from microagent.images.layers import LayerFile  # noqa: E402

TARGET_S = 1.0
FICLONE = 0x40049409


def data_layer(path: Path, data_mib: int) -> LayerFile:
    """An uncompressed layer of ``data_mib`` 1 MiB files (random, so nothing dedups)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(data_mib):
            info = tarfile.TarInfo(f"data/{i // 64:02d}/blob-{i:04d}")
            info.size, info.mode = 1 << 20, 0o644
            tar.addfile(info, io.BytesIO(os.urandom(1 << 20)))
    return LayerFile(path, "application/vnd.oci.image.layer.v1.tar", "sha256:bench")


def reflink_supported(directory: Path) -> bool:
    src, dst = directory / "probe-src", directory / "probe-dst"
    src.write_bytes(b"x" * 4096)
    try:
        with src.open("rb") as s, dst.open("wb") as d:
            fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
        return True
    except OSError:
        return False
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-mib", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                        help="where the disks go (try a btrfs or xfs directory for reflinks)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="microagent-bench-", dir=args.dir))
    try:
        disk = base / "base.ext4"
        build_root_disk([data_layer(base / "layer.tar", args.data_mib)], disk,
                        size_mib=1024, work_dir=base / "work")
        (base / "layer.tar").unlink()
        allocated = disk.stat().st_blocks * 512 >> 20
        times: dict[str, list[float]] = {"cp": [], "cp+sync": [], "copy_disk": []}
        for _ in range(args.runs):
            for how, samples in times.items():
                target = base / "copy.ext4"
                subprocess.run(["sync"], check=True)
                started = time.perf_counter()
                if how == "copy_disk":
                    copy_disk(disk, target)
                else:
                    subprocess.run(["cp", "--sparse=always", str(disk), str(target)],
                                   check=True)
                    if how == "cp+sync":  # copy_disk fsyncs the copy; so does this floor
                        subprocess.run(["sync", str(target)], check=True)
                samples.append(time.perf_counter() - started)
                copied = target.stat().st_blocks * 512 >> 20
                target.unlink()
        o, f, fs = (min(times[k]) for k in ("copy_disk", "cp", "cp+sync"))
        reflink = "yes" if reflink_supported(base) else "no"
        print(f"workspace disk copy: {o:.2f} s  floor (cp --sparse=always): {f:.2f} s  "
              f"ratio {o / f:.2f}  (cp + sync of the copy: {fs:.2f} s, ratio {o / fs:.2f})  "
              f"target < {TARGET_S:.0f} s")
        print(f"  base disk {allocated} MiB allocated of 1024 MiB, copy allocates {copied} "
              f"MiB, reflink: {reflink}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
