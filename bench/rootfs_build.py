"""Time build_root_disk on a Debian minbase layer against tar -x + mkfs.ext4 -d.

The floor is what any root-disk builder must at least do: unpack the gzip layer
(GNU tar, gzip in a parallel process) and run ``mkfs.ext4 -d`` on the result. The
figure is microagent's whole build as an image's: decompress, hash against the layer's
diff_id and stage, size check, mkfs, the debugfs fix-ups, fsync and the removal of the
staging tree. Best of 3 each, interleaved, each
run after a sync and a 31 s pause (see settle()), so a run takes about 5 minutes.

    .venv/bin/python bench/rootfs_build.py [--runs N] [--size-mib N]

Needs the Debian test layer (built by tests/support/distro.py, or here, as root).
As root it also times the build as the nobody user (setpriv), the non-root path.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "src")]

from tests.support import distro  # noqa: E402

from microagent.disks.rootfs import build_root_disk  # noqa: E402
from microagent.images.layers import LayerFile  # noqa: E402

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
TARGET = 1.5
SETTLE_S = 31


def diff_id(tar: Path) -> str:
    """The sha256 of the uncompressed layer (cached next to it)."""
    cached = tar.with_name(tar.name + ".sha256")
    if cached.is_file():
        return cached.read_text().strip()
    hasher = hashlib.sha256()
    with tar.open("rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
    cached.write_text(f"sha256:{hasher.hexdigest()}\n")
    return f"sha256:{hasher.hexdigest()}"


def gzip_layer() -> Path:
    """The Debian layer gzipped as an image layer would be (cached next to the tar)."""
    tar = distro.cached_debian_layer() or distro.build_debian_layer()
    gz = tar.with_name(tar.name + ".gz")
    if not gz.is_file():
        print(f"gzipping {tar} (once)...", file=sys.stderr)
        tmp = gz.with_name(gz.name + ".tmp")
        with tar.open("rb") as src, tmp.open("wb") as raw, gzip.GzipFile(
                fileobj=raw, mode="wb", compresslevel=6, mtime=0) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, gz)
    return gz


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--no-nobody", dest="nobody", action="store_false",
                        help="skip the build as the nobody user")
    args = parser.parse_args()
    layer_path = gzip_layer()
    layer = LayerFile(layer_path, GZIP, "sha256:debian-minbase",
                      diff_id(layer_path.with_suffix("")))
    base = Path(tempfile.mkdtemp(prefix="microagent-bench-", dir=args.dir))
    floor_s: list[float] = []
    ours_s: list[float] = []
    try:
        for run in range(args.runs):  # interleaved: a busy host hurts both alike
            settle()
            tree, img = base / f"tree{run}", base / f"floor{run}.img"
            tree.mkdir()
            started = time.perf_counter()
            subprocess.run(["tar", "-xzf", str(layer_path), "-C", str(tree)], check=True)
            subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(img), f"{args.size_mib}M"],
                           check=True, capture_output=True)
            floor_s.append(time.perf_counter() - started)
            settle()
            started = time.perf_counter()
            build_root_disk([layer], base / f"root{run}.ext4", size_mib=args.size_mib,
                            work_dir=base / "work")
            ours_s.append(time.perf_counter() - started)
        f, o = min(floor_s), min(ours_s)
        print(f"rootfs build: {o:.2f} s  floor (tar -x + mkfs.ext4 -d): {f:.2f} s  "
              f"ratio {o / f:.2f} (target <= {TARGET})")
        if args.nobody and os.geteuid() == 0 and shutil.which("setpriv"):
            n = build_nobody(layer, args)
            print(f"rootfs build as nobody: {n:.2f} s  floor (tar -x + mkfs.ext4 -d): "
                  f"{f:.2f} s  ratio {n / f:.2f} (target <= {TARGET})")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def settle() -> None:
    """Flush, then wait out ext4's 30 s "recently deleted" window for inode reuse.

    Without the flush, a run would pay for writing back the previous run's data (an
    fsync commits the whole journal transaction). Right after many files are deleted,
    ext4 skips their inode numbers for ~30 s, checking them one by one: a run after a
    cleanup would time that scan.
    """
    subprocess.run(["sync"], check=True)
    time.sleep(SETTLE_S)


def build_nobody(layer: LayerFile, args: argparse.Namespace) -> float:
    """Best time of build_root_disk run as the nobody user (the non-root path)."""
    from tests.rootfs.unprivileged import build_as_nobody, share_layer, shared_dir

    times = []
    with shared_dir("microagent-bench-") as shared:
        shared_layer = LayerFile(share_layer(layer.path, shared), GZIP, layer.digest,
                                 layer.diff_id)
        for run in range(args.runs):
            settle()
            times.append(build_as_nobody([shared_layer], shared / "out" / f"r{run}.ext4",
                                         shared / "work", size_mib=args.size_mib))
    return min(times)


if __name__ == "__main__":
    main()
