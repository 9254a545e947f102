"""Real userland for rootfs tests, and a reader of ext4 images through debugfs.

Fixtures: ``debian_layer``/``debian_tree`` (a Debian minbase layer) and ``busybox_layer``.

The Debian tree is made once with ``debootstrap --variant=minbase`` (root and the Debian
mirror needed) and cached as an uncompressed tar with numeric owners under
``${XDG_CACHE_HOME:-~/.cache}/microagent-tests/``, so later sessions take seconds. The tar
is a layer exactly as an image would carry it: names relative, no ``./`` prefix.

Run ``python -m tests.support.distro`` to build the cache ahead of a test run.

Helpers: :func:`debugfs` runs read-only commands against an image in one session,
:func:`stat_paths` and :func:`list_dirs` parse ``stat`` and ``ls -l -p`` output, and
:func:`read_xattr` fetches an xattr's raw value. They are written independently of
``microagent.disks.ext4`` so that the tests check its work rather than repeat it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
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
        for deb in (root / "var/cache/apt/archives").glob("*.deb"):  # as image builders do
            deb.unlink()
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


@dataclass(frozen=True)
class ImageInode:
    """What ``debugfs stat`` says about one inode."""

    ino: int
    type: str  # regular, directory, symlink, character special, block special, FIFO
    mode: int  # permission bits, setuid/setgid/sticky included
    uid: int
    gid: int
    size: int
    links: int
    device: tuple[int, int] | None
    fast_link: str | None


@dataclass(frozen=True)
class ImageEntry:
    """One line of ``ls -l -p``: a name in a directory."""

    ino: int
    st_mode: int
    uid: int
    gid: int
    size: int | None  # None for directories


def quote(path: str) -> str:
    """A debugfs argument (its parser knows only "..." with "" for a quote)."""
    return '"' + path.replace('"', '""') + '"'


def debugfs(image: Path, commands: list[str], *, timeout: float = 120) -> str:
    """Run read-only debugfs ``commands`` on ``image`` in one session; return stdout."""
    result = subprocess.run(
        ["debugfs", "-f", "-", str(image)], input="\n".join(commands) + "\n",
        capture_output=True, text=True, errors="surrogateescape", timeout=timeout,
        check=True,
    )
    return result.stdout


def _sections(output: str, command: str) -> list[str]:
    """Split debugfs output at its echo of each ``command`` line."""
    return re.split(rf"^debugfs: {command} .*$", output, flags=re.M)[1:]


def stat_paths(image: Path, paths: list[str]) -> dict[str, ImageInode]:
    """``stat`` of each path (or ``<ino>``), in one debugfs session."""
    out = debugfs(image, [f"stat {p if p.startswith('<') else quote(p)}" for p in paths])
    inodes: dict[str, ImageInode] = {}
    for path, text in zip(paths, _sections(out, "stat"), strict=True):
        head = re.search(r"Inode: (\d+)\s+Type: (.+?)\s+Mode:\s+(\d+)", text)
        owner = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+).*Size: (\d+)", text)
        links = re.search(r"Links: (\d+)", text)
        if head is None or owner is None or links is None:
            raise AssertionError(f"cannot parse debugfs stat of {path}: {text[:300]}")
        device = re.search(r"Device major/minor number: (\d+):(\d+)", text)
        fast = re.search(r'Fast link dest: "(.*)"', text)
        inodes[path] = ImageInode(
            ino=int(head[1]), type=head[2], mode=int(head[3], 8), uid=int(owner[1]),
            gid=int(owner[2]), size=int(owner[3]), links=int(links[1]),
            device=(int(device[1]), int(device[2])) if device else None,
            fast_link=fast[1] if fast else None,
        )
    return inodes


_LS = re.compile(r"^/(\d+)/([0-7]+)/(-?\d+)/(-?\d+)/([^/]*)/(\d*)/$", re.M)


def list_dirs(image: Path, dirs: list[str]) -> dict[str, dict[str, ImageEntry]]:
    """``ls -l -p`` of each directory path, in one session: ``{dir: {name: entry}}``."""
    out = debugfs(image, [f"ls -l -p {quote(d)}" for d in dirs])
    listing: dict[str, dict[str, ImageEntry]] = {}
    for directory, text in zip(dirs, _sections(out, "ls -l -p"), strict=True):
        listing[directory] = {
            m[5]: ImageEntry(int(m[1]), int(m[2], 8), int(m[3]), int(m[4]),
                             int(m[6]) if m[6] else None)
            for m in _LS.finditer(text) if m[5] not in (".", "..")
        }
    return listing


def read_xattr(image: Path, path: str, name: str, scratch: Path) -> bytes:
    """The raw value of xattr ``name`` of ``path`` in ``image``."""
    out = scratch / "xattr-value"
    debugfs(image, [f"ea_get -f {quote(str(out))} {quote(path)} {quote(name)}"])
    try:
        return out.read_bytes()
    finally:
        out.unlink(missing_ok=True)


def read_file(image: Path, path: str) -> bytes:
    """The content of a file (or a slow symlink's target) in ``image``."""
    arg = path if path.startswith("<") else quote(path)
    return subprocess.run(["debugfs", "-R", f"cat {arg}", str(image)], capture_output=True,
                          check=True, timeout=60).stdout


def fsck(image: Path) -> subprocess.CompletedProcess[str]:
    """``e2fsck -fn``: a full read-only check."""
    return subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True,
                          timeout=300, check=False)


if __name__ == "__main__":
    print(build_debian_layer())
    sys.exit(0)
