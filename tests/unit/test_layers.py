"""Applying crafted layers: whiteouts, links, devices, ownership, compression, and attacks."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zstandard

from microagent.errors import HostError, IntegrityError, UnsafeImageError
from microagent.images import layers
from microagent.images.layers import Kind, LayerFile, Tree, apply_layers

MTIME = 1_700_000_000
GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
PLAIN = "application/vnd.oci.image.layer.v1.tar"
DOCKER_PLAIN = "application/vnd.docker.image.rootfs.diff.tar"


@dataclass
class E:
    """One tar entry to write."""

    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    link: str = ""
    major: int = 0
    minor: int = 0
    pax: dict[str, str] = field(default_factory=dict)
    mtime: int = MTIME


def d(name: str, mode: int = 0o755, **kw: object) -> E:
    return E(name, tarfile.DIRTYPE, mode=mode, **kw)  # type: ignore[arg-type]


def sym(name: str, target: str) -> E:
    return E(name, tarfile.SYMTYPE, mode=0o777, link=target)


def hard(name: str, target: str) -> E:
    return E(name, tarfile.LNKTYPE, link=target)


def tar_of(entries: list[E], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type, info.mode, info.uid, info.gid = e.type, e.mode, e.uid, e.gid
            info.mtime, info.linkname = e.mtime, e.link
            info.devmajor, info.devminor = e.major, e.minor
            info.uname, info.gname = "someone", "somegroup"  # must be ignored
            info.pax_headers = dict(e.pax)
            info.size = len(e.data)
            tar.addfile(info, io.BytesIO(e.data) if e.type == tarfile.REGTYPE else None)
    return buf.getvalue()


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "zstd":
        return bytes(zstandard.ZstdCompressor().compress(data))
    return data


class Image:
    """Writes layers next to a staging dir and a sentinel dir that must stay untouched."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "staging"
        self.root.mkdir()
        self.sentinel = base / "sentinel"
        self.sentinel.mkdir()
        (self.sentinel / "keep").write_text("keep")
        self.count = 0

    def layer(self, entries: list[E], *, how: str = "gzip", media_type: str = GZIP,
              raw: bytes | None = None) -> LayerFile:
        blob = raw if raw is not None else compress(tar_of(entries), how)
        self.count += 1
        path = self.base / f"layer{self.count}"
        path.write_bytes(blob)
        return LayerFile(path, media_type, "sha256:" + hashlib.sha256(blob).hexdigest())

    def apply(self, *layer_entries: list[E]) -> Tree:
        return apply_layers([self.layer(e) for e in layer_entries], self.root)

    def sentinel_untouched(self) -> bool:
        return sorted(p.name for p in self.sentinel.iterdir()) == ["keep"] and sorted(
            p.name for p in self.base.iterdir() if not p.name.startswith("layer")
        ) == ["sentinel", "staging"]


@pytest.fixture
def image(tmp_path: Path) -> Image:
    return Image(tmp_path)


@pytest.fixture
def unprivileged(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage as an ordinary user would: no chown, no mknod."""
    monkeypatch.setattr(layers.os, "geteuid", lambda: 1000)


def test_files_dirs_symlinks_and_ownership_from_headers(image: Image) -> None:
    tree = image.apply([
        d("etc"), E("etc/passwd", data=b"root:x:0:0\n"),
        d("home/alice", mode=0o750, uid=1000, gid=1000),
        E("home/alice/notes", data=b"hi", mode=0o600, uid=1000, gid=1000),
        E("usr/bin/su", data=b"\x7fELF", mode=0o4755),
        E("usr/bin/wall", data=b"\x7fELF", mode=0o2755, gid=5),
        d("tmp", mode=0o1777),
        sym("bin", "usr/bin"),
    ])
    su = tree.get("usr/bin/su")
    assert su is not None and su.kind is Kind.FILE and su.mode == 0o4755 and su.size == 4
    wall = tree.get("usr/bin/wall")
    assert wall is not None and (wall.mode, wall.uid, wall.gid) == (0o2755, 0, 5)
    tmp = tree.get("tmp")
    assert tmp is not None and tmp.kind is Kind.DIR and tmp.mode == 0o1777
    alice = tree.get("home/alice/notes")
    assert alice is not None and (alice.uid, alice.gid, alice.mode) == (1000, 1000, 0o600)
    assert alice.mtime_ns == MTIME * 10**9
    home = tree.get("home")  # made implicitly: 0755, root's
    assert home is not None and (home.kind, home.mode, home.uid) == (Kind.DIR, 0o755, 0)
    link = tree.get("bin")
    assert link is not None and link.kind is Kind.SYMLINK and link.target == "usr/bin"
    assert (image.root / "etc/passwd").read_bytes() == b"root:x:0:0\n"
    assert os.readlink(image.root / "bin") == "usr/bin"
    on_disk = (image.root / "usr/bin/su").stat()
    assert stat.S_IMODE(on_disk.st_mode) == 0o4755 and on_disk.st_mtime == MTIME
    assert (image.root / "home/alice").stat().st_mtime == MTIME  # set after its children
    if os.geteuid() == 0:
        assert (image.root / "home/alice/notes").stat().st_uid == 1000
    paths = [p for p, _ in tree.walk()]
    assert paths[0] == "" and "usr/bin/su" in paths and paths.index("usr") < paths.index(
        "usr/bin/su")


def test_unprivileged_staging_keeps_files_usable(image: Image, unprivileged: None) -> None:
    tree = image.apply([
        d("ro", mode=0o555), E("ro/secret", data=b"s", mode=0o000, uid=1000),
        E("dev/null", tarfile.CHRTYPE, mode=0o666, major=1, minor=3),
        E("dev/sda", tarfile.BLKTYPE, mode=0o660, gid=6, major=8, minor=0),
    ])
    assert stat.S_IMODE((image.root / "ro").stat().st_mode) == 0o755 | 0o700
    assert stat.S_IMODE((image.root / "ro/secret").stat().st_mode) == 0o600
    null = tree.get("dev/null")
    assert null is not None and null.kind is Kind.CHAR and (null.devmajor, null.devminor) == (
        1, 3)
    sda = tree.get("dev/sda")
    assert sda is not None and sda.kind is Kind.BLOCK and sda.st_mode == stat.S_IFBLK | 0o660
    assert stat.S_ISFIFO((image.root / "dev/null").lstat().st_mode)  # the stand-in
    assert tree.get("ro") is not None and tree.get("ro").mode == 0o555  # type: ignore[union-attr]


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_devices_and_fifos_as_root(image: Image) -> None:
    tree = image.apply([
        E("dev/null", tarfile.CHRTYPE, mode=0o666, major=1, minor=3),
        E("dev/loop0", tarfile.BLKTYPE, mode=0o660, gid=6, major=7, minor=0),
        E("run/initctl", tarfile.FIFOTYPE, mode=0o600),
    ])
    null = (image.root / "dev/null").lstat()
    assert stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1
    loop = (image.root / "dev/loop0").lstat()
    assert stat.S_ISBLK(loop.st_mode) and loop.st_gid == 6
    assert stat.S_ISFIFO((image.root / "run/initctl").lstat().st_mode)
    fifo = tree.get("run/initctl")
    assert fifo is not None and fifo.kind is Kind.FIFO


def test_whiteouts_delete_lower_files_and_directories(image: Image) -> None:
    tree = image.apply(
        [d("a"), E("a/f", data=b"1"), d("a/sub"), E("a/sub/x"), E("keep")],
        [E("a/.wh.f"), E("a/.wh.sub"), E(".wh.missing")],
    )
    assert tree.get("a/f") is None and tree.get("a/sub") is None
    assert tree.get("keep") is not None
    assert sorted(os.listdir(image.root)) == ["a", "keep"]
    assert os.listdir(image.root / "a") == []


def test_whiteout_does_not_hide_the_same_layers_entry(image: Image) -> None:
    tree = image.apply([E("f", data=b"old")], [E("f", data=b"new"), E(".wh.f")])
    assert tree.get("f") is not None and (image.root / "f").read_bytes() == b"new"


@pytest.mark.parametrize("marker_first", [True, False], ids=["marker-first", "marker-last"])
def test_opaque_directory(image: Image, marker_first: bool) -> None:
    upper = [d("d"), E("d/new", data=b"n"), d("d/sub"), E("d/sub/fresh")]
    marker = E("d/.wh..wh..opq")
    upper = [upper[0], marker, *upper[1:]] if marker_first else [*upper, marker]
    tree = image.apply(
        [d("d"), E("d/old"), d("d/sub"), E("d/sub/stale"), d("d/gone"), E("d/gone/x"),
         E("outside")],
        upper,
    )
    assert sorted((tree.get("d").children or {}).keys()) == ["new", "sub"]  # type: ignore[union-attr]
    assert sorted(os.listdir(image.root / "d")) == ["new", "sub"]
    assert os.listdir(image.root / "d/sub") == ["fresh"]
    assert tree.get("outside") is not None
    assert not any(name.startswith(".wh.") for name, _ in tree.walk())


def test_opaque_and_other_whiteout_files_never_appear(image: Image) -> None:
    tree = image.apply([d("d"), E("d/.wh..wh..opq"), E(".wh..wh.plnk/123")])
    assert [p for p, _ in tree.walk()] == ["", "d"]
    assert sorted(os.listdir(image.root)) == ["d"]


def test_hard_links_within_and_across_layers(image: Image) -> None:
    tree = image.apply(
        [E("bin/a", data=b"same", mode=0o755), hard("bin/b", "bin/a")],
        [hard("usr/c", "bin/a"), hard("usr/d", "./bin/b")],
    )
    node = tree.get("bin/a")
    assert node is not None
    assert all(tree.get(p) is node for p in ("bin/b", "usr/c", "usr/d"))
    inodes = {(image.root / p).stat().st_ino for p in ("bin/a", "bin/b", "usr/c", "usr/d")}
    assert len(inodes) == 1 and (image.root / "bin/a").stat().st_nlink == 4


def test_replacing_a_hard_linked_path_keeps_the_other_link(image: Image) -> None:
    tree = image.apply([E("a", data=b"old"), hard("b", "a")], [E("a", data=b"new")])
    assert tree.get("a") is not tree.get("b")
    assert (image.root / "b").read_bytes() == b"old"
    assert (image.root / "a").read_bytes() == b"new"


def test_later_directory_entry_updates_metadata_and_keeps_children(image: Image) -> None:
    tree = image.apply([d("d", mode=0o755), E("d/f")], [d("d", mode=0o700, uid=7)])
    node = tree.get("d")
    assert node is not None and (node.mode, node.uid) == (0o700, 7)
    assert tree.get("d/f") is not None and (image.root / "d/f").exists()


def test_type_changes_between_layers(image: Image) -> None:
    tree = image.apply([d("x"), E("x/inner"), E("y")], [E("x", data=b"file"), d("y")])
    assert tree.get("x").kind is Kind.FILE and tree.get("y").kind is Kind.DIR  # type: ignore[union-attr]
    assert (image.root / "x").read_bytes() == b"file" and (image.root / "y").is_dir()


def test_xattrs_from_pax_headers(image: Image) -> None:
    tree = image.apply([
        E("bin/ping", data=b"x", pax={"SCHILY.xattr.user.note": "hello",
                                      "SCHILY.xattr.security.capability": "\x01\x00"}),
    ])
    node = tree.get("bin/ping")
    assert node is not None
    assert node.xattrs == {"user.note": b"hello", "security.capability": b"\x01\x00"}
    assert os.getxattr(image.root / "bin/ping", "user.note") == b"hello"


def test_unsettable_xattrs_are_pending(image: Image, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.setxattr

    def refuse_trusted(target: object, key: str, value: bytes, **kw: object) -> None:
        if not key.startswith("user."):
            raise PermissionError(1, "Operation not permitted")
        real(target, key, value, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(layers.os, "setxattr", refuse_trusted)
    tree = image.apply([E("f", pax={"SCHILY.xattr.user.a": "1", "SCHILY.xattr.trusted.b": "2"})])
    node = tree.get("f")
    assert node is not None and tree.pending_xattrs[node] == {"trusted.b": b"2"}


def test_long_names_pax_and_gnu(image: Image) -> None:
    deep = "/".join(["directory-with-a-long-name"] * 8) + "/file"
    gnu = image.layer([], media_type=PLAIN, raw=tar_of(
        [E(deep.replace("file", "gnu"), data=b"g")], fmt=tarfile.GNU_FORMAT))
    tree = apply_layers([image.layer([E(deep, data=b"p")]), gnu], image.root)
    assert tree.get(deep) is not None and tree.get(deep.replace("file", "gnu")) is not None
    assert (image.root / deep).read_bytes() == b"p"


@pytest.mark.parametrize(("how", "media_type"), [
    ("gzip", GZIP), ("zstd", ZSTD), ("none", PLAIN),
    ("gzip", DOCKER_PLAIN),  # docker-archive layers: labelled plain, really gzip
    ("zstd", GZIP), ("none", GZIP),
])
def test_compression_by_media_type_and_magic(image: Image, how: str, media_type: str) -> None:
    body = os.urandom(3 << 20)  # bigger than a read chunk
    layer = image.layer([E("big", data=body), E("small", data=b"s")], how=how,
                        media_type=media_type)
    if how == "none" and media_type == GZIP:
        with pytest.raises(IntegrityError, match=layer.digest):
            apply_layers([layer], image.root)
        return
    apply_layers([layer], image.root)
    assert (image.root / "big").read_bytes() == body


def test_multi_member_gzip_and_multi_frame_zstd(image: Image) -> None:
    tar = tar_of([E("a", data=b"a" * 5000), E("b", data=b"b")])
    gz = gzip.compress(tar[:3000], mtime=0) + gzip.compress(tar[3000:], mtime=0)
    zst = zstandard.ZstdCompressor()
    zs = bytes(zst.compress(tar[:3000])) + bytes(zst.compress(tar[3000:]))
    apply_layers([image.layer([], raw=gz), image.layer([], raw=zs, media_type=ZSTD)],
                 image.root)
    assert (image.root / "b").read_bytes() == b"b"


MALICIOUS: dict[str, tuple[list[list[E]], str]] = {
    "dotdot": ([[E("../x", data=b"pwned")]], "../x"),
    "absolute": ([[E("/abs", data=b"pwned")]], "/abs"),
    "climb-after-descend": ([[E("a/../../x", data=b"pwned")]], "a/../../x"),
    "through-symlink-to-etc": ([[sym("etc-link", "/etc")], [E("etc-link/passwd")]],
                               "etc-link/passwd"),
    "through-symlink-to-sentinel": ([[d("a"), sym("a/s", "../../sentinel"),
                                      E("a/s/evil", data=b"pwned")]], "a/s/evil"),
    "through-climbing-symlink": ([[d("a"), d("a/b"), sym("a/b/link", "../../.."),
                                   E("a/b/link/x", data=b"pwned")]], "a/b/link/x"),
    "hardlink-absolute": ([[hard("passwd", "/etc/passwd")]], "passwd"),
    "hardlink-climbing": ([[hard("x", "../../x")]], "x"),
    "hardlink-missing": ([[hard("x", "nothing-here")]], "x"),
    "hardlink-through-symlink": ([[sym("s", "/etc"), hard("x", "s/passwd")]], "x"),
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_entries_are_refused(image: Image, case: str) -> None:
    layer_entries, entry = MALICIOUS[case]
    files = [image.layer(entries) for entries in layer_entries]
    with pytest.raises(UnsafeImageError) as info:
        apply_layers(files, image.root)
    assert repr(entry) in info.value.message
    assert files[-1].digest in info.value.message
    assert image.sentinel_untouched()


def test_relative_symlinks_inside_the_tree_are_followed(image: Image) -> None:
    tree = image.apply([d("usr/lib"), sym("lib", "usr/lib"), d("usr/share"),
                        sym("usr/share/l", "../lib"), E("lib/libc.so", data=b"c"),
                        E("usr/share/l/x")])
    assert tree.get("usr/lib/libc.so") is not None and tree.get("usr/lib/x") is not None
    assert (image.root / "usr/lib/libc.so").read_bytes() == b"c"


@pytest.mark.parametrize("same_layer", [True, False])
def test_an_entry_replaces_a_symlink_never_writes_through_it(
    image: Image, same_layer: bool
) -> None:
    target = str(image.sentinel / "keep")
    planted = [sym("f", target), sym("dir", str(image.sentinel))]
    replacing = [E("f", data=b"mine"), d("dir"), E("dir/keep", data=b"mine")]
    tree = image.apply(planted + replacing) if same_layer else image.apply(planted, replacing)
    assert tree.get("f").kind is Kind.FILE  # type: ignore[union-attr]
    assert not (image.root / "f").is_symlink() and (image.root / "f").read_bytes() == b"mine"
    assert (image.sentinel / "keep").read_text() == "keep"
    assert image.sentinel_untouched()


def test_truncated_gzip_is_an_integrity_error(image: Image) -> None:
    blob = gzip.compress(tar_of([E("f", data=os.urandom(200_000))]), mtime=0)
    layer = image.layer([], raw=blob[: len(blob) // 2])
    with pytest.raises(IntegrityError, match=layer.digest):
        apply_layers([layer], image.root)


def test_truncated_zstd_is_an_integrity_error(image: Image) -> None:
    blob = compress(tar_of([E("f", data=os.urandom(50_000))]), "zstd")
    layer = image.layer([], raw=blob[:-3], media_type=ZSTD)
    with pytest.raises(IntegrityError, match=layer.digest):
        apply_layers([layer], image.root)


def test_truncated_plain_tar_is_an_integrity_error(image: Image) -> None:
    layer = image.layer([], raw=tar_of([E("f", data=b"x" * 5000)])[:1500], media_type=PLAIN)
    with pytest.raises(IntegrityError, match="truncated or corrupt"):
        apply_layers([layer], image.root)


def test_corrupt_tar_header_is_an_integrity_error(image: Image) -> None:
    tar = bytearray(tar_of([E("first", data=b"1"), E("second", data=b"2")]))
    tar[1024 + 2] ^= 0xFF  # inside the second entry's PAX header block
    layer = image.layer([], raw=gzip.compress(bytes(tar), mtime=0))
    with pytest.raises(IntegrityError, match=layer.digest):
        apply_layers([layer], image.root)


def test_not_a_tar_is_an_integrity_error(image: Image) -> None:
    layer = image.layer([], raw=b"this is not a tar archive at all" * 40, media_type=PLAIN)
    with pytest.raises(IntegrityError, match="bad checksum"):
        apply_layers([layer], image.root)


def test_staging_directory_must_be_empty(image: Image) -> None:
    (image.root / "leftover").write_text("x")
    with pytest.raises(HostError, match="not empty"):
        image.apply([E("f")])


@pytest.mark.parametrize("pax", [{"uid": str(1 << 32)}, {"gid": "-1"}, {"size": "x"}])
def test_out_of_range_header_values_are_integrity_errors(
    image: Image, pax: dict[str, str]
) -> None:
    layer = image.layer([E("f", pax=pax)])
    with pytest.raises(IntegrityError, match=r"out of range|bad PAX value"):
        apply_layers([layer], image.root)
