"""The proof: an ordinary user builds a root disk whose owners and modes are the headers'."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from microagent.images.layers import LayerFile
from tests.rootfs.unprivileged import (
    NOBODY,
    build_as_nobody,
    require_setpriv,
    share_layer,
    shared_dir,
)
from tests.support.distro import fsck, read_xattr, stat_paths
from tests.unit.test_layers import GZIP, E, d, hard, sym
from tests.unit.test_rootfs import CAP_NET_RAW, write_layer


def test_nobody_builds_a_disk_with_root_owners_setuid_devices_and_caps(
    tmp_path: Path,
) -> None:
    require_setpriv()
    entries = [
        d("usr/bin"), E("usr/bin/passwd", data=b"\x7fELF", mode=0o4755),
        E("usr/bin/chage", data=b"\x7fELF", mode=0o2755, gid=42),
        hard("usr/bin/passwd-link", "usr/bin/passwd"),
        E("usr/bin/ping", data=b"\x7fELF", mode=0o755,
          pax={"SCHILY.xattr.security.capability": CAP_NET_RAW.decode(),
               "SCHILY.xattr.user.origin": "layer"}),
        d("home/dev", mode=0o700, uid=1000, gid=1000),
        E("home/dev/.profile", data=b"PS1=$\n", mode=0o644, uid=1000, gid=1000),
        d("etc"), E("etc/shadow", data=b"root:*:1::::::\n", mode=0o640, gid=42),
        d("dev"), E("dev/null", tarfile.CHRTYPE, mode=0o666, major=1, minor=3),
        E("dev/vda", tarfile.BLKTYPE, mode=0o660, gid=6, major=254, minor=0),
        E("dev/initctl", tarfile.FIFOTYPE, mode=0o600),
        d("var/empty", mode=0o555), d("tmp", mode=0o1777), sym("bin", "usr/bin"),
    ]
    layer = write_layer(tmp_path, entries, "nonroot.tar.gz")
    with shared_dir("microagent-nonroot-") as base:
        shared = LayerFile(share_layer(layer.path, base), GZIP, layer.digest)
        dest = base / "out" / "root.ext4"
        build_as_nobody([shared], dest, base / "work", size_mib=32)
        assert os.listdir(base / "work") == []
        assert dest.stat().st_uid == NOBODY  # really built by nobody
        paths = ["/", "/usr/bin", "/usr/bin/passwd", "/usr/bin/passwd-link",
                 "/usr/bin/chage", "/usr/bin/ping", "/home/dev", "/home/dev/.profile",
                 "/etc/shadow", "/dev/null", "/dev/vda", "/dev/initctl", "/var/empty",
                 "/tmp", "/bin"]
        st = stat_paths(dest, paths)
        expect = {
            "/": ("directory", 0o755, 0, 0), "/usr/bin": ("directory", 0o755, 0, 0),
            "/usr/bin/passwd": ("regular", 0o4755, 0, 0),
            "/usr/bin/chage": ("regular", 0o2755, 0, 42),
            "/usr/bin/ping": ("regular", 0o755, 0, 0),
            "/home/dev": ("directory", 0o700, 1000, 1000),
            "/home/dev/.profile": ("regular", 0o644, 1000, 1000),
            "/etc/shadow": ("regular", 0o640, 0, 42),
            "/dev/null": ("character special", 0o666, 0, 0),
            "/dev/vda": ("block special", 0o660, 0, 6),
            "/dev/initctl": ("FIFO", 0o600, 0, 0),
            "/var/empty": ("directory", 0o555, 0, 0),
            "/tmp": ("directory", 0o1777, 0, 0),
        }
        got = {p: (st[p].type, st[p].mode, st[p].uid, st[p].gid) for p in expect}
        assert got == expect
        assert st["/usr/bin/passwd-link"].ino == st["/usr/bin/passwd"].ino
        assert st["/usr/bin/passwd"].links == 2
        assert st["/dev/null"].device == (1, 3) and st["/dev/vda"].device == (254, 0)
        assert (st["/bin"].type, st["/bin"].uid, st["/bin"].fast_link) == (
            "symlink", 0, "usr/bin")
        assert read_xattr(dest, "/usr/bin/ping", "security.capability", tmp_path) == (
            CAP_NET_RAW)
        assert read_xattr(dest, "/usr/bin/ping", "user.origin", tmp_path) == b"layer"
        check = fsck(dest)
        assert check.returncode == 0, check.stdout + check.stderr


def test_nobody_cannot_be_tricked_into_writing_outside(tmp_path: Path) -> None:
    require_setpriv()
    layer = write_layer(tmp_path, [sym("escape", "/tmp"), E("escape/owned-by-nobody")],
                        "evil.tar.gz")
    with shared_dir("microagent-nonroot-") as base:
        shared = LayerFile(share_layer(layer.path, base), GZIP, layer.digest)
        with pytest.raises(AssertionError, match="UnsafeImageError"):
            build_as_nobody([shared], base / "out" / "r.ext4", base / "work", size_mib=32)
        assert not Path("/tmp/owned-by-nobody").exists()
        assert os.listdir(base / "work") == [] and os.listdir(base / "out") == []
