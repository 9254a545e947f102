"""Building ext4 root disks from crafted layers, read back with debugfs; copying disks."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import tarfile
from pathlib import Path

import pytest

from microagent.disks import ext4, rootfs
from microagent.disks.rootfs import build_root_disk, copy_disk
from microagent.errors import DiskTooSmallError, HostError, IntegrityError
from microagent.images import layers
from microagent.images.layers import LayerFile
from tests.support.distro import fsck, list_dirs, read_file, read_xattr, stat_paths
from tests.unit.test_layers import GZIP, E, d, hard, sym, tar_of

# struct vfs_cap_data, revision 2, effective, CAP_NET_RAW permitted: the kernel checks it.
CAP_NET_RAW = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)
pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
            for tool in ("mkfs.ext4", "debugfs", "e2fsck")),
    reason="e2fsprogs (mkfs.ext4, debugfs, e2fsck) is not installed")
LONG_TARGET = "../" + "a-rather-long-directory-name/" * 4 + "target"
ODD_NAME = 'my "odd" node'


def write_layer(directory: Path, entries: list[E], name: str) -> LayerFile:
    import gzip

    blob = gzip.compress(tar_of(entries), mtime=0)
    path = directory / name
    path.write_bytes(blob)
    return LayerFile(path, GZIP, "sha256:" + hashlib.sha256(blob).hexdigest())


def sample_layers(directory: Path) -> list[LayerFile]:
    lower = [
        d("bin"), E("bin/su", data=b"\x7fELF su", mode=0o4755),
        E("bin/wall", data=b"\x7fELF wall", mode=0o2755, gid=5),
        hard("bin/su-again", "bin/su"),
        d("home/alice", mode=0o750, uid=1000, gid=1000),
        E("home/alice/notes", data=b"notes", mode=0o640, uid=1000, gid=1000),
        d("srv", mode=0o555, uid=33, gid=33), d("tmp", mode=0o1777),
        E("dev/null", tarfile.CHRTYPE, mode=0o666, major=1, minor=3),
        E("dev/sda", tarfile.BLKTYPE, mode=0o660, gid=6, major=8, minor=0),
        E("dev/nvme-odd", tarfile.BLKTYPE, mode=0o600, major=259, minor=300000),
        E(f"dev/{ODD_NAME}", tarfile.CHRTYPE, mode=0o620, gid=5, major=4, minor=1),
        E("run/initctl", tarfile.FIFOTYPE, mode=0o600),
        sym("lib", "usr/lib"), d("usr/lib"), sym("usr/lib/long", LONG_TARGET),
        E("usr/lib/caps", data=b"c", pax={"SCHILY.xattr.security.capability": CAP_NET_RAW.decode(),
                                          "SCHILY.xattr.user.mime": "text/plain",
                                          "SCHILY.xattr.trusted.t": "x" * 300}),
        E("old/file", data=b"gone"), E("keep/me", data=b"kept"),
    ]
    upper = [
        E("old/.wh.file"), hard("usr/lib/su-link", "bin/su"),
        E("with space/and \"quote\"", data=b"q", uid=7, gid=8),
    ]
    return [write_layer(directory, lower, "lower.tar.gz"),
            write_layer(directory, upper, "upper.tar.gz")]


@pytest.fixture(params=["as-root", "as-user"])
def staging_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Stage as root, or as an ordinary user (no chown/mknod, privileged xattrs refused)."""
    if request.param == "as-root" and os.geteuid() != 0:
        pytest.skip("needs root")
    if request.param == "as-user":
        real = os.setxattr

        def user_only(target: object, key: str, value: bytes, **kw: object) -> None:
            if not key.startswith("user."):
                raise PermissionError(1, "Operation not permitted")
            real(target, key, value, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(layers.os, "geteuid", lambda: 1000)
        monkeypatch.setattr(layers.os, "setxattr", user_only)
    return str(request.param)


def test_image_has_the_headers_owners_modes_links_devices_and_xattrs(
    tmp_path: Path, staging_mode: str
) -> None:
    steps: list[str] = []
    dest = tmp_path / "disks" / "root.ext4"
    work = tmp_path / "work"
    build_root_disk(sample_layers(tmp_path), dest, size_mib=32, work_dir=work,
                    on_step=steps.append)
    assert steps and steps[0].startswith("applying 2 layers")
    assert os.listdir(work) == [] and sorted(os.listdir(dest.parent)) == ["root.ext4"]
    assert dest.stat().st_size == 32 << 20
    assert dest.stat().st_blocks * 512 < 16 << 20  # sparse

    paths = ["/", "/bin/su", "/bin/wall", "/bin/su-again", "/usr/lib/su-link",
             "/home/alice", "/home/alice/notes", "/srv", "/tmp", "/dev/null", "/dev/sda",
             "/dev/nvme-odd", f"/dev/{ODD_NAME}", "/run/initctl", "/lib", "/usr/lib/long",
             '/with space/and "quote"']
    st = stat_paths(dest, paths)
    assert (st["/"].type, st["/"].mode, st["/"].uid) == ("directory", 0o755, 0)
    su = st["/bin/su"]
    assert (su.type, su.mode, su.uid, su.gid, su.links) == ("regular", 0o4755, 0, 0, 3)
    assert st["/bin/su-again"].ino == su.ino == st["/usr/lib/su-link"].ino
    assert (st["/bin/wall"].mode, st["/bin/wall"].gid) == (0o2755, 5)
    alice = st["/home/alice/notes"]
    assert (alice.mode, alice.uid, alice.gid) == (0o640, 1000, 1000)
    assert (st["/home/alice"].mode, st["/home/alice"].uid) == (0o750, 1000)
    assert (st["/srv"].mode, st["/srv"].uid, st["/srv"].gid) == (0o555, 33, 33)
    assert st["/tmp"].mode == 0o1777
    assert (st["/dev/null"].type, st["/dev/null"].mode, st["/dev/null"].device) == (
        "character special", 0o666, (1, 3))
    assert (st["/dev/sda"].type, st["/dev/sda"].gid, st["/dev/sda"].device) == (
        "block special", 6, (8, 0))
    assert st["/dev/nvme-odd"].device == (259, 300000)
    odd = st[f"/dev/{ODD_NAME}"]
    assert (odd.type, odd.mode, odd.gid, odd.device) == ("character special", 0o620, 5, (4, 1))
    assert st["/run/initctl"].type == "FIFO"
    assert st["/lib"].fast_link == "usr/lib"
    assert read_file(dest, "/usr/lib/long").decode() == LONG_TARGET
    assert (st['/with space/and "quote"'].uid, st['/with space/and "quote"'].gid) == (7, 8)
    assert read_file(dest, "/keep/me") == b"kept"
    assert read_xattr(dest, "/usr/lib/caps", "security.capability", tmp_path) == CAP_NET_RAW
    assert read_xattr(dest, "/usr/lib/caps", "user.mime", tmp_path) == b"text/plain"
    assert read_xattr(dest, "/usr/lib/caps", "trusted.t", tmp_path) == b"x" * 300
    listing = list_dirs(dest, ["/", "/old", "/dev"])
    assert listing["/old"] == {}  # the whiteout removed old/file
    assert "lost+found" in listing["/"]
    assert set(listing["/dev"]) == {"null", "sda", "nvme-odd", ODD_NAME}
    check = fsck(dest)
    assert check.returncode == 0, check.stdout + check.stderr


def test_fixups_are_only_what_differs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to stage exact owners")
    counts: list[int] = []
    real = ext4.fix_inodes

    def counting(*args: object, **kwargs: object) -> int:
        counts.append(real(*args, **kwargs))  # type: ignore[arg-type]
        return counts[-1]

    monkeypatch.setattr(rootfs.ext4, "fix_inodes", counting)
    build_root_disk(sample_layers(tmp_path), tmp_path / "r.ext4", size_mib=32,
                    work_dir=tmp_path / "w")
    assert counts == [0]


def big_layer(directory: Path, mib: int) -> LayerFile:
    return write_layer(directory, [E("data/blob", data=os.urandom(mib << 20)), E("etc/x")],
                       f"big{mib}.tar.gz")


def test_too_small_is_refused_before_mkfs_with_the_size_needed(tmp_path: Path) -> None:
    layer = big_layer(tmp_path, 24)
    dest, work = tmp_path / "out" / "root.ext4", tmp_path / "work"
    with pytest.raises(DiskTooSmallError) as info:
        build_root_disk([layer], dest, size_mib=16, work_dir=work)
    match = re.search(r"needs at least (\d+) MiB", info.value.message)
    assert match is not None, info.value.message
    needed = int(match[1])
    assert 24 < needed <= 24 * 11 // 10 + 24
    assert "--size-mib" in info.value.hint
    assert not dest.exists() and os.listdir(work) == [] and os.listdir(dest.parent) == []
    build_root_disk([layer], dest, size_mib=needed, work_dir=work)  # and that is enough
    check = fsck(dest)
    assert check.returncode == 0, check.stdout


def test_mkfs_running_out_of_space_is_disk_too_small(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rootfs.ext4, "minimum_size_mib", lambda needed: 1)
    dest, work = tmp_path / "root.ext4", tmp_path / "work"
    with pytest.raises(DiskTooSmallError, match="needs at least"):
        build_root_disk([big_layer(tmp_path, 24)], dest, size_mib=12, work_dir=work)
    assert sorted(os.listdir(tmp_path)) == ["big24.tar.gz", "work"]
    assert os.listdir(work) == []


def test_missing_e2fsprogs_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ext4.shutil, "which", lambda name, path=None: None)
    with pytest.raises(HostError) as info:
        build_root_disk(sample_layers(tmp_path), tmp_path / "r.ext4", size_mib=32,
                        work_dir=tmp_path / "w")
    assert "e2fsprogs" in info.value.message and "install e2fsprogs" in info.value.hint


def test_corrupt_layer_leaves_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage-garbage-garbage")
    dest, work = tmp_path / "out" / "root.ext4", tmp_path / "work"
    with pytest.raises(IntegrityError, match="sha256:bad"):
        build_root_disk([LayerFile(bad, GZIP, "sha256:bad")], dest, size_mib=32,
                        work_dir=work)
    assert os.listdir(work) == [] and not dest.exists()


def test_busybox_image_is_clean_and_bootable_shaped(tmp_path: Path, busybox_layer: Path) -> None:
    dest = tmp_path / "busybox.ext4"
    layer = LayerFile(busybox_layer, "application/vnd.oci.image.layer.v1.tar", "sha256:bb")
    build_root_disk([layer], dest, size_mib=64, work_dir=tmp_path / "w")
    st = stat_paths(dest, ["/bin/busybox", "/bin/sh", "/tmp", "/root", "/etc/passwd"])
    assert (st["/bin/busybox"].type, st["/bin/busybox"].mode) == ("regular", 0o755)
    assert st["/bin/sh"].fast_link == "busybox"
    assert st["/tmp"].mode == 0o1777 and st["/root"].mode == 0o700
    assert read_file(dest, "/etc/passwd").startswith(b"root:x:0:0:")
    check = fsck(dest)
    assert check.returncode == 0, check.stdout


def sparse_file(path: Path, size: int, chunks: dict[int, bytes]) -> None:
    with path.open("wb") as f:
        f.truncate(size)
        for offset, data in chunks.items():
            f.seek(offset)
            f.write(data)


def test_copy_disk_keeps_content_and_holes(tmp_path: Path) -> None:
    src, dst = tmp_path / "base.ext4", tmp_path / "ws" / "rootfs.ext4"
    chunks = {0: os.urandom(4096), 10 << 20: os.urandom(1 << 20),
              (64 << 20) - 4096: os.urandom(4096)}
    sparse_file(src, 64 << 20, chunks)
    copy_disk(src, dst)
    assert dst.stat().st_size == src.stat().st_size
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_blocks <= src.stat().st_blocks + 16
    assert dst.stat().st_blocks * 512 < 4 << 20
    assert os.listdir(dst.parent) == ["rootfs.ext4"]
    assert oct(dst.stat().st_mode & 0o777) == oct(0o600)


def test_copy_disk_of_a_missing_disk_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "ws").mkdir()
    with pytest.raises(HostError, match="cannot read the disk"):
        copy_disk(tmp_path / "nope.ext4", tmp_path / "ws" / "rootfs.ext4")
    assert os.listdir(tmp_path / "ws") == []


def test_copy_disk_of_a_built_image_is_a_clean_file_system(tmp_path: Path) -> None:
    base = tmp_path / "base.ext4"
    build_root_disk(sample_layers(tmp_path), base, size_mib=32, work_dir=tmp_path / "w")
    copy = tmp_path / "copy.ext4"
    copy_disk(base, copy)
    check = fsck(copy)
    assert check.returncode == 0, check.stdout
    assert stat_paths(copy, ["/bin/su"])["/bin/su"].mode == 0o4755
