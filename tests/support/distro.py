"""Real userland for rootfs tests: a Debian minbase layer and a busybox layer.

The Debian tree is made once with ``debootstrap --variant=minbase`` (root and the Debian
mirror needed) and cached as an uncompressed tar with numeric owners under
``${XDG_CACHE_HOME:-~/.cache}/microagent-tests/``, so later sessions take seconds. The tar
is a layer exactly as an image would carry it: names relative, no ``./`` prefix.

Run ``python -m tests.support.distro`` to build the cache ahead of a test run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
LAYER_NAME = f"debian-{SUITE}-minbase.tar"
DEBOOTSTRAP_TIMEOUT = 1200


@dataclass(frozen=True)
class DebianTree:
    """The cached Debian layer and an extracted copy (owners, modes, devices kept)."""

    layer: Path
    root: Path


def cache_dir() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/microagent-tests``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "microagent-tests"


def cached_debian_layer() -> Path | None:
    """The cached Debian layer if an earlier run built it, else None."""
    layer = cache_dir() / LAYER_NAME
    return layer if layer.is_file() else None


def build_debian_layer() -> Path:
    """Return the cached Debian minbase layer, building it first if missing.

    Raises RuntimeError when it cannot be built (not root, no debootstrap, mirror down).
    """
    layer = cache_dir() / LAYER_NAME
    if layer.is_file():
        return layer
    if os.geteuid() != 0:
        raise RuntimeError("debootstrap needs root to build the Debian test tree")
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is not installed (apt-get install debootstrap)")
    layer.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=layer.parent) as tmp:
        root = Path(tmp) / "root"
        run = subprocess.run(
            ["debootstrap", "--variant=minbase", SUITE, str(root), MIRROR],
            capture_output=True, text=True, timeout=DEBOOTSTRAP_TIMEOUT, check=False,
        )
        if run.returncode != 0:
            tail = "\n".join((run.stdout + run.stderr).splitlines()[-15:])
            raise RuntimeError(f"debootstrap failed ({run.returncode}):\n{tail}")
        # Drop the apt caches debootstrap leaves behind, as image builders do.
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (root / junk).glob("*.deb"):
                entry.unlink()
        tmp_layer = Path(tmp) / LAYER_NAME
        names = sorted(os.listdir(root))
        subprocess.run(
            ["tar", "--format=pax", "--numeric-owner", "--xattrs", "--sort=name",
             "-cf", str(tmp_layer), "-C", str(root), "--", *names],
            check=True, capture_output=True, timeout=600,
        )
        os.replace(tmp_layer, layer)
    return layer


def extract_layer(layer: Path, dest: Path) -> Path:
    """Extract ``layer`` as root keeping numeric owners, modes, devices and xattrs."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", str(layer),
         "-C", str(dest)],
        check=True, capture_output=True, timeout=600,
    )
    return dest


@pytest.fixture(scope="session")
def debian_layer() -> Path:
    """The cached Debian minbase layer (an uncompressed tar), built on first use."""
    layer = cached_debian_layer()
    if layer is not None:
        return layer
    if os.geteuid() != 0:
        pytest.skip("building the Debian test tree needs root (debootstrap); run the "
                    "tests as root once, or `sudo python -m tests.support.distro`")
    try:
        return build_debian_layer()
    except (RuntimeError, subprocess.SubprocessError, OSError) as e:
        pytest.skip(f"cannot build the Debian test tree: {e}")


@pytest.fixture(scope="session")
def debian_tree(
    debian_layer: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DebianTree]:
    """The Debian layer and a copy extracted by GNU tar as root, for comparisons."""
    if os.geteuid() != 0:
        pytest.skip("extracting the Debian tree with its owners and devices needs root")
    root = tmp_path_factory.mktemp("debian") / "root"
    extract_layer(debian_layer, root)
    yield DebianTree(layer=debian_layer, root=root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def busybox_layer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox-static root tree as one uncompressed tar layer owned by root."""
    from ocilayout import busybox_tree, tar_directory

    if not Path("/bin/busybox").is_file():
        pytest.skip("busybox-static is not installed (/bin/busybox)")
    base = tmp_path_factory.mktemp("busybox")
    tree = busybox_tree(base / "root")
    layer = base / "busybox.tar"
    layer.write_bytes(tar_directory(tree))
    shutil.rmtree(tree)
    return layer


def layer_members(layer: Path) -> list[tarfile.TarInfo]:
    """Every member of an uncompressed tar layer (headers only)."""
    with tarfile.open(layer, "r:") as tar:
        return tar.getmembers()


if __name__ == "__main__":
    print(build_debian_layer())
    sys.exit(0)
