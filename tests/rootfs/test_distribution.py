"""A real distribution (Debian minbase) as a root disk, compared entry by entry."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from microagent.disks.rootfs import build_root_disk
from microagent.images.layers import LayerFile
from tests.rootfs.unprivileged import build_as_nobody, require_setpriv, share_layer, shared_dir
from tests.support.distro import DebianTree, fsck, list_dirs, read_file, stat_paths

PLAIN = "application/vnd.oci.image.layer.v1.tar"
SIZE_MIB = 1024


def compare_image_with_tree(image: Path, root: Path) -> int:
    """Assert every entry of ``root`` is in ``image`` with the same metadata; count them."""
    dirs = ["/" + os.path.relpath(dirpath, root).removeprefix(".").lstrip("/")
            for dirpath, _, _ in os.walk(root)]
    listing = list_dirs(image, dirs)
    symlinks: dict[str, str] = {}
    devices: dict[str, tuple[int, int]] = {}
    linked: dict[int, list[str]] = {}
    mismatches: list[str] = []
    count = 0
    for directory in dirs:
        host_dir = root / directory.lstrip("/")
        names = set(os.listdir(host_dir))
        image_names = set(listing[directory]) - ({"lost+found"} if directory == "/" else set())
        if names != image_names:
            mismatches.append(f"{directory}: only on host {sorted(names - image_names)[:5]}, "
                              f"only in image {sorted(image_names - names)[:5]}")
        for name in sorted(names & image_names):
            count += 1
            path = f"{directory.rstrip('/')}/{name}"
            host = (host_dir / name).lstat()
            entry = listing[directory][name]
            want_mode = host.st_mode if not stat.S_ISLNK(host.st_mode) else stat.S_IFLNK
            got_mode = entry.st_mode if not stat.S_ISLNK(entry.st_mode) else stat.S_IFLNK
            if (got_mode, entry.uid, entry.gid) != (want_mode, host.st_uid, host.st_gid):
                mismatches.append(f"{path}: image {got_mode:o} {entry.uid}:{entry.gid}, "
                                  f"host {want_mode:o} {host.st_uid}:{host.st_gid}")
            if stat.S_ISREG(host.st_mode) and entry.size != host.st_size:
                mismatches.append(f"{path}: size {entry.size} != {host.st_size}")
            if stat.S_ISLNK(host.st_mode):
                symlinks[path] = os.readlink(host_dir / name)
            elif stat.S_ISCHR(host.st_mode) or stat.S_ISBLK(host.st_mode):
                devices[path] = (os.major(host.st_rdev), os.minor(host.st_rdev))
            elif stat.S_ISREG(host.st_mode) and host.st_nlink > 1:
                linked.setdefault(host.st_ino, []).append(path)
    inodes = stat_paths(image, [*symlinks, *devices, *(p for g in linked.values() for p in g)])
    for path, target in symlinks.items():
        got = inodes[path].fast_link
        if got is None:
            got = read_file(image, path).decode(errors="surrogateescape")
        if got != target:
            mismatches.append(f"{path}: link to {got!r}, host {target!r}")
    for path, device in devices.items():
        if inodes[path].device != device:
            mismatches.append(f"{path}: device {inodes[path].device} != {device}")
    for group in linked.values():
        if len({inodes[p].ino for p in group}) != 1 or inodes[group[0]].links != len(group):
            mismatches.append(f"hard links {group} are not one inode with {len(group)} links")
    assert not mismatches, "\n".join(mismatches[:40])
    return count


@pytest.mark.slow
def test_debian_image_matches_the_tree(debian_tree: DebianTree, tmp_path: Path) -> None:
    dest = tmp_path / "debian.ext4"
    layer = LayerFile(debian_tree.layer, PLAIN, "sha256:debian-minbase")
    build_root_disk([layer], dest, size_mib=SIZE_MIB, work_dir=tmp_path / "work")
    assert compare_image_with_tree(dest, debian_tree.root) > 5000
    check = fsck(dest)
    assert check.returncode == 0, check.stdout


@pytest.mark.slow
def test_debian_image_built_by_nobody_matches_the_tree(debian_tree: DebianTree) -> None:
    require_setpriv()
    with shared_dir("microagent-debian-") as base:
        layer = LayerFile(share_layer(debian_tree.layer, base), PLAIN, "sha256:debian")
        dest = base / "out" / "debian.ext4"
        build_as_nobody([layer], dest, base / "work", size_mib=SIZE_MIB)
        assert compare_image_with_tree(dest, debian_tree.root) > 5000
        check = fsck(dest)
        assert check.returncode == 0, check.stdout
